/* The lanes: the tunnel's steady state in one C call each way, with the GIL released.
 *
 * Why this exists: at MTU 65000 each daemon spent about a quarter of its busy thread in
 * Python between system calls (read, seal, frame, send, and back), and the two threads of a
 * daemon took turns at the GIL (bench/README.md, thirty-seventh and thirty-eighth rounds).
 *
 * send_lane reads what the TUN holds and, for each packet the lane may send as it is, seals
 * it in place and sends its frame; recv_lane opens a run of transport messages and writes
 * their packets to the TUN. Each does only the common case and stops at the first packet or
 * message it is not sure of, which it hands back to the ordinary path (Device, Engine) to
 * judge: that path keeps every rule, every drop reason and every log line. What the lanes do
 * check is what they must not get wrong, and they check it as the engine does:
 *
 *  - cryptokey routing: a packet goes only if its destination is in the peer's allowed IPs,
 *    and a message's packet is written only if its source is (the caller passes the peer's
 *    prefixes; the lanes run only while the interface has that one peer);
 *  - counters: send_lane uses only the range [counter, counter_end) that the caller reserved
 *    under the device's lock, so that a keepalive the timer seals meanwhile never reuses one;
 *  - replay: recv_lane checks and marks the keypair's own replay filter (core/replay.py's
 *    ring and `last`, under the device's lock), after the message authenticated;
 *  - keys: the TransportKey's OpenSSL context, through _transport_aead's capsule, copied so
 *    that the GIL can be released.
 *
 * I/O is plain system calls on file descriptors, so the tests run both lanes on socket pairs
 * against the ordinary path's own output (tests/test_lanes.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../core/_transport_aead_api.h"

#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define FRAME_HDR 6          /* conn/framing.py: u16 length, u32 CRC (0: unchecked) */
#define PREFIX_LEN 16        /* type, receiver index, counter */
#define TAG_LEN 16
#define PAD_MAX 15
#define MAX_PAYLOAD 65535    /* a frame's u16 length */
#define READ_MAX (65536 + VNET_HDR_LEN)  /* tun.READ_GSO_MAX_SIZE and its virtio header */
#define PADDING_MULTIPLE 16
#define IPPROTO_TCP_ 6
#define TCP_CWR 0x80
#define MIN_SEGMENT_SIZE 64  /* core/messages.py */
#define TRAILER_0 0xfe       /* core/messages.py SEGMENT_TRAILER_MAGIC */
#define TRAILER_1 0x53
/* core/messages.py REJECT_AFTER_MESSAGES: (1 << 64) - (1 << 13) - 1 */
#define REJECT_AFTER_MESSAGES (UINT64_MAX - (1ULL << 13))
/* core/replay.py */
#define RING_SLOTS 8192
#define WINDOW 8128
/* An allowed-IP prefix as AllowedIPs.packed_prefixes lays it out. */
#define PREFIX_ENTRY 18

static TransportAeadAPI *aead_api;

#if PY_VERSION_HEX < 0x030D0000
#define PyLong_AsInt _PyLong_AsInt
#endif

/* core/messages.py padding_size */
static int padding_size(int size, int mtu) {
    if (mtu <= 0)
        return (PADDING_MULTIPLE - size % PADDING_MULTIPLE) % PADDING_MULTIPLE;
    int last = size > mtu ? size % mtu : size;
    int padded = last + (PADDING_MULTIPLE - last % PADDING_MULTIPLE) % PADDING_MULTIPLE;
    if (padded > mtu)
        padded = mtu;
    return padded - last;
}

/* Whether the address at p (4 or 16 bytes, `version`) is in one of the prefixes: entries of
 * PREFIX_ENTRY bytes, the version, the prefix length, then the network address (16 bytes,
 * an IPv4 one in the first 4). */
