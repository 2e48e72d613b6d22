/* ChaCha20-Poly1305 for WireGuard transport messages (type 4), through OpenSSL's EVP API.
 *
 * Why this exists: `cryptography` makes, initialises and frees an OpenSSL cipher context on
 * every call, and copies the result into the message afterwards. On the per-packet path that
 * fixed cost was half of each 1420-byte seal (bench/README.md, fifteenth round). Here each key
 * keeps one initialised context per direction and only the nonce changes per message; the
 * message (header, counter, ciphertext, tag) is written into one bytes object with no copies.
 *
 * The cipher itself is OpenSSL's (the system's libcrypto; `cryptography` carries its own build
 * of the same library); nothing here does cryptography by hand. transport_aead.py has the same interface on `cryptography` for a pure
 * build, and tests/core/test_transport_aead.py compares the two.
 *
 * Threads: a context is used only while the caller holds the GIL, so two threads never share
 * one. Messages of UNLOCKED_MIN bytes or more get a copy of the context and release the GIL, so
 * the other thread runs meanwhile: the same threshold as `cryptography` (which releases it from
 * 2048 bytes on), so that only the per-call cost changes, not how the threads interleave.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "_transport_aead_api.h"

#define KEY_LEN 32
#define HEADER_LEN 8   /* type 4 and the receiver's index */
#define PREFIX_LEN 16  /* the header and the little-endian counter */
#define TAG_LEN 16
#define NONCE_LEN 12   /* four zero bytes, then the counter */
#define MAX_PAD 15
#define UNLOCKED_MIN 2048

static EVP_CIPHER *chacha20_poly1305;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *seal_ctx;
    EVP_CIPHER_CTX *open_ctx;
} TransportKey;

