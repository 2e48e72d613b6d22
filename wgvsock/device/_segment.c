/* TCP segmentation and checksum completion for packets read from the TUN with offload on.
 *
 * Why this exists: with offload on, one TUN read gives up to 64 KiB of a TCP flow (a
 * super-packet) with its checksum left partial. A peer that takes super-packets gets it whole;
 * any other (the Go seed, our daemon with offload off) needs it cut into MTU-sized segments,
 * each with complete checksums. tun.py does that in Python for a pure build, where the
 * checksum (int.from_bytes over the segment) costs about 2 us per KiB: so much that the TUN
 * was read without offload for such peers, one system call per MTU-sized packet. Here the same
 * work is a copy and an add per 4 bytes, which is cheaper than the reads it saves.
 *
 * The results are byte for byte those of tun.py's split_tso and complete_checksum
 * (tests/test_segmentation.py compares the two), including the checksum's form: a sum that is
 * 0 modulo 0xFFFF is written as 0xFFFF, never 0, as the Python does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TCP_CWR 0x80
#define TCP_FIN_PSH 0x09
#define IPPROTO_TCP_ 6

/* The one's complement sum of DATA as little-endian 16-bit words (a trailing byte as the low
 * byte of a last word), not yet folded. Summing in the machine's order and swapping the
 * folded result gives the big-endian sum (RFC 1071, byte order independence). */
static uint64_t sum_le(const uint8_t *data, Py_ssize_t len) {
    uint64_t sum = 0;
    Py_ssize_t i = 0;
    for (; i + 4 <= len; i += 4) {
        uint32_t word;
        memcpy(&word, data + i, 4);
        sum += word;
    }
    for (; i + 2 <= len; i += 2) {
        uint16_t half;
        memcpy(&half, data + i, 2);
        sum += half;
    }
    if (i < len)
        sum += data[i];
    return sum;
}

static uint32_t fold(uint64_t sum) {
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint32_t)sum;
}

/* The big-endian one's complement sum of DATA, folded to 16 bits. */
static uint32_t sum_be(const uint8_t *data, Py_ssize_t len) {
    uint32_t le = fold(sum_le(data, len));
    return ((le & 0xFF) << 8) | (le >> 8);
}

/* The checksum field for a big-endian sum: ~(sum mod 0xFFFF), as tun._fold computes it. */
static uint16_t field(uint64_t sum) {
    uint32_t folded = fold(sum);
    if (folded == 0xFFFF)
        folded = 0;
    return (uint16_t)(~folded & 0xFFFF);
}

static void put16(uint8_t *at, uint32_t value) {
    at[0] = (uint8_t)(value >> 8);
    at[1] = (uint8_t)value;
}

static uint32_t get16(const uint8_t *at) { return ((uint32_t)at[0] << 8) | at[1]; }

static uint32_t get32(const uint8_t *at) {
    return ((uint32_t)at[0] << 24) | ((uint32_t)at[1] << 16) | ((uint32_t)at[2] << 8) | at[3];
}

static PyObject *complete_checksum(PyObject *self, PyObject *args) {
    Py_buffer packet;
    Py_ssize_t start, offset;
    if (!PyArg_ParseTuple(args, "y*nn:complete_checksum", &packet, &start, &offset))
        return NULL;
    if (start < 0 || offset < 0 || start + offset + 2 > packet.len) {
        PyErr_Format(PyExc_ValueError,
                     "checksum at %zd + %zd lies outside a packet of %zd bytes", start, offset,
                     packet.len);
        PyBuffer_Release(&packet);
        return NULL;
    }
    PyObject *out = PyByteArray_FromStringAndSize(packet.buf, packet.len);
    PyBuffer_Release(&packet);
    if (out == NULL)
        return NULL;
    uint8_t *p = (uint8_t *)PyByteArray_AS_STRING(out);
    Py_ssize_t len = PyByteArray_GET_SIZE(out);
    /* The field holds the pseudo-header's sum: the sum from START is the whole one. */
    put16(p + start + offset, field(sum_be(p + start, len - start)));
    return out;
}

/* The destination an IPv6 packet's TCP checksum covers (RFC 8200, 8.1): the final one, which
 * a routing header with segments left names in place of the IPv6 header's. Its extension
 * headers (hop-by-hop, routing, destination options, AH) end at L4. */