static int allowed(const unsigned char *prefixes, Py_ssize_t size, int version,
                   const unsigned char *p) {
    for (Py_ssize_t at = 0; at + PREFIX_ENTRY <= size; at += PREFIX_ENTRY) {
        const unsigned char *e = prefixes + at;
        if (e[0] != version)
            continue;
        int bits = e[1], whole = bits / 8, rest = bits % 8;
        if (memcmp(e + 2, p, (size_t)whole) != 0)
            continue;
        if (rest && ((e[2 + whole] ^ p[whole]) & (0xFF00 >> rest) & 0xFF))
            continue;
        return 1;
    }
    return 0;
}

/* Why the prefixes are not AllowedIPs.packed_prefixes's layout, or NULL: allowed() trusts
 * each entry's length to stay inside its address. */
static const char *invalid_prefixes(const unsigned char *prefixes, Py_ssize_t size) {
    if (size % PREFIX_ENTRY)
        return "the prefixes are not whole entries";
    for (Py_ssize_t at = 0; at < size; at += PREFIX_ENTRY) {
        const unsigned char *e = prefixes + at;
        if ((e[0] != 4 && e[0] != 6) || e[1] > (e[0] == 4 ? 32 : 128))
            return "a prefix's version or length is out of range";
    }
    return NULL;
}

/* ---- send lane ------------------------------------------------------------------------- */

/* 1: the packet p (n bytes, read after the virtio header vh) goes to this peer as it was
 * read: its destination allowed, and, for the peer that takes super-packets and partial
 * checksums, in the form Device._read_for_peer would give it. 0: hand it back. */
static int sendable(const unsigned char *vh, const unsigned char *p, int n, int mtu_hint,
                    int max_packet, const unsigned char *prefixes, Py_ssize_t prefixes_len) {
    if (n < 20)
        return 0;
    int v = p[0] >> 4;
    if (v == 4) {
        if (!allowed(prefixes, prefixes_len, 4, p + 16))
            return 0;
    } else if (v == 6) {
        if (n < 40 || !allowed(prefixes, prefixes_len, 6, p + 24))
            return 0;
    } else {
        return 0;
    }
    if (n > max_packet)
        return 0;
    if (!(vh[0] & VNET_F_NEEDS_CSUM))
        return vh[1] == 0;  /* (a GSO job without a partial checksum: the kernel makes none) */
    int start = vh[6] | vh[7] << 8, offset = vh[8] | vh[9] << 8;
    int gso = vh[1] & ~GSO_ECN;
    int mss = gso == GSO_TCPV4 || gso == GSO_TCPV6 ? vh[4] | vh[5] << 8 : 0;
    /* Only a plain TCP packet keeps its partial checksum for the peer to finish: TCP right
     * after the IP header. Anything else Python completes or cuts. */
    int l3 = v == 4 ? (p[0] & 0x0F) * 4 : 40;
    if (offset != 16 || start != l3 || start + 20 > n)
        return 0;
    if (mss) {
        int headers = start + (p[start + 12] >> 4) * 4;
        /* finer than the MTU: it crosses with a segment-size trailer, or is cut (Python) */
        if (mss + headers < mtu_hint)
            return 0;
    }
    return 1;
}

/* Sends buf[*sent:used] without waiting. -1 with *err on an error; 0 (with *blocked when the
 * socket is full). */
static int send_frames(int fd, const unsigned char *buf, size_t *sent, size_t used,
                       int *blocked, int *err) {
    while (*sent < used) {
        ssize_t s = send(fd, buf + *sent, used - *sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                *blocked = 1;
                return 0;
            }
            *err = errno;
            return -1;
        }
        *sent += (size_t)s;
    }
    return 0;
}

