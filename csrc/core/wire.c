/* The wire format (see cecollm/wire.h): msgpack-c for the maps, our own bounds first. */
#include "cecollm/wire.h"

#include <math.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"
#include "util.h"

#define MAX_FIELDS 16 /* more keys than the schema has is an error before any parsing */
#define MAX_KEY 8

/* ---- hidden states ---- */

size_t ce_wire_hidden_bytes(int dtype, int64_t n, int64_t dim) {
    if (n <= 0 || dim <= 0 || n > (1 << 20) || dim > (1 << 16)) return 0;
    switch (dtype) {
    case CE_WIRE_F16: return (size_t)n * (size_t)dim * 2;
    case CE_WIRE_F32: return (size_t)n * (size_t)dim * 4;
    case CE_WIRE_Q8_0: return dim % CE_QK ? 0 : (size_t)n * (size_t)(dim / CE_QK) * sizeof(ce_block_q8_0);
    default: return 0;
    }
}

ce_status ce_wire_hidden_encode(int dtype, const float *x, int64_t n, int64_t dim, uint8_t *out, char *err,
                                size_t errlen) {
    if (ce_wire_hidden_bytes(dtype, n, dim) == 0)
        return ce_fail(err, errlen, CE_EINVAL, "cannot encode (%lld, %lld) as wire type %d", (long long)n,
                       (long long)dim, dtype);
    for (int64_t i = 0; i < n * dim; i++)
        if (!isfinite(x[i])) return ce_fail(err, errlen, CE_EINVAL, "hidden state %lld is not finite", (long long)i);
    if (dtype == CE_WIRE_F32) {
        memcpy(out, x, (size_t)(n * dim) * 4);
        return CE_OK;
    }
    if (dtype == CE_WIRE_F16) {
        for (int64_t i = 0; i < n * dim; i++) {
            uint16_t h = ce_fp32_to_fp16(x[i]);
            memcpy(out + 2 * i, &h, 2);
        }
        return CE_OK;
    }
    /* Q8_0: per block of 32, d = max|x| / 127 (stored as fp16), q = round(x / d) */
    for (int64_t b = 0; b < n * dim / CE_QK; b++) {
        const float *xb = x + b * CE_QK;
        ce_block_q8_0 blk;
        float amax = 0.0f;
        for (int j = 0; j < CE_QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        blk.d = ce_fp32_to_fp16(d);
        for (int j = 0; j < CE_QK; j++) blk.qs[j] = (int8_t)lrintf(xb[j] * id);
        memcpy(out + b * sizeof blk, &blk, sizeof blk);
    }
    return CE_OK;
}

ce_status ce_wire_hidden_decode(int dtype, const uint8_t *in, size_t len, int64_t n, int64_t dim, float *out,
                                char *err, size_t errlen) {
    size_t want = ce_wire_hidden_bytes(dtype, n, dim);
    if (want == 0 || want != len)
        return ce_fail(err, errlen, CE_EINVAL, "payload of %zu bytes does not hold (%lld, %lld) of wire type %d", len,
                       (long long)n, (long long)dim, dtype);
    if (dtype == CE_WIRE_F32) {
        memcpy(out, in, len);
    } else if (dtype == CE_WIRE_F16) {
        for (int64_t i = 0; i < n * dim; i++) {
            uint16_t h;
            memcpy(&h, in + 2 * i, 2);
            out[i] = ce_fp16_to_fp32(h);
        }
    } else {
        for (int64_t b = 0; b < n * dim / CE_QK; b++) {
            ce_block_q8_0 blk;
            memcpy(&blk, in + b * sizeof blk, sizeof blk);
            float d = ce_fp16_to_fp32(blk.d);
            for (int j = 0; j < CE_QK; j++) out[b * CE_QK + j] = d * (float)blk.qs[j];
        }
    }
    for (int64_t i = 0; i < n * dim; i++)
        if (!isfinite(out[i])) return ce_fail(err, errlen, CE_EINVAL, "decoded hidden state %lld is not finite", (long long)i);
    return CE_OK;
}

/* ---- frames ---- */

ce_status ce_wire_frame_length(const uint8_t header[CE_WIRE_HEADER], size_t max_body, size_t *body_len, char *err,
                               size_t errlen) {
    uint32_t n = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 | (uint32_t)header[2] << 8 | header[3];
    if (n == 0 || n > max_body)
        return ce_fail(err, errlen, CE_ERANGE, "frame of %u bytes is outside (0, %zu]", n, max_body);
    *body_len = n;
    return CE_OK;
}

/* Bytes the data field must hold: n int32 tokens in TOKENS, else n hidden states of (dim, dtype). */
static size_t payload_bytes(const ce_msg *m) {
    if (m->type == CE_MSG_TOKENS) return m->n > 0 ? (size_t)m->n * 4 : 0;
    return ce_wire_hidden_bytes(m->dtype, m->n, m->dim);
}

/* ---- schema ---- */

typedef struct {
    const char *name;
    unsigned bit;
} field_name;

static const field_name FIELDS[] = {
    {"seq", CE_F_SEQ},   {"sid", CE_F_SID},   {"pos", CE_F_POS},     {"n", CE_F_N},       {"dim", CE_F_DIM},
    {"dtype", CE_F_DTYPE}, {"data", CE_F_DATA}, {"token", CE_F_TOKEN}, {"conf", CE_F_CONF}, {"code", CE_F_CODE},
    {"msg", CE_F_MSG},   {"nonce", CE_F_NONCE}, {"mac", CE_F_MAC},   {"ver", CE_F_VER},   {"cap", CE_F_CAP},
    {"us", CE_F_US},     {"model", CE_F_MODEL}, {"split", CE_F_SPLIT},
};
#define N_FIELDS (sizeof FIELDS / sizeof FIELDS[0])

#define HIDDEN (CE_F_SEQ | CE_F_SID | CE_F_POS | CE_F_N | CE_F_DIM | CE_F_DTYPE | CE_F_DATA)

/* required and allowed fields per message type (index = type) */
static const struct {
    unsigned required, allowed;
} SCHEMA[CE_MSG_TYPE_MAX + 1] = {
    [CE_MSG_HELLO] = {CE_F_VER | CE_F_MODEL | CE_F_SPLIT | CE_F_DTYPE, CE_F_VER | CE_F_MODEL | CE_F_SPLIT | CE_F_DTYPE},
    [CE_MSG_AUTH] = {CE_F_MAC, CE_F_MAC},
    [CE_MSG_OPEN] = {CE_F_SEQ, CE_F_SEQ | CE_F_CAP},
    [CE_MSG_UPLOAD] = {HIDDEN, HIDDEN},
    [CE_MSG_INFER] = {HIDDEN, HIDDEN},
    [CE_MSG_TOKEN] = {CE_F_SEQ | CE_F_POS | CE_F_TOKEN, CE_F_SEQ | CE_F_POS | CE_F_TOKEN | CE_F_CONF | CE_F_US},
    [CE_MSG_CLOSE] = {CE_F_SEQ | CE_F_SID, CE_F_SEQ | CE_F_SID},
    [CE_MSG_RESUME] = {CE_F_SEQ | CE_F_SID, CE_F_SEQ | CE_F_SID},
    [CE_MSG_ERROR] = {CE_F_CODE | CE_F_MSG, CE_F_CODE | CE_F_MSG | CE_F_SEQ},
    [CE_MSG_REPLY] = {CE_F_CODE, CE_F_CODE | CE_F_SEQ | CE_F_SID | CE_F_POS | CE_F_NONCE | CE_F_VER | CE_F_CAP},
    [CE_MSG_VERIFY] = {HIDDEN, HIDDEN},
    [CE_MSG_TOKENS] = {CE_F_SEQ | CE_F_POS | CE_F_N | CE_F_DATA, CE_F_SEQ | CE_F_POS | CE_F_N | CE_F_DATA | CE_F_US},
};

/* Reads a big-endian unsigned of `bytes` bytes at p[*off]; 0 when it does not fit. */
static int read_be(const uint8_t *p, size_t len, size_t *off, int bytes, uint64_t *v) {
    if (len - *off < (size_t)bytes) return 0;
    *v = 0;
    for (int i = 0; i < bytes; i++) *v = *v << 8 | p[*off + i];
    *off += bytes;
    return 1;
}

/* Skips one scalar, string or binary object, checking that what it declares fits the bytes left.
 * Containers and extension types are not part of the schema and are rejected. kind receives
 * 's' (string), 'b' (binary) or 'v' (other scalar); str_len the string length. */
static int prescan_value(const uint8_t *p, size_t len, size_t *off, char *kind, uint64_t *str_len) {
    if (*off >= len) return 0;
    uint8_t t = p[(*off)++];
    uint64_t n = 0;
    *kind = 'v';
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) return 1; /* fixint, nil, bool */
    if (t >= 0xa0 && t <= 0xbf) {
        n = t & 0x1f;
        *kind = 's';
    } else {
        switch (t) {
        case 0xca: n = 4; break; /* float32 */
        case 0xcb: n = 8; break; /* float64 */
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: n = 4; break;
        case 0xcf: case 0xd3: n = 8; break;
        case 0xd9: *kind = 's'; if (!read_be(p, len, off, 1, &n)) return 0; break;
        case 0xda: *kind = 's'; if (!read_be(p, len, off, 2, &n)) return 0; break;
        case 0xdb: *kind = 's'; if (!read_be(p, len, off, 4, &n)) return 0; break;
        case 0xc4: *kind = 'b'; if (!read_be(p, len, off, 1, &n)) return 0; break;
        case 0xc5: *kind = 'b'; if (!read_be(p, len, off, 2, &n)) return 0; break;
        case 0xc6: *kind = 'b'; if (!read_be(p, len, off, 4, &n)) return 0; break;
        default: return 0; /* containers, ext, 0xc1 */
        }
    }
    if (n > len - *off) return 0;
    *off += n;
    *str_len = n;
    return 1;
}