static const uint8_t *final_destination(const uint8_t *in, Py_ssize_t l4) {
    const uint8_t *dst = in + 24;
    uint8_t nh = in[6];
    Py_ssize_t at = 40;
    while (at + 8 <= l4 && (nh == 0 || nh == 43 || nh == 60 || nh == 51)) {
        Py_ssize_t size = nh == 51 ? ((Py_ssize_t)in[at + 1] + 2) * 4
                                   : ((Py_ssize_t)in[at + 1] + 1) * 8;
        if (nh == 43 && in[at + 3] && size >= 24 && at + size <= l4) {
            if (in[at + 2] == 0 || in[at + 2] == 2) /* addresses, the final one last */
                dst = in + at + size - 16;
            else if (in[at + 2] == 4) /* segment routing: Segment List[0], the final one */
                dst = in + at + 8;
        }
        nh = in[at];
        at += size;
    }
    return dst;
}

static PyObject *split_tso(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t l4, mss;
    int partial = 0;
    if (!PyArg_ParseTuple(args, "y*nn|p:split_tso", &view, &l4, &mss, &partial))
        return NULL;
    const uint8_t *in = view.buf;
    Py_ssize_t len = view.len;
    PyObject *out = NULL;
    const char *bad = NULL;
    int version = len ? in[0] >> 4 : 0;
    Py_ssize_t hlen = 0;
    if (mss <= 0)
        bad = "a segment size above 0";
    else if (version != 4 && version != 6)
        bad = "an IPv4 or IPv6 packet";
    else if (l4 < (version == 4 ? 20 : 40) || l4 + 20 > len)
        bad = "a TCP header inside the packet";
    else if ((hlen = l4 + (in[l4 + 12] >> 4) * 4) > len || hlen < l4 + 20)
        bad = "a TCP header length inside the packet";
    if (bad != NULL) {
        PyErr_Format(PyExc_ValueError, "split_tso: needs %s (%zd bytes, TCP at %zd, mss %zd)",
                     bad, len, l4, mss);
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t payload = len - hlen;
    /* The pseudo-header's addresses, summed once. */
    uint32_t addresses = version == 4 ? sum_be(in + 12, 8)
                         : l4 == 40 ? sum_be(in + 8, 32)
                                    : sum_be(in + 8, 16) + sum_be(final_destination(in, l4), 16);
    uint32_t ip_id = version == 4 ? get16(in + 4) : 0;
    uint32_t seq = get32(in + l4 + 4);
    uint8_t flags = in[l4 + 13];
    Py_ssize_t count = payload ? (payload + mss - 1) / mss : 1;
    out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t at = i * mss;
        Py_ssize_t chunk = payload - at < mss ? payload - at : mss;
        Py_ssize_t total = hlen + chunk;
        PyObject *seg = PyByteArray_FromStringAndSize(NULL, total);
        if (seg == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        uint8_t *s = (uint8_t *)PyByteArray_AS_STRING(seg);
        memcpy(s, in, hlen);
        memcpy(s + hlen, in + hlen + at, chunk);
        if (version == 4) {
            put16(s + 2, (uint32_t)total);
            put16(s + 4, (ip_id + (uint32_t)i) & 0xFFFF);
            put16(s + 10, 0);
            put16(s + 10, field(sum_be(s, l4)));
        } else {
            put16(s + 4, (uint32_t)(total - 40));
        }
        uint32_t sq = seq + (uint32_t)at;
        s[l4 + 4] = (uint8_t)(sq >> 24);
        s[l4 + 5] = (uint8_t)(sq >> 16);
        s[l4 + 6] = (uint8_t)(sq >> 8);
        s[l4 + 7] = (uint8_t)sq;
        uint8_t f = flags;
        if (i)
            f &= (uint8_t)~TCP_CWR;
        if (i != count - 1)
            f &= (uint8_t)~TCP_FIN_PSH;
        s[l4 + 13] = f;
        Py_ssize_t tcp_len = total - l4;
        uint64_t pseudo = (uint64_t)addresses + IPPROTO_TCP_ + (uint64_t)tcp_len;
        if (partial) {
            /* As the kernel leaves it (CHECKSUM_PARTIAL): the pseudo-header's sum, folded. */
            put16(s + l4 + 16, fold(pseudo));
        } else {
            put16(s + l4 + 16, 0);
            put16(s + l4 + 16, field(pseudo + sum_be(s + l4, tcp_len)));
        }
        PyList_SET_ITEM(out, i, seg);
    }
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"split_tso", split_tso, METH_VARARGS,
     "split_tso(packet, l4, mss, partial=False) -> list[bytearray]: as tun.split_tso."},
    {"complete_checksum", complete_checksum, METH_VARARGS,
     "complete_checksum(packet, start, offset) -> bytearray: as tun.complete_checksum."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_segment",
    "TCP segmentation and checksum completion in C (see the file's opening comment).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__segment(void) { return PyModule_Create(&module); }