PyDoc_STRVAR(send_lane_doc,
"send_lane(buf, tun_fd, sock_fd, key, header, counter, counter_end, mtu, mtu_hint,\n"
"          max_packet, max_bytes, prefixes, /)\n"
"-> (packets, message_bytes, counter, drained, handback, unsent, partial, send_errno)\n\n"
"Reads the TUN (non-blocking, with virtio-net headers) into `buf` (a writable buffer of at\n"
"least max_bytes + 65630 bytes) until it is empty, `max_bytes` of frames are made or the\n"
"counters up to `counter_end` are used. Each packet that may go as it is gets sealed in place\n"
"with `key` (header: type 4 and the peer's index; padding to `mtu`), framed with CRC 0 and\n"
"sent on `sock_fd` at once (MSG_DONTWAIT). The first packet that may not go ends the call and\n"
"comes back whole (virtio header and packet) as `handback`; so does a full socket, with the\n"
"frames it did not take as `unsent` (from the start of the first one not sent whole, of\n"
"which `partial` bytes went) and any socket error as `send_errno`. `counter`: the next unused.\n"
"`drained`: the TUN was empty. Raises OSError if the first read failed otherwise.");

static PyObject *send_lane(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "send_lane() takes 12 arguments (%zd given)", nargs);
        return NULL;
    }
    int tun_fd = PyLong_AsInt(args[1]);
    int sock_fd = PyLong_AsInt(args[2]);
    unsigned long long counter = PyLong_AsUnsignedLongLong(args[5]);
    unsigned long long counter_end = PyLong_AsUnsignedLongLong(args[6]);
    int mtu = PyLong_AsInt(args[7]);
    int mtu_hint = PyLong_AsInt(args[8]);
    int max_packet = PyLong_AsInt(args[9]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[10]);
    if (PyErr_Occurred())
        return NULL;
    EVP_CIPHER_CTX *base = aead_api->context(args[3], 1);
    if (base == NULL)
        return NULL;
    Py_buffer buffer, header, prefixes;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[4], &header, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buffer);
        return NULL;
    }
    if (PyObject_GetBuffer(args[11], &prefixes, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buffer);
        PyBuffer_Release(&header);
        return NULL;
    }
    unsigned char hdr8[8];
    const char *invalid = NULL;
    if (header.len != 8)
        invalid = "a transport header is 8 bytes";
    else if (max_bytes < 0 || buffer.len < READ_MAX + FRAME_HDR + PREFIX_LEN
             || max_bytes > buffer.len - (READ_MAX + FRAME_HDR + PREFIX_LEN))
        invalid = "the buffer is too small for max_bytes";
    else if (counter_end > REJECT_AFTER_MESSAGES || counter > counter_end)
        invalid = "the counters are out of range";
    else if (tun_fd < 0 || sock_fd < 0)
        invalid = "a file descriptor is negative";
    else if ((invalid = invalid_prefixes(prefixes.buf, prefixes.len)) == NULL)
        memcpy(hdr8, header.buf, 8);
    PyBuffer_Release(&header);
    if (invalid) {
        PyBuffer_Release(&buffer);
        PyBuffer_Release(&prefixes);
        PyErr_SetString(PyExc_ValueError, invalid);
        return NULL;
    }
    /* A message is at most a frame's payload. */
    if (max_packet > MAX_PAYLOAD - PREFIX_LEN - TAG_LEN - PAD_MAX)
        max_packet = MAX_PAYLOAD - PREFIX_LEN - TAG_LEN - PAD_MAX;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || !EVP_CIPHER_CTX_copy(ctx, base)) {
        EVP_CIPHER_CTX_free(ctx);
        PyBuffer_Release(&buffer);
        PyBuffer_Release(&prefixes);
        return PyErr_NoMemory();
    }

    unsigned char *buf = buffer.buf;
    const unsigned char *pfx = prefixes.buf;
    Py_ssize_t pfx_len = prefixes.len;
    size_t used = 0, sent = 0, msg_bytes = 0, frame_at = 0;
    int packets = 0, drained = 0, read_errno = 0, crypt_failed = 0, send_errno = 0;
    int blocked = 0;
    Py_ssize_t handback_at = -1, handback_len = 0;
    static const unsigned char zeros[PAD_MAX];

    Py_BEGIN_ALLOW_THREADS
    while ((Py_ssize_t)used < max_bytes && counter < counter_end) {
        /* The packet lands where its ciphertext goes: after the frame header and the
         * message's prefix (ChaCha20-Poly1305 encrypts in place). */
        unsigned char *frame = buf + used;
        unsigned char *plain = frame + FRAME_HDR + PREFIX_LEN;
        unsigned char *vh = plain - VNET_HDR_LEN;
        ssize_t r = read(tun_fd, vh, READ_MAX);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                drained = 1;
            else
                read_errno = errno;
            break;
        }
        int n = (int)r - VNET_HDR_LEN;
        if (n <= 0 || !sendable(vh, plain, n, mtu_hint, max_packet, pfx, pfx_len)) {
            handback_at = (Py_ssize_t)(vh - buf);
            handback_len = r;
            break;
        }
        int pad = padding_size(n, mtu);
        int len = PREFIX_LEN + n + pad + TAG_LEN;
        unsigned char nonce[12] = {0};
        frame[0] = (unsigned char)len;
        frame[1] = (unsigned char)(len >> 8);
        memset(frame + 2, 0, 4);  /* CRC 0: the peer's hello offered CAP_UNCHECKED_TRANSPORT */
        memcpy(frame + FRAME_HDR, hdr8, 8);
        for (int i = 0; i < 8; i++)
            frame[FRAME_HDR + 8 + i] = nonce[4 + i] = (unsigned char)(counter >> (8 * i));
        int m, f;
        if (!EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, 1, NULL)
            || !EVP_CipherUpdate(ctx, plain, &m, plain, n) || m != n
            || (pad && (!EVP_CipherUpdate(ctx, plain + n, &m, zeros, pad) || m != pad))
            || EVP_CipherFinal_ex(ctx, plain + n + pad, &f) <= 0
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, plain + n + pad) <= 0) {
            crypt_failed = 1;
            break;
        }
        counter++;
        packets++;
        msg_bytes += (size_t)len;
        used += FRAME_HDR + (size_t)len;
        /* Each frame goes as soon as it is sealed, so that the peer starts on it while the
         * next is sealed here: sealing a batch for one send left the receiver idle, and the
         * pair slower (bench/README.md, thirty-seventh round). */
        if (send_frames(sock_fd, buf, &sent, used, &blocked, &send_errno) < 0 || blocked)
            break;
    }
    Py_END_ALLOW_THREADS
    EVP_CIPHER_CTX_free(ctx);
    PyBuffer_Release(&prefixes);

    PyObject *result = NULL;
    if (crypt_failed) {
        /* (Nothing was sent of the frame it was sealing: `used` does not cover it.) */
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 sealing failed");
        goto done;
    }
    if (read_errno && packets == 0) {
        errno = read_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    /* The first frame not sent whole: the frames' lengths lead from the start. */
    Py_ssize_t partial = 0;
    if (sent < used) {
        while (frame_at + FRAME_HDR + (size_t)(buf[frame_at] | buf[frame_at + 1] << 8) <= sent)
            frame_at += FRAME_HDR + (size_t)(buf[frame_at] | buf[frame_at + 1] << 8);
        partial = (Py_ssize_t)(sent - frame_at);
    }
    PyObject *handback = handback_at >= 0
        ? PyBytes_FromStringAndSize((const char *)buf + handback_at, handback_len)
        : Py_NewRef(Py_None);
    PyObject *unsent = sent < used
        ? PyBytes_FromStringAndSize((const char *)buf + frame_at, (Py_ssize_t)(used - frame_at))
        : Py_NewRef(Py_None);
    if (handback && unsent)
        result = Py_BuildValue("(inKiOOni)", packets, (Py_ssize_t)msg_bytes, counter, drained,
                               handback, unsent, partial, send_errno);
    Py_XDECREF(handback);
    Py_XDECREF(unsent);
done:
    PyBuffer_Release(&buffer);
    return result;
}