static void transport_key_dealloc(TransportKey *self) {
    /* EVP_CIPHER_CTX_free cleanses the key schedule. */
    EVP_CIPHER_CTX_free(self->seal_ctx);
    EVP_CIPHER_CTX_free(self->open_ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *openssl_error(const char *what) {
    PyErr_Format(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 %s failed", what);
    return NULL;
}

static PyObject *transport_key_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Py_buffer key;
    static char *kwlist[] = {"key", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:TransportKey", kwlist, &key))
        return NULL;
    if (key.len != KEY_LEN) {
        PyErr_Format(PyExc_ValueError, "a transport key is %d bytes, not %zd", KEY_LEN, key.len);
        PyBuffer_Release(&key);
        return NULL;
    }
    TransportKey *self = (TransportKey *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    self->seal_ctx = EVP_CIPHER_CTX_new();
    self->open_ctx = EVP_CIPHER_CTX_new();
    int ok = self->seal_ctx != NULL && self->open_ctx != NULL
             && EVP_CipherInit_ex2(self->seal_ctx, chacha20_poly1305, key.buf, NULL, 1, NULL)
             && EVP_CipherInit_ex2(self->open_ctx, chacha20_poly1305, key.buf, NULL, 0, NULL);
    PyBuffer_Release(&key);
    if (!ok) {
        Py_DECREF(self);
        return openssl_error("key set-up");
    }
    return (PyObject *)self;
}

/* One message through `ctx`, whose key is set: the nonce, the data, for sealing the `tail`
 * bytes and `pad` zero bytes after it, then the tag (written for sealing, checked for
 * opening). 1 on success. */
static int run(EVP_CIPHER_CTX *ctx, int enc, const unsigned char *nonce, unsigned char *out,
               const unsigned char *in, int len, const unsigned char *tail, int tail_len,
               int pad, unsigned char *tag) {
    static const unsigned char zeros[MAX_PAD];
    int n;
    if (!EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, enc, NULL))
        return 0;
    if (len > 0 && (!EVP_CipherUpdate(ctx, out, &n, in, len) || n != len))
        return 0;
    out += len;
    if (tail_len > 0 && (!EVP_CipherUpdate(ctx, out, &n, tail, tail_len) || n != tail_len))
        return 0;
    out += tail_len;
    if (pad > 0 && (!EVP_CipherUpdate(ctx, out, &n, zeros, pad) || n != pad))
        return 0;
    if (!enc && !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag))
        return 0;
    if (EVP_CipherFinal_ex(ctx, out + pad, &n) <= 0)
        return 0;
    return !enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, tag) > 0;
}

/* run() on `base` with the GIL held, or on a copy of it with the GIL released. By all it
 * encrypts, the tail included: a short packet with a long tail takes as long as a long one. */
static int run_with(EVP_CIPHER_CTX *base, int enc, const unsigned char *nonce,
                    unsigned char *out, const unsigned char *in, int len,
                    const unsigned char *tail, int tail_len, int pad, unsigned char *tag,
                    int *copy_failed) {
    if (len + tail_len < UNLOCKED_MIN)
        return run(base, enc, nonce, out, in, len, tail, tail_len, pad, tag);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || !EVP_CIPHER_CTX_copy(ctx, base)) {
        EVP_CIPHER_CTX_free(ctx);
        *copy_failed = 1;
        return 0;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = run(ctx, enc, nonce, out, in, len, tail, tail_len, pad, tag);
    Py_END_ALLOW_THREADS
    EVP_CIPHER_CTX_free(ctx);
    return ok;
}

PyDoc_STRVAR(seal_doc,
"seal(header, counter, packet, pad, tail=b'', /) -> bytes\n\n"
"The transport message: the 8-byte header, the counter (little-endian), then `packet`,\n"
"`tail` and `pad` zero bytes (0-15) encrypted, then the tag. `tail` is sealed as if joined\n"
"to `packet`, which spares the caller that copy (a segment-size trailer after 64 KiB).");

static PyObject *transport_key_seal(TransportKey *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 && nargs != 5) {
        PyErr_Format(PyExc_TypeError, "seal() takes 4 or 5 arguments (%zd given)", nargs);
        return NULL;
    }
    unsigned long long counter = PyLong_AsUnsignedLongLong(args[1]);
    if (counter == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t pad = PyLong_AsSsize_t(args[3]);
    if (pad == -1 && PyErr_Occurred())
        return NULL;
    if (pad < 0 || pad > MAX_PAD) {
        PyErr_Format(PyExc_ValueError, "padding is 0-%d bytes, not %zd", MAX_PAD, pad);
        return NULL;
    }
    Py_buffer header, packet, tail = {0};
    if (PyObject_GetBuffer(args[0], &header, PyBUF_SIMPLE) < 0)
        return NULL;
    if (header.len != HEADER_LEN) {
        PyErr_Format(PyExc_ValueError, "a transport header is %d bytes, not %zd", HEADER_LEN,
                     header.len);
        PyBuffer_Release(&header);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &packet, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&header);
        return NULL;
    }
    if (nargs == 5 && PyObject_GetBuffer(args[4], &tail, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&header);
        PyBuffer_Release(&packet);
        return NULL;
    }
    PyObject *msg = NULL;
    if (packet.len > INT_MAX - MAX_PAD - PREFIX_LEN - TAG_LEN - tail.len) {
        PyErr_Format(PyExc_ValueError, "a packet of %zd bytes is too large to seal",
                     packet.len + tail.len);
        goto done;
    }
    int len = (int)packet.len, tail_len = (int)tail.len;
    msg = PyBytes_FromStringAndSize(NULL, PREFIX_LEN + len + tail_len + pad + TAG_LEN);
    if (msg == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(msg);
    unsigned char nonce[NONCE_LEN] = {0};
    memcpy(out, header.buf, HEADER_LEN);
    for (int i = 0; i < 8; i++)
        out[HEADER_LEN + i] = nonce[4 + i] = (unsigned char)(counter >> (8 * i));
    int copy_failed = 0;
    if (!run_with(self->seal_ctx, 1, nonce, out + PREFIX_LEN, packet.buf, len, tail.buf,
                  tail_len, (int)pad, out + PREFIX_LEN + len + tail_len + pad, &copy_failed)) {
        Py_CLEAR(msg);
        if (copy_failed)
            PyErr_NoMemory();
        else
            openssl_error("sealing");
    }
done:
    PyBuffer_Release(&header);
    PyBuffer_Release(&packet);
    if (nargs == 5)
        PyBuffer_Release(&tail);
    return msg;
}

PyDoc_STRVAR(open_doc,
"open(message, /) -> bytes | None\n\n"
"The plaintext of a whole transport message (its nonce from bytes 8-16, its ciphertext from\n"
"byte 16, the tag last), or None if it is shorter than 32 bytes or fails authentication.");

static PyObject *transport_key_open(TransportKey *self, PyObject *message) {
    Py_buffer in;
    if (PyObject_GetBuffer(message, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *plain = NULL;
    if (in.len < PREFIX_LEN + TAG_LEN || in.len - PREFIX_LEN - TAG_LEN > INT_MAX) {
        plain = Py_NewRef(Py_None);
        goto done;
    }
    const unsigned char *data = in.buf;
    int len = (int)(in.len - PREFIX_LEN - TAG_LEN);
    unsigned char nonce[NONCE_LEN] = {0}, tag[TAG_LEN];
    memcpy(nonce + 4, data + HEADER_LEN, 8);
    memcpy(tag, data + PREFIX_LEN + len, TAG_LEN);
    plain = PyBytes_FromStringAndSize(NULL, len);
    if (plain == NULL)
        goto done;
    int copy_failed = 0;
    if (!run_with(self->open_ctx, 0, nonce, (unsigned char *)PyBytes_AS_STRING(plain),
                  data + PREFIX_LEN, len, NULL, 0, 0, tag, &copy_failed)) {
        Py_DECREF(plain);
        plain = copy_failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&in);
    return plain;
}

static PyMethodDef transport_key_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))transport_key_seal, METH_FASTCALL, seal_doc},
    {"open", (PyCFunction)transport_key_open, METH_O, open_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(transport_key_doc,
"TransportKey(key)\n\n"
"One direction's 32-byte transport key, for sealing or opening transport messages.");

static PyTypeObject TransportKeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgvsock.core._transport_aead.TransportKey",
    .tp_basicsize = sizeof(TransportKey),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = transport_key_doc,
    .tp_new = transport_key_new,
    .tp_dealloc = (destructor)transport_key_dealloc,
    .tp_methods = transport_key_methods,
};