/* The frame is one map of at most MAX_FIELDS short string keys to scalar values, with nothing after it. */
static ce_status prescan(const uint8_t *p, size_t len, char *err, size_t errlen) {
    size_t off = 0;
    uint64_t count;
    if (len == 0) return ce_fail(err, errlen, CE_EINVAL, "empty frame");
    uint8_t t = p[off++];
    if (t >= 0x80 && t <= 0x8f)
        count = t & 0x0f;
    else if (t == 0xde) {
        if (!read_be(p, len, &off, 2, &count)) return ce_fail(err, errlen, CE_EINVAL, "truncated map header");
    } else if (t == 0xdf) {
        if (!read_be(p, len, &off, 4, &count)) return ce_fail(err, errlen, CE_EINVAL, "truncated map header");
    } else
        return ce_fail(err, errlen, CE_EINVAL, "frame is not a msgpack map (first byte 0x%02x)", t);
    if (count > MAX_FIELDS || 2 * count > len - off)
        return ce_fail(err, errlen, CE_EINVAL, "map declares %llu fields (at most %d, and no more than the bytes left)",
                       (unsigned long long)count, MAX_FIELDS);
    for (uint64_t i = 0; i < count; i++) {
        char kind;
        uint64_t n = 0;
        if (!prescan_value(p, len, &off, &kind, &n) || kind != 's' || n > MAX_KEY)
            return ce_fail(err, errlen, CE_EINVAL, "field %llu: key is not a short string", (unsigned long long)i);
        if (!prescan_value(p, len, &off, &kind, &n))
            return ce_fail(err, errlen, CE_EINVAL, "field %llu: value is truncated or not a scalar", (unsigned long long)i);
    }
    if (off != len) return ce_fail(err, errlen, CE_EINVAL, "%zu bytes after the map", len - off);
    return CE_OK;
}