/* ---- receive lane ---------------------------------------------------------------------- */

/* core/replay.py ReplayFilter.check's rule, split in two: whether `counter` would be
 * accepted (new), and marking it. `next` is the filter's `last` + 1 (0: none yet). */
static int replay_new(const unsigned char *ring, uint64_t next, uint64_t counter) {
    if (counter >= REJECT_AFTER_MESSAGES)
        return 0;
    if (counter >= next)
        return 1;
    if (next - 1 - counter > WINDOW)
        return 0;
    return !ring[counter & (RING_SLOTS - 1)];
}

static void replay_mark(unsigned char *ring, uint64_t *next, uint64_t counter) {
    if (counter >= *next) {
        /* Slots skipped over may hold marks from a lap ago: they now stand for counters that
         * have not arrived yet. */
        uint64_t gap = counter + 1 - *next;
        if (gap >= RING_SLOTS) {
            memset(ring, 0, RING_SLOTS);
        } else {
            for (uint64_t c = *next; c < counter; c++)
                ring[c & (RING_SLOTS - 1)] = 0;
        }
        *next = counter + 1;
    }
    ring[counter & (RING_SLOTS - 1)] = 1;
}

/* device/tun.py tcp_offset */
static int tcp_offset(const unsigned char *p, int n) {
    int v = p[0] >> 4, ihl;
    if (v == 4) {
        ihl = (p[0] & 0x0F) * 4;
        if (ihl < 20 || p[9] != IPPROTO_TCP_ || (p[6] & 0x3F) || p[7])
            return 0;
    } else if (v == 6) {
        ihl = 40;
        if (p[6] != IPPROTO_TCP_)
            return 0;
    } else {
        return 0;
    }
    if (n < ihl + 20 || p[ihl + 12] >> 4 < 5)
        return 0;
    return ihl;
}

