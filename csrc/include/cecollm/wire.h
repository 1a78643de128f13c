/* cecollm wire format: frames of a 4-byte big-endian length followed by one msgpack map.
 *
 * Every frame is checked against a fixed schema before anything is allocated for it: the body must
 * fit the negotiated maximum, every count a peer declares must fit the bytes that follow it, nesting
 * is shallow, keys are known, each message type has exactly its required fields with their types,
 * and hidden-state payloads must hold exactly the declared (n, dim) of the declared type. */
#ifndef CECOLLM_WIRE_H
#define CECOLLM_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "cecollm/cecollm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CE_WIRE_VERSION 2         /* 2: the hello carries the model's fingerprint, the split and the dtype */
#define CE_WIRE_HEADER 4          /* bytes of the length prefix */
#define CE_WIRE_SESSION_BYTES 16  /* 128-bit session ids */
#define CE_WIRE_MAX_BLOB 64       /* nonce / MAC */
#define CE_WIRE_MAX_TEXT 256
#define CE_WIRE_MAX_MODEL 64      /* bytes of a model fingerprint, NUL included */
#define CE_WIRE_MAX_SEQ ((uint64_t)INT64_MAX) /* sequence numbers fit a signed 64-bit integer everywhere */

typedef enum {
    CE_MSG_HELLO = 1,     /* client: ver, model, split, dtype           server: REPLY with ver (and nonce) */
    CE_MSG_AUTH = 2,      /* client: mac = HMAC(key, nonce)             server: code (0 ok) */
    CE_MSG_OPEN = 3,      /* client: seq, cap                           server: seq, sid */
    CE_MSG_UPLOAD = 4,    /* client: seq, sid, pos, n, dim, dtype, data  server: seq, pos (= filled length) */
    CE_MSG_INFER = 5,     /* client: seq, sid, pos, n=1, dim, dtype, data */
    CE_MSG_TOKEN = 6,     /* server: seq, pos, token, conf */
    CE_MSG_CLOSE = 7,     /* client: seq, sid                           server: seq */
    CE_MSG_RESUME = 8,    /* client: seq, sid                           server: seq, pos (= positions held) */
    CE_MSG_ERROR = 9,     /* server: seq, code, msg */
    CE_MSG_REPLY = 10,    /* server: generic acknowledgement of OPEN/UPLOAD/CLOSE/RESUME/AUTH */
    CE_MSG_VERIFY = 11,   /* client: as INFER with n >= 1 drafted positions: the cloud's token after each */
    CE_MSG_TOKENS = 12,   /* server: seq, pos (first position), n, data (n int32 little-endian tokens), us */
} ce_msg_type;

#define CE_MSG_TYPE_MAX CE_MSG_TOKENS

/* Error codes of ERROR messages (and REPLY's code: 0). */
typedef enum {
    CE_CODE_OK = 0,
    CE_CODE_BAD_FRAME = 1,       /* the frame broke the schema; the connection closes */
    CE_CODE_AUTH_FAILED = 2,     /* wrong or missing key */
    CE_CODE_UNKNOWN_SESSION = 3, /* never opened, closed or expired */
    CE_CODE_BUSY = 4,            /* a limit is reached (sessions, memory, connections): try later */
    CE_CODE_BAD_POSITION = 5,    /* positions that do not follow what the session holds */
    CE_CODE_BAD_REQUEST = 6,     /* a well-formed request the server cannot apply */
    CE_CODE_STALE_SEQUENCE = 7,  /* a sequence number older than the session's last */
    CE_CODE_SHUTTING_DOWN = 8,
    CE_CODE_MISMATCH = 9,        /* the hello names another model, split or dtype than the server's */
} ce_wire_code;

/* Hidden-state encodings on the wire. */
typedef enum {
    CE_WIRE_F16 = 1,  /* IEEE half per element */
    CE_WIRE_Q8_0 = 2, /* GGML Q8_0 blocks of 32: fp16 scale + 32 int8 (dim % 32 == 0) */
    CE_WIRE_F32 = 3,  /* lossless, for verification: the cloud sees exactly the edge's hidden states */
} ce_wire_dtype;

/* Field presence bits. */
enum {
    CE_F_SEQ = 1 << 0,
    CE_F_SID = 1 << 1,
    CE_F_POS = 1 << 2,
    CE_F_N = 1 << 3,
    CE_F_DIM = 1 << 4,
    CE_F_DTYPE = 1 << 5,
    CE_F_DATA = 1 << 6,
    CE_F_TOKEN = 1 << 7,
    CE_F_CONF = 1 << 8,
    CE_F_CODE = 1 << 9,
    CE_F_MSG = 1 << 10,
    CE_F_NONCE = 1 << 11,
    CE_F_MAC = 1 << 12,
    CE_F_VER = 1 << 13,
    CE_F_CAP = 1 << 14,
    CE_F_US = 1 << 15, /* microseconds of cloud compute behind a reply */
    CE_F_MODEL = 1 << 16, /* the model's fingerprint (text) */
    CE_F_SPLIT = 1 << 17, /* the first layer the cloud runs */
};

typedef struct {
    int type;
    unsigned fields; /* CE_F_* present */
    uint64_t seq;
    uint8_t sid[CE_WIRE_SESSION_BYTES];
    int64_t pos;
    int32_t n, dim, dtype;
    int32_t token;
    float conf;
    int32_t code;
    int32_t ver;
    int64_t cap;
    uint64_t us;
    int32_t split;
    char model[CE_WIRE_MAX_MODEL]; /* NUL-terminated */
    char msg[CE_WIRE_MAX_TEXT]; /* NUL-terminated */
    uint8_t nonce[CE_WIRE_MAX_BLOB];
    size_t nonce_len;
    uint8_t mac[CE_WIRE_MAX_BLOB];
    size_t mac_len;
    uint8_t *data; /* owned copy of the payload (decode) or borrowed (encode) */
    size_t data_len;
} ce_msg;

/* Bytes of a hidden-state payload of n positions × dim, or 0 when the shape does not fit the type. */
size_t ce_wire_hidden_bytes(int dtype, int64_t n, int64_t dim);
ce_status ce_wire_hidden_encode(int dtype, const float *x, int64_t n, int64_t dim, uint8_t *out, char *err,
                                size_t errlen);
ce_status ce_wire_hidden_decode(int dtype, const uint8_t *in, size_t len, int64_t n, int64_t dim, float *out,
                                char *err, size_t errlen);

/* Body length from a 4-byte header; CE_ERANGE when it exceeds max_body or is empty. */
ce_status ce_wire_frame_length(const uint8_t header[CE_WIRE_HEADER], size_t max_body, size_t *body_len, char *err,
                               size_t errlen);

/* A whole frame (header + body) in *out (malloc'ed, caller frees) of *out_len bytes. */
ce_status ce_wire_encode(const ce_msg *msg, uint8_t **out, size_t *out_len, char *err, size_t errlen);

/* Decodes one frame body into msg (zeroed first). On success msg->data, if any, is a malloc'ed copy
 * that ce_msg_clear frees. max_data bounds the payload a message may carry. */
ce_status ce_wire_decode(const uint8_t *body, size_t len, size_t max_data, ce_msg *msg, char *err, size_t errlen);
void ce_msg_clear(ce_msg *msg);

#ifdef __cplusplus
}
#endif
#endif