static int as_uint(const msgpack_object *o, uint64_t max, uint64_t *v) {
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > max) return 0;
    *v = o->via.u64;
    return 1;
}

static int as_int(const msgpack_object *o, int64_t min, int64_t max, int64_t *v) {
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= (uint64_t)max) *v = (int64_t)o->via.u64;
    else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) *v = o->via.i64;
    else return 0;
    return *v >= min && *v <= max;
}

static int as_bin(const msgpack_object *o, size_t max, const char **ptr, size_t *n) {
    if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size > max) return 0;
    *ptr = o->via.bin.ptr;
    *n = o->via.bin.size;
    return 1;
}

static ce_status decode_field(ce_msg *m, unsigned bit, const msgpack_object *v, size_t max_data, char *err,
                              size_t errlen) {
    uint64_t u = 0;
    int64_t i = 0;
    const char *b = NULL;
    size_t n = 0;
    int ok = 1;
    switch (bit) {
    case CE_F_SEQ: ok = as_uint(v, CE_WIRE_MAX_SEQ, &m->seq); break;
    case CE_F_SPLIT: ok = as_uint(v, (1u << 16), &u); m->split = (int32_t)u; break;
    case CE_F_MODEL:
        ok = v->type == MSGPACK_OBJECT_STR && v->via.str.size < CE_WIRE_MAX_MODEL;
        if (ok) {
            memcpy(m->model, v->via.str.ptr, v->via.str.size);
            m->model[v->via.str.size] = 0;
        }
        break;
    case CE_F_SID:
        ok = as_bin(v, CE_WIRE_SESSION_BYTES, &b, &n) && n == CE_WIRE_SESSION_BYTES;
        if (ok) memcpy(m->sid, b, n);
        break;
    case CE_F_POS: ok = as_uint(v, (1u << 24), &u); m->pos = (int64_t)u; break;
    case CE_F_N: ok = as_uint(v, (1u << 20), &u) && u >= 1; m->n = (int32_t)u; break;
    case CE_F_DIM: ok = as_uint(v, (1u << 16), &u) && u >= 1; m->dim = (int32_t)u; break;
    case CE_F_DTYPE: ok = as_uint(v, CE_WIRE_F32, &u) && u >= CE_WIRE_F16; m->dtype = (int32_t)u; break;
    case CE_F_TOKEN: ok = as_int(v, 0, INT32_MAX, &i); m->token = (int32_t)i; break;
    case CE_F_CODE: ok = as_int(v, INT32_MIN, INT32_MAX, &i); m->code = (int32_t)i; break;
    case CE_F_VER: ok = as_int(v, 0, INT32_MAX, &i); m->ver = (int32_t)i; break;
    case CE_F_CAP: ok = as_uint(v, (1u << 24), &u); m->cap = (int64_t)u; break;
    case CE_F_US: ok = as_uint(v, UINT64_MAX, &m->us); break;
    case CE_F_CONF:
        ok = v->type == MSGPACK_OBJECT_FLOAT32 || v->type == MSGPACK_OBJECT_FLOAT64;
        m->conf = ok ? (float)v->via.f64 : 0.0f;
        ok = ok && isfinite(m->conf);
        break;
    case CE_F_MSG:
        ok = v->type == MSGPACK_OBJECT_STR && v->via.str.size < CE_WIRE_MAX_TEXT;
        if (ok) {
            memcpy(m->msg, v->via.str.ptr, v->via.str.size);
            m->msg[v->via.str.size] = 0;
        }
        break;
    case CE_F_NONCE:
        ok = as_bin(v, CE_WIRE_MAX_BLOB, &b, &n);
        if (ok) memcpy(m->nonce, b, m->nonce_len = n);
        break;
    case CE_F_MAC:
        ok = as_bin(v, CE_WIRE_MAX_BLOB, &b, &n);
        if (ok) memcpy(m->mac, b, m->mac_len = n);
        break;
    case CE_F_DATA:
        ok = as_bin(v, max_data, &b, &n) && n > 0;
        if (ok) { /* copied out: bin payloads inside a frame are unaligned */
            m->data = malloc(n);
            if (m->data == NULL) return ce_fail(err, errlen, CE_ENOMEM, "out of memory for a %zu-byte payload", n);
            memcpy(m->data, b, n);
            m->data_len = n;
        }
        break;
    }
    return ok ? CE_OK : CE_EINVAL;
}