/* device/tun.py _pseudo_sum */
static uint32_t pseudo_sum(const unsigned char *p, int l4, int length) {
    uint64_t sum = 0;
    int v6 = p[0] >> 4 == 6, from = v6 ? 8 : 12, to = v6 ? 40 : 20;
    for (int i = from; i < to; i += 2)
        sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    sum += IPPROTO_TCP_ + (uint64_t)(length - l4);
    return (uint32_t)(sum % 0xFFFF);
}

/* What Tun.write puts in front of packet p (`length` bytes) for the kernel, into vh (10 bytes
 * right before p), with p's checksum field changed where a segmentation job needs it partial:
 * device/tun.py's Tun.write and _offload_header, for one packet. */
static void offload_header(unsigned char *vh, unsigned char *p, int length, int mtu,
                           int partial_csum) {
    memset(vh, 0, VNET_HDR_LEN);
    if (!partial_csum && length <= mtu)
        return;
    int ihl = tcp_offset(p, length);
    if (!ihl)
        return;
    int at = ihl + 16;
    uint32_t pseudo = pseudo_sum(p, ihl, length);
    int partial = (uint32_t)(p[at] << 8 | p[at + 1]) % 0xFFFF == pseudo;
    int thl = (p[ihl + 12] >> 4) * 4;
    int mss = mtu - ihl - thl;
    if (length <= mtu || mss <= 0 || length <= ihl + thl + mss) {
        if (!partial || (length > mtu && mss <= 0))
            return;
        vh[0] = VNET_F_NEEDS_CSUM;
    } else {
        vh[0] = VNET_F_NEEDS_CSUM;
        vh[1] = (p[0] >> 4 == 4 ? GSO_TCPV4 : GSO_TCPV6) | (p[ihl + 13] & TCP_CWR ? GSO_ECN : 0);
        vh[2] = (unsigned char)(ihl + thl);
        vh[3] = (unsigned char)((ihl + thl) >> 8);
        vh[4] = (unsigned char)mss;
        vh[5] = (unsigned char)(mss >> 8);
        /* A segmentation job must carry a partial checksum: the kernel completes it per
         * segment. */
        if (!partial) {
            p[at] = (unsigned char)(pseudo >> 8);
            p[at + 1] = (unsigned char)pseudo;
        }
    }
    vh[6] = (unsigned char)ihl;
    vh[7] = (unsigned char)(ihl >> 8);
    vh[8] = 16;
}

/* The inner packet's length if the lane may write it (engine.inner_length, no segment-size
 * trailer after it, its source allowed), else -1. */