/* The C API (_transport_aead_api.h). */
static EVP_CIPHER_CTX *key_context(PyObject *key, int seal) {
    if (!PyObject_TypeCheck(key, &TransportKeyType)) {
        PyErr_Format(PyExc_TypeError, "a TransportKey, not %.100s", Py_TYPE(key)->tp_name);
        return NULL;
    }
    return seal ? ((TransportKey *)key)->seal_ctx : ((TransportKey *)key)->open_ctx;
}

static TransportAeadAPI c_api = {key_context};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_transport_aead",
    .m_doc = "ChaCha20-Poly1305 for WireGuard transport messages, through OpenSSL.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__transport_aead(void) {
    chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    if (chacha20_poly1305 == NULL) {
        PyErr_SetString(PyExc_ImportError, "this OpenSSL has no ChaCha20-Poly1305");
        return NULL;
    }
    if (PyType_Ready(&TransportKeyType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *capsule = PyCapsule_New(&c_api, TRANSPORT_AEAD_CAPSULE, NULL);
    if (capsule == NULL
        || PyModule_AddObjectRef(m, "TransportKey", (PyObject *)&TransportKeyType) < 0
        || PyModule_AddObjectRef(m, TRANSPORT_AEAD_CAPSULE_ATTR, capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(capsule);
    return m;
}