ce_status ce_wire_decode(const uint8_t *body, size_t len, size_t max_data, ce_msg *m, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    ce_status st = prescan(body, len, err, errlen);
    if (st != CE_OK) return st;
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    if (msgpack_unpack_next(&up, (const char *)body, len, &off) != MSGPACK_UNPACK_SUCCESS ||
        up.data.type != MSGPACK_OBJECT_MAP) {
        msgpack_unpacked_destroy(&up);
        return ce_fail(err, errlen, CE_EINVAL, "frame is not a valid msgpack map");
    }
    const msgpack_object_map *map = &up.data.via.map;
    int have_type = 0;
    for (uint32_t k = 0; k < map->size && st == CE_OK; k++) {
        const msgpack_object_str *key = &map->ptr[k].key.via.str;
        const msgpack_object *val = &map->ptr[k].val;
        if (key->size == 4 && memcmp(key->ptr, "type", 4) == 0) {
            uint64_t t;
            if (have_type || !as_uint(val, CE_MSG_TYPE_MAX, &t) || t == 0)
                st = ce_fail(err, errlen, CE_EINVAL, "bad or repeated message type");
            m->type = (int)t;
            have_type = 1;
            continue;
        }
        unsigned bit = 0;
        for (size_t f = 0; f < N_FIELDS; f++)
            if (strlen(FIELDS[f].name) == key->size && memcmp(FIELDS[f].name, key->ptr, key->size) == 0) bit = FIELDS[f].bit;
        if (bit == 0) {
            st = ce_fail(err, errlen, CE_EINVAL, "unknown field '%.*s'", (int)(key->size < 16 ? key->size : 16), key->ptr);
        } else if (m->fields & bit) {
            st = ce_fail(err, errlen, CE_EINVAL, "field '%.*s' repeated", (int)key->size, key->ptr);
        } else if ((st = decode_field(m, bit, val, max_data, err, errlen)) == CE_EINVAL) {
            ce_fail(err, errlen, CE_EINVAL, "field '%.*s' has a bad type or value", (int)key->size, key->ptr);
        }
        m->fields |= bit;
    }
    msgpack_unpacked_destroy(&up);
    if (st == CE_OK && !have_type) st = ce_fail(err, errlen, CE_EINVAL, "message has no type");
    if (st == CE_OK) {
        unsigned missing = SCHEMA[m->type].required & ~m->fields, extra = m->fields & ~SCHEMA[m->type].allowed;
        if (missing || extra)
            st = ce_fail(err, errlen, CE_EINVAL, "message type %d: fields 0x%x missing, 0x%x not allowed", m->type,
                         missing, extra);
    }
    if (st == CE_OK && (m->fields & CE_F_DATA) && m->data_len != payload_bytes(m))
        st = ce_fail(err, errlen, CE_EINVAL, "payload of %zu bytes does not hold (%d, %d) of wire type %d", m->data_len,
                     m->n, m->dim, m->dtype);
    if (st != CE_OK) ce_msg_clear(m);
    return st;
}