static int writable_length(const unsigned char *p, int plen, const unsigned char *prefixes,
                           Py_ssize_t prefixes_len) {
    int length, v = p[0] >> 4;
    if (v == 4 && plen >= 20) {
        length = p[2] << 8 | p[3];
        if (length < 20 || !allowed(prefixes, prefixes_len, 4, p + 12))
            return -1;
    } else if (v == 6 && plen >= 40) {
        length = 40 + (p[4] << 8 | p[5]);
        if (!allowed(prefixes, prefixes_len, 6, p + 8))
            return -1;
    } else {
        return -1;
    }
    if (length > plen)
        return -1;
    /* A segment-size trailer: the engine's SEGMENTED, the ordinary path's. */
    if (length != plen && p[length] == TRAILER_0)
        return -1;
    return length;
}

PyDoc_STRVAR(recv_lane_doc,
"recv_lane(messages, buf, tun_fd, key, local_index, ring, last, mtu_hint, partial_csum,\n"
"          prefixes, /) -> (done, rx_bytes, data, keepalives, last, write_errno)\n\n"
"Opens the transport messages at the front of `messages` (a list of buffers) with `key`, for\n"
"the keypair whose index is `local_index` and whose replay filter is `ring` (writable, 8192\n"
"bytes) and `last` + 1 (0: no counter yet), and writes each packet to `tun_fd` with the\n"
"virtio-net header Tun.write would give it (`buf`: writable, at least 65546 bytes, to open\n"
"into). It stops at the first message it would not write as it is (not for this keypair,\n"
"failing authentication, replayed, a packet whose source is not in `prefixes`, ...),\n"
"unchanged, for the ordinary path. Returns how many it took, their bytes, how many carried\n"
"data and how many were keepalives, the filter's new `last` + 1, and the first TUN write's\n"
"errno (0: none failed).");