void ce_msg_clear(ce_msg *m) {
    free(m->data);
    m->data = NULL;
    m->data_len = 0;
}

/* ---- encoding ---- */

/* Each returns nonzero when the buffer could not grow. */
static int pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    return msgpack_pack_str(pk, n) | msgpack_pack_str_body(pk, s, n);
}

static int pack_bin(msgpack_packer *pk, const void *p, size_t n) {
    return msgpack_pack_bin(pk, n) | msgpack_pack_bin_body(pk, p, n);
}

ce_status ce_wire_encode(const ce_msg *m, uint8_t **out, size_t *out_len, char *err, size_t errlen) {
    *out = NULL;
    *out_len = 0;
    if (m->type < 1 || m->type > CE_MSG_TYPE_MAX)
        return ce_fail(err, errlen, CE_EINVAL, "unknown message type %d", m->type);
    unsigned missing = SCHEMA[m->type].required & ~m->fields, extra = m->fields & ~SCHEMA[m->type].allowed;
    if (missing || extra)
        return ce_fail(err, errlen, CE_EINVAL, "message type %d: fields 0x%x missing, 0x%x not allowed", m->type,
                       missing, extra);
    if ((m->fields & CE_F_DATA) && m->data_len != payload_bytes(m))
        return ce_fail(err, errlen, CE_EINVAL, "payload of %zu bytes does not hold (%d, %d) of wire type %d",
                       m->data_len, m->n, m->dim, m->dtype);
    if (m->nonce_len > CE_WIRE_MAX_BLOB || m->mac_len > CE_WIRE_MAX_BLOB || strlen(m->msg) >= CE_WIRE_MAX_TEXT ||
        memchr(m->model, 0, CE_WIRE_MAX_MODEL) == NULL)
        return ce_fail(err, errlen, CE_EINVAL, "nonce, mac, model or text too long");
    if (m->seq > CE_WIRE_MAX_SEQ || m->split < 0 || m->split > (1 << 16))
        return ce_fail(err, errlen, CE_EINVAL, "sequence number or split out of range");

    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    /* 4 placeholder bytes for the length prefix */
    int bad = msgpack_sbuffer_write(&sb, "\0\0\0\0", CE_WIRE_HEADER);
    unsigned count = 1;
    for (size_t f = 0; f < N_FIELDS; f++) count += (m->fields & FIELDS[f].bit) != 0;
    bad |= msgpack_pack_map(&pk, count) | pack_str(&pk, "type") | msgpack_pack_uint32(&pk, (uint32_t)m->type);
    for (size_t f = 0; f < N_FIELDS; f++) {
        unsigned bit = FIELDS[f].bit;
        if (!(m->fields & bit)) continue;
        bad |= pack_str(&pk, FIELDS[f].name);
        switch (bit) {
        case CE_F_SEQ: bad |= msgpack_pack_uint64(&pk, m->seq); break;
        case CE_F_SID: bad |= pack_bin(&pk, m->sid, CE_WIRE_SESSION_BYTES); break;
        case CE_F_POS: bad |= msgpack_pack_uint64(&pk, (uint64_t)m->pos); break;
        case CE_F_N: bad |= msgpack_pack_uint32(&pk, (uint32_t)m->n); break;
        case CE_F_DIM: bad |= msgpack_pack_uint32(&pk, (uint32_t)m->dim); break;
        case CE_F_DTYPE: bad |= msgpack_pack_uint32(&pk, (uint32_t)m->dtype); break;
        case CE_F_DATA: bad |= pack_bin(&pk, m->data, m->data_len); break;
        case CE_F_TOKEN: bad |= msgpack_pack_int32(&pk, m->token); break;
        case CE_F_CONF: bad |= msgpack_pack_float(&pk, m->conf); break;
        case CE_F_CODE: bad |= msgpack_pack_int32(&pk, m->code); break;
        case CE_F_MSG: bad |= pack_str(&pk, m->msg); break;
        case CE_F_NONCE: bad |= pack_bin(&pk, m->nonce, m->nonce_len); break;
        case CE_F_MAC: bad |= pack_bin(&pk, m->mac, m->mac_len); break;
        case CE_F_VER: bad |= msgpack_pack_int32(&pk, m->ver); break;
        case CE_F_CAP: bad |= msgpack_pack_uint64(&pk, (uint64_t)m->cap); break;
        case CE_F_US: bad |= msgpack_pack_fix_uint64(&pk, m->us); break; /* fixed width: frame sizes never depend on timing */
        case CE_F_MODEL: bad |= pack_str(&pk, m->model); break;
        case CE_F_SPLIT: bad |= msgpack_pack_uint32(&pk, (uint32_t)m->split); break;
        }
    }
    if (bad || sb.data == NULL || sb.size > UINT32_MAX + (size_t)CE_WIRE_HEADER) {
        msgpack_sbuffer_destroy(&sb);
        return ce_fail(err, errlen, CE_ENOMEM, "could not encode the frame");
    }
    uint32_t body = (uint32_t)(sb.size - CE_WIRE_HEADER);
    uint8_t *p = (uint8_t *)sb.data;
    p[0] = (uint8_t)(body >> 24), p[1] = (uint8_t)(body >> 16), p[2] = (uint8_t)(body >> 8), p[3] = (uint8_t)body;
    *out = p; /* msgpack_sbuffer's storage is malloc'ed: the caller frees it */
    *out_len = sb.size;
    return CE_OK;
}