static PyObject *recv_lane(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "recv_lane() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "recv_lane() takes its messages as a list");
        return NULL;
    }
    PyObject *list = args[0];
    int tun_fd = PyLong_AsInt(args[2]);
    unsigned long index = PyLong_AsUnsignedLong(args[4]);
    uint64_t next = PyLong_AsUnsignedLongLong(args[6]);
    int mtu = PyLong_AsInt(args[7]);
    int partial_csum = PyObject_IsTrue(args[8]);
    if (PyErr_Occurred())
        return NULL;
    EVP_CIPHER_CTX *base = aead_api->context(args[3], 0);
    if (base == NULL)
        return NULL;
    Py_buffer buffer, ring, prefixes;
    if (PyObject_GetBuffer(args[1], &buffer, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[5], &ring, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&buffer);
        return NULL;
    }
    if (PyObject_GetBuffer(args[9], &prefixes, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buffer);
        PyBuffer_Release(&ring);
        return NULL;
    }
    const char *invalid = NULL;
    if (ring.len != RING_SLOTS)
        invalid = "a replay ring is 8192 bytes";
    else if (buffer.len < MAX_PAYLOAD + VNET_HDR_LEN)
        invalid = "the buffer is too small for a message";
    else if (tun_fd < 0)
        invalid = "a file descriptor is negative";
    else if (next > REJECT_AFTER_MESSAGES || index > 0xFFFFFFFFUL)
        invalid = "the index or the replay filter's counter is out of range";
    else
        invalid = invalid_prefixes(prefixes.buf, prefixes.len);
    if (invalid) {
        PyErr_SetString(PyExc_ValueError, invalid);
        goto fail;
    }
    /* The messages' buffers, taken while the GIL is held; at most `max` per call. */
    enum { MAX_MESSAGES = 256 };
    Py_buffer views[MAX_MESSAGES];
    Py_ssize_t got = 0;
    /* (The list's size asked again for each: an item's __buffer__ may change the list.) */
    for (; got < MAX_MESSAGES && got < PyList_GET_SIZE(list); got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(list, got), &views[got], PyBUF_SIMPLE) < 0) {
            PyErr_Clear();  /* not a buffer: the ordinary path's to judge */
            break;
        }
    }
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || !EVP_CIPHER_CTX_copy(ctx, base)) {
        EVP_CIPHER_CTX_free(ctx);
        for (Py_ssize_t i = 0; i < got; i++)
            PyBuffer_Release(&views[i]);
        PyErr_NoMemory();
        goto fail;
    }
    unsigned char *rb = ring.buf;
    const unsigned char *pfx = prefixes.buf;
    Py_ssize_t pfx_len = prefixes.len;
    /* The plaintext lands after room for the virtio header. */
    unsigned char *p = (unsigned char *)buffer.buf + VNET_HDR_LEN;
    Py_ssize_t done = 0;
    size_t rx_bytes = 0;
    int data = 0, keepalives = 0, write_errno = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; done < got; done++) {
        const unsigned char *m = views[done].buf;
        Py_ssize_t len = views[done].len;
        if (len < PREFIX_LEN + TAG_LEN || len > MAX_PAYLOAD || m[0] != 4 || m[1] || m[2]
            || m[3])
            break;
        uint32_t receiver = m[4] | m[5] << 8 | m[6] << 16 | (uint32_t)m[7] << 24;
        if (receiver != index)
            break;
        uint64_t counter = 0;
        for (int i = 7; i >= 0; i--)
            counter = counter << 8 | m[8 + i];
        if (!replay_new(rb, next, counter))
            break;
        int plen = (int)len - PREFIX_LEN - TAG_LEN;
        unsigned char nonce[12] = {0}, tag[TAG_LEN];
        memcpy(nonce + 4, m + 8, 8);
        memcpy(tag, m + PREFIX_LEN + plen, TAG_LEN);
        int k, f;
        if (!EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, 0, NULL)
            || (plen && (!EVP_CipherUpdate(ctx, p, &k, m + PREFIX_LEN, plen) || k != plen))
            || !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag)
            || EVP_CipherFinal_ex(ctx, p + plen, &f) <= 0)
            break;
        int length = 0;
        if (plen) {
            length = writable_length(p, plen, pfx, pfx_len);
            if (length < 0)
                break;
        }
        /* Authenticated and to be written: only now is the counter spent. */
        replay_mark(rb, &next, counter);
        rx_bytes += (size_t)len;
        if (!plen) {
            keepalives++;
            continue;
        }
        data++;
        offload_header(p - VNET_HDR_LEN, p, length, mtu, partial_csum);
        ssize_t w;
        do
            w = write(tun_fd, p - VNET_HDR_LEN, (size_t)length + VNET_HDR_LEN);
        while (w < 0 && errno == EINTR);
        if (w < 0 && !write_errno)
            write_errno = errno;
    }
    Py_END_ALLOW_THREADS
    EVP_CIPHER_CTX_free(ctx);
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&ring);
    PyBuffer_Release(&prefixes);
    return Py_BuildValue("(nniiKi)", done, (Py_ssize_t)rx_bytes, data, keepalives,
                         (unsigned long long)next, write_errno);
fail:
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&ring);
    PyBuffer_Release(&prefixes);
    return NULL;
}

static PyMethodDef methods[] = {
    {"send_lane", (PyCFunction)(void (*)(void))send_lane, METH_FASTCALL, send_lane_doc},
    {"recv_lane", (PyCFunction)(void (*)(void))recv_lane, METH_FASTCALL, recv_lane_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_lane",
    .m_doc = "The tunnel's steady state in one C call each way (see _lane.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__lane(void) {
    /* (PyCapsule_Import finds the capsule by attributes from the package down: the module
     * must be imported first.) */
    PyObject *aead = PyImport_ImportModule("wgvsock.core._transport_aead");
    if (aead == NULL)
        return NULL;
    Py_DECREF(aead);
    aead_api = PyCapsule_Import(TRANSPORT_AEAD_CAPSULE, 0);
    if (aead_api == NULL)
        return NULL;
    return PyModule_Create(&module);
}
