/* Quantized block formats, conversion and the scalar (_generic) dot-product kernels.
 * The _generic kernels are the specification; SIMD kernels in csrc/arch must agree with them. */
#include "quant.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "util.h"

/* ---- IEEE half precision ---- */

float ce_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf / nan */
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t ce_fp32_to_fp16(float f) { /* round to nearest even */
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return (uint16_t)(sign | 0x7c00u);
    if (absx < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (absx < 0x33000000u) return (uint16_t)sign;
        uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(absx >> 23); /* 14..24 */
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((absx >> 13) - ((127 - 15) << 10));
    uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

/* ---- sizes ---- */

size_t ce_row_bytes(int type, int64_t cols) {
    if (cols <= 0) return 0;
    switch (type) {
    case CE_TYPE_F32: return (size_t)cols * 4;
    case CE_TYPE_F16: return (size_t)cols * 2;
    case CE_TYPE_Q4_0: return cols % CE_QK ? 0 : (size_t)(cols / CE_QK) * sizeof(ce_block_q4_0);
    case CE_TYPE_Q4_1: return cols % CE_QK ? 0 : (size_t)(cols / CE_QK) * sizeof(ce_block_q4_1);
    case CE_TYPE_Q8_0: return cols % CE_QK ? 0 : (size_t)(cols / CE_QK) * sizeof(ce_block_q8_0);
    case CE_TYPE_Q5_0: return cols % CE_QK ? 0 : (size_t)(cols / CE_QK) * sizeof(ce_block_q5_0);
    case CE_TYPE_Q5_1: return cols % CE_QK ? 0 : (size_t)(cols / CE_QK) * sizeof(ce_block_q5_1);
    case CE_TYPE_Q4_K: return cols % CE_QK_K ? 0 : (size_t)(cols / CE_QK_K) * sizeof(ce_block_q4_k);
    case CE_TYPE_Q5_K: return cols % CE_QK_K ? 0 : (size_t)(cols / CE_QK_K) * sizeof(ce_block_q5_k);
    case CE_TYPE_Q6_K: return cols % CE_QK_K ? 0 : (size_t)(cols / CE_QK_K) * sizeof(ce_block_q6_k);
    default: return 0;
    }
}

const char *ce_type_name(int type) {
    switch (type) {
    case CE_TYPE_F32: return "F32";
    case CE_TYPE_F16: return "F16";
    case CE_TYPE_Q4_0: return "Q4_0";
    case CE_TYPE_Q4_1: return "Q4_1";
    case CE_TYPE_Q8_0: return "Q8_0";
    case CE_TYPE_Q5_0: return "Q5_0";
    case CE_TYPE_Q5_1: return "Q5_1";
    case CE_TYPE_Q4_K: return "Q4_K";
    case CE_TYPE_Q5_K: return "Q5_K";
    case CE_TYPE_Q6_K: return "Q6_K";
    default: return "unknown";
    }
}

/* ---- dequantization: value = d * (q - 8) | d * q + m | d * q ---- */

/* A Q5_0 / Q5_1 block's 32 quants q_j = nibble | (bit j of qh) << 4 (elements 0-15 in the low
 * nibbles, 16-31 in the high ones) and its d and m (0 for Q5_0). */
static void q5_block(const uint8_t *b, int q51, int q[CE_QK], float *d, float *m) {
    uint16_t dh, mh = 0;
    uint32_t qh;
    memcpy(&dh, b, 2);
    if (q51) memcpy(&mh, b + 2, 2);
    memcpy(&qh, b + (q51 ? 4 : 2), 4);
    const uint8_t *qs = b + (q51 ? 8 : 6);
    for (int j = 0; j < CE_QK / 2; j++) {
        q[j] = (qs[j] & 0x0f) | (int)((qh >> j) << 4 & 0x10);
        q[j + CE_QK / 2] = (qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10);
    }
    *d = ce_fp16_to_fp32(dh);
    *m = ce_fp16_to_fp32(mh);
}

void ce_dequantize_row(const ce_tensor *w, int64_t row, float *out) {
    const int64_t nb = w->cols / CE_QK;
    const uint8_t *p = (const uint8_t *)w->data + (size_t)row * ce_row_bytes(w->type, w->cols);
    switch (w->type) {
    case CE_TYPE_F32: memcpy(out, p, (size_t)w->cols * 4); break;
    case CE_TYPE_F16: {
        const uint16_t *h = (const uint16_t *)p;
        for (int64_t j = 0; j < w->cols; j++) out[j] = ce_fp16_to_fp32(h[j]);
        break;
    }
    case CE_TYPE_Q4_0: {
        const ce_block_q4_0 *b = (const ce_block_q4_0 *)p;
        for (int64_t i = 0; i < nb; i++) {
            float d = ce_fp16_to_fp32(b[i].d);
            for (int j = 0; j < CE_QK / 2; j++) { /* low nibbles: elements 0..15, high: 16..31 */
                out[i * CE_QK + j] = d * (float)((b[i].qs[j] & 0x0f) - 8);
                out[i * CE_QK + j + CE_QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
            }
        }
        break;
    }
    case CE_TYPE_Q4_1: {
        const ce_block_q4_1 *b = (const ce_block_q4_1 *)p;
        for (int64_t i = 0; i < nb; i++) {
            float d = ce_fp16_to_fp32(b[i].d), m = ce_fp16_to_fp32(b[i].m);
            for (int j = 0; j < CE_QK / 2; j++) {
                out[i * CE_QK + j] = d * (float)(b[i].qs[j] & 0x0f) + m;
                out[i * CE_QK + j + CE_QK / 2] = d * (float)(b[i].qs[j] >> 4) + m;
            }
        }
        break;
    }
    case CE_TYPE_Q8_0: {
        const ce_block_q8_0 *b = (const ce_block_q8_0 *)p;
        for (int64_t i = 0; i < nb; i++) {
            float d = ce_fp16_to_fp32(b[i].d);
            for (int j = 0; j < CE_QK; j++) out[i * CE_QK + j] = d * (float)b[i].qs[j];
        }
        break;
    }
    case CE_TYPE_Q5_0:
    case CE_TYPE_Q5_1: {
        const int q51 = w->type == CE_TYPE_Q5_1;
        const size_t stride = q51 ? sizeof(ce_block_q5_1) : sizeof(ce_block_q5_0);
        for (int64_t i = 0; i < nb; i++) {
            int q[CE_QK];
            float d, m;
            q5_block(p + (size_t)i * stride, q51, q, &d, &m);
            for (int j = 0; j < CE_QK; j++) out[i * CE_QK + j] = q51 ? d * (float)q[j] + m : d * (float)(q[j] - 16);
        }
        break;
    }
    case CE_TYPE_Q4_K:
    case CE_TYPE_Q5_K: { /* 8 sub-blocks of 32: x = (d scale) q - (dmin min), q of 4 (+1) bits */
        const int q5 = w->type == CE_TYPE_Q5_K;
        const size_t stride = q5 ? sizeof(ce_block_q5_k) : sizeof(ce_block_q4_k);
        for (int64_t i = 0; i < w->cols / CE_QK_K; i++) {
            const uint8_t *b = p + (size_t)i * stride;
            const ce_block_q5_k *k5 = (const ce_block_q5_k *)b;
            const ce_block_q4_k *k4 = (const ce_block_q4_k *)b;
            const float d = ce_fp16_to_fp32(k4->d), dmin = ce_fp16_to_fp32(k4->dmin);
            float *y = out + i * CE_QK_K;
            for (int s = 0; s < 8; s++) {
                int scale, min;
                ce_k_scale_min(k4->scales, s, &scale, &min);
                const float ds = d * (float)scale, ms = dmin * (float)min;
                for (int l = 0; l < 32; l++)
                    y[32 * s + l] = ds * (float)ce_k_quant(q5 ? k5->qs : k4->qs, q5 ? k5->qh : NULL, s, l) - ms;
            }
        }
        break;
    }
    case CE_TYPE_Q6_K: { /* 16 sub-blocks of 16: x = (d scale) (q - 32), q of 6 bits */
        const ce_block_q6_k *b = (const ce_block_q6_k *)p;
        for (int64_t i = 0; i < w->cols / CE_QK_K; i++) {
            const float d = ce_fp16_to_fp32(b[i].d);
            for (int e = 0; e < CE_QK_K; e++)
                out[i * CE_QK_K + e] = d * (float)b[i].scales[e / 16] * (float)(ce_q6_k_quant(&b[i], e) - 32);
        }
        break;
    }
    default: break; /* ce_model_init rejects unknown types before any kernel runs */
    }
}

/* ---- quantization: ggml's reference rounding, bit for bit (gguf's numpy quantizers agree) ---- */

static void quantize_block_q4_0(const float *x, ce_block_q4_0 *b) {
    float max = 0.0f, amax = 0.0f; /* the element of largest magnitude, with its sign */
    for (int j = 0; j < CE_QK; j++)
        if (fabsf(x[j]) > amax) amax = fabsf(x[j]), max = x[j];
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < CE_QK / 2; j++) { /* q = trunc(x / d + 8.5) in [0, 15] */
        int lo = (int)(x[j] * id + 8.5f), hi = (int)(x[j + CE_QK / 2] * id + 8.5f);
        b->qs[j] = (uint8_t)((lo > 15 ? 15 : lo) | (hi > 15 ? 15 : hi) << 4);
    }
    b->d = ce_fp32_to_fp16(d);
}

static void quantize_block_q4_1(const float *x, ce_block_q4_1 *b) {
    float min = x[0], max = x[0];
    for (int j = 1; j < CE_QK; j++) min = x[j] < min ? x[j] : min, max = x[j] > max ? x[j] : max;
    const float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < CE_QK / 2; j++) { /* q = trunc((x - min) / d + 0.5) in [0, 15] */
        int lo = (int)((x[j] - min) * id + 0.5f), hi = (int)((x[j + CE_QK / 2] - min) * id + 0.5f);
        b->qs[j] = (uint8_t)((lo > 15 ? 15 : lo) | (hi > 15 ? 15 : hi) << 4);
    }
    b->d = ce_fp32_to_fp16(d);
    b->m = ce_fp32_to_fp16(min);
}

static void quantize_block_q8_0(const float *x, ce_block_q8_0 *b) {
    float amax = 0.0f;
    for (int j = 0; j < CE_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < CE_QK; j++) b->qs[j] = (int8_t)roundf(x[j] * id); /* ties away from zero */
    b->d = ce_fp32_to_fp16(d);
}

ce_status ce_quantize_rows(int type, const float *x, int64_t rows, int64_t cols, void *out, char *err, size_t errlen) {
    const size_t row_bytes = ce_row_bytes(type, cols);
    if (row_bytes == 0 || rows < 0)
        return ce_fail(err, errlen, CE_EINVAL, "cannot quantize %lld x %lld to %s", (long long)rows, (long long)cols,
                       ce_type_name(type));
    for (int64_t i = 0; i < rows * cols; i++)
        if (!isfinite(x[i]))
            return ce_fail(err, errlen, CE_EINVAL, "element %lld of row %lld is not finite", (long long)(i % cols),
                           (long long)(i / cols));
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        uint8_t *o = (uint8_t *)out + (size_t)r * row_bytes;
        for (int64_t i = 0; i < (type == CE_TYPE_F32 || type == CE_TYPE_F16 ? 0 : cols / CE_QK); i++) {
            if (type == CE_TYPE_Q4_0) quantize_block_q4_0(xr + i * CE_QK, (ce_block_q4_0 *)o + i);
            if (type == CE_TYPE_Q4_1) quantize_block_q4_1(xr + i * CE_QK, (ce_block_q4_1 *)o + i);
            if (type == CE_TYPE_Q8_0) quantize_block_q8_0(xr + i * CE_QK, (ce_block_q8_0 *)o + i);
        }
        if (type == CE_TYPE_F32) memcpy(o, xr, row_bytes);
        if (type == CE_TYPE_F16)
            for (int64_t j = 0; j < cols; j++) ((uint16_t *)o)[j] = ce_fp32_to_fp16(xr[j]);
    }
    return CE_OK;
}

/* w (rows, cols) += up (rows, rank) · down (rank, cols), each sum in a fixed order (k ascending, in
 * float, no fused multiply-add: the build is ISO C11, so contraction is off): the same inputs give
 * the same bits on any machine. */
void ce_add_lowrank(float *w, int64_t rows, int64_t cols, const float *up, const float *down, int64_t rank) {
    enum { CHUNK = 256 };
    float acc[CHUNK];
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j0 = 0; j0 < cols; j0 += CHUNK) { /* acc[j] = Σ_k up[i,k] down[k,j], k ascending */
            const int64_t n = cols - j0 < CHUNK ? cols - j0 : CHUNK;
            for (int64_t j = 0; j < n; j++) acc[j] = 0.0f;
            for (int64_t k = 0; k < rank; k++) {
                const float u = up[i * rank + k];
                const float *d = down + k * cols + j0;
                for (int64_t j = 0; j < n; j++) acc[j] += u * d[j];
            }
            for (int64_t j = 0; j < n; j++) w[i * cols + j0 + j] += acc[j];
        }
}

/* ---- fp32 activations (the specification) ---- */

/* Each weight row dequantized into the panel, then every output summed in column order. */
static void matmul_f32_generic(int type, const void *w, size_t row_bytes, int64_t rows, int64_t cols, const float *x,
                               int n, float *y, int64_t ldy, float *panel) {
    const ce_tensor tile = {w, type, cols, rows};
    for (int64_t r = 0; r < rows; r++) ce_dequantize_row(&tile, r, panel + r * cols);
    for (int i = 0; i < n; i++)
        for (int64_t r = 0; r < rows; r++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < cols; j++) sum += panel[r * cols + j] * x[(size_t)i * cols + j];
            y[(size_t)i * ldy + r] = sum;
        }
}


/* ---- 8-bit activations and integer dot products (the specification) ---- */

/* d = amax / 127, q = nearest(x / d) computed as x * (1 / d), ties to even: the SIMD kernels perform
 * the same float operations, so they produce the same blocks bit for bit. */
static void quantize_q8a_generic(const float *x, ce_block_q8a *out, int64_t cols) {
    for (int64_t i = 0; i < cols / CE_QK; i++, x += CE_QK) {
        float amax = 0.0f;
        for (int j = 0; j < CE_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < CE_QK; j++) {
            float v = nearbyintf(x[j] * id); /* |v| <= 127 for finite x; NaN maps to 0 */
            int8_t q = (int8_t)(v >= -127.0f && v <= 127.0f ? v : 0.0f);
            out[i].qs[j] = q;
            sum += q;
        }
        out[i].d = d;
        out[i].s = d * (float)sum;
    }
}

/* Σ_blocks d_w d_x Σ_j (q_j - 8) y_j */
static float vec_dot_q4_0_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q4_0 *w = wrow;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / CE_QK; i++) {
        int32_t acc = 0;
        for (int j = 0; j < CE_QK / 2; j++)
            acc += ((w[i].qs[j] & 0x0f) - 8) * x[i].qs[j] + ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + CE_QK / 2];
        sum += ce_fp16_to_fp32(w[i].d) * x[i].d * (float)acc;
    }
    return sum;
}

/* Σ_blocks d_w d_x Σ_j q_j y_j + m_w s_x */
static float vec_dot_q4_1_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q4_1 *w = wrow;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / CE_QK; i++) {
        int32_t acc = 0;
        for (int j = 0; j < CE_QK / 2; j++)
            acc += (w[i].qs[j] & 0x0f) * x[i].qs[j] + (w[i].qs[j] >> 4) * x[i].qs[j + CE_QK / 2];
        sum += ce_fp16_to_fp32(w[i].d) * x[i].d * (float)acc + ce_fp16_to_fp32(w[i].m) * x[i].s;
    }
    return sum;
}

/* Σ_blocks d_w d_x Σ_j q_j y_j */
static float vec_dot_q8_0_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q8_0 *w = wrow;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / CE_QK; i++) {
        int32_t acc = 0;
        for (int j = 0; j < CE_QK; j++) acc += w[i].qs[j] * x[i].qs[j];
        sum += ce_fp16_to_fp32(w[i].d) * x[i].d * (float)acc;
    }
    return sum;
}

/* Q5_0: Σ_blocks d_w d_x Σ_j (q_j - 16) y_j; Q5_1: Σ_blocks d_w d_x Σ_j q_j y_j + m_w s_x */
static float vec_dot_q5_q8a_generic(const uint8_t *b, int q51, const ce_block_q8a *x, int64_t n) {
    const size_t stride = q51 ? sizeof(ce_block_q5_1) : sizeof(ce_block_q5_0);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / CE_QK; i++, b += stride) {
        int q[CE_QK];
        float d, m;
        q5_block(b, q51, q, &d, &m);
        int32_t acc = 0;
        for (int j = 0; j < CE_QK; j++) acc += (q51 ? q[j] : q[j] - 16) * x[i].qs[j];
        sum += d * x[i].d * (float)acc + (q51 ? m * x[i].s : 0.0f);
    }
    return sum;
}

static float vec_dot_q5_0_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    return vec_dot_q5_q8a_generic(wrow, 0, x, n);
}

static float vec_dot_q5_1_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    return vec_dot_q5_q8a_generic(wrow, 1, x, n);
}

/* Q4_K / Q5_K, one activation block per sub-block: Σ_sub-blocks (d scale_s) d_x Σ_j q_j y_j - (dmin min_s) s_x */
static float vec_dot_k_q8a_generic(const uint8_t *b, int q5, const ce_block_q8a *x, int64_t n) {
    const size_t stride = q5 ? sizeof(ce_block_q5_k) : sizeof(ce_block_q4_k);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / CE_QK_K; i++, b += stride, x += CE_QK_K / CE_QK) {
        const ce_block_q4_k *k4 = (const ce_block_q4_k *)b;
        const ce_block_q5_k *k5 = (const ce_block_q5_k *)b;
        const float d = ce_fp16_to_fp32(k4->d), dmin = ce_fp16_to_fp32(k4->dmin);
        for (int s = 0; s < 8; s++) {
            int scale, min;
            ce_k_scale_min(k4->scales, s, &scale, &min);
            int32_t acc = 0;
            for (int l = 0; l < 32; l++) acc += ce_k_quant(q5 ? k5->qs : k4->qs, q5 ? k5->qh : NULL, s, l) * x[s].qs[l];
            sum += d * (float)scale * x[s].d * (float)acc - dmin * (float)min * x[s].s;
        }
    }
    return sum;
}

static float vec_dot_q4_k_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    return vec_dot_k_q8a_generic(wrow, 0, x, n);
}

static float vec_dot_q5_k_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    return vec_dot_k_q8a_generic(wrow, 1, x, n);
}

/* Q6_K, two sub-blocks of 16 per activation block: Σ_blocks d d_x Σ_halves scale_h Σ_j (q_j - 32) y_j */
static float vec_dot_q6_k_q8a_generic(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q6_k *w = wrow;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / CE_QK_K; i++, x += CE_QK_K / CE_QK) {
        const float d = ce_fp16_to_fp32(w[i].d);
        for (int blk = 0; blk < CE_QK_K / CE_QK; blk++) {
            int32_t isum = 0;
            for (int h = 0; h < 2; h++) {
                int32_t acc = 0;
                for (int l = 0; l < 16; l++) acc += (ce_q6_k_quant(&w[i], 32 * blk + 16 * h + l) - 32) * x[blk].qs[16 * h + l];
                isum += w[i].scales[2 * blk + h] * acc;
            }
            sum += d * x[blk].d * (float)isum;
        }
    }
    return sum;
}

/* y[r] = w_r · x, one row at a time */
#define MATVEC_Q8A_GENERIC(name)                                                                              \
    static void matvec_##name##_q8a_generic(const void *w, size_t row_bytes, int64_t rows, const ce_block_q8a *x, \
                                            int64_t cols, float *y) {                                         \
        for (int64_t r = 0; r < rows; r++) y[r] = vec_dot_##name##_q8a_generic((const uint8_t *)w + r * row_bytes, x, cols); \
    }
MATVEC_Q8A_GENERIC(q4_0)
MATVEC_Q8A_GENERIC(q4_1)
MATVEC_Q8A_GENERIC(q8_0)
MATVEC_Q8A_GENERIC(q5_0)
MATVEC_Q8A_GENERIC(q5_1)
MATVEC_Q8A_GENERIC(q4_k)
MATVEC_Q8A_GENERIC(q5_k)
MATVEC_Q8A_GENERIC(q6_k)
#undef MATVEC_Q8A_GENERIC

static float vec_dot_f32_generic(const float *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) sum += w[j] * x[j];
    return sum;
}

static float vec_dot_f16_generic(const uint16_t *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) sum += ce_fp16_to_fp32(w[j]) * x[j];
    return sum;
}

static void dot_rows_f32_generic(const void *X, const float *q, int64_t rows, int64_t n, float *out) {
    for (int64_t t = 0; t < rows; t++) out[t] = vec_dot_f32_generic((const float *)X + t * n, q, n);
}

static void dot_rows_f16_generic(const void *X, const float *q, int64_t rows, int64_t n, float *out) {
    for (int64_t t = 0; t < rows; t++) out[t] = vec_dot_f16_generic((const uint16_t *)X + t * n, q, n);
}

static void sum_rows_f32_generic(const void *X, const float *a, int64_t rows, int64_t n, float *y) {
    for (int64_t j = 0; j < n; j++) y[j] = 0.0f;
    for (int64_t t = 0; t < rows; t++)
        for (int64_t j = 0; j < n; j++) y[j] += a[t] * ((const float *)X)[t * n + j];
}

static void sum_rows_f16_generic(const void *X, const float *a, int64_t rows, int64_t n, float *y) {
    for (int64_t j = 0; j < n; j++) y[j] = 0.0f;
    for (int64_t t = 0; t < rows; t++)
        for (int64_t j = 0; j < n; j++) y[j] += a[t] * ce_fp16_to_fp32(((const uint16_t *)X)[t * n + j]);
}

static double exp_shifted_generic(float *x, float shift, int64_t n) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; j++) sum += x[j] = expf(x[j] - shift);
    return sum;
}

static void silu_mul_generic(float *gate, const float *up, int64_t n) {
    for (int64_t j = 0; j < n; j++) gate[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

static const ce_kernels kernels_generic = {
    .name = "generic",
    .matmul_f32 = matmul_f32_generic,
    .quantize_q8a = quantize_q8a_generic,
    .matvec_q8a =
        {
            [CE_TYPE_Q4_0] = matvec_q4_0_q8a_generic,
            [CE_TYPE_Q4_1] = matvec_q4_1_q8a_generic,
            [CE_TYPE_Q8_0] = matvec_q8_0_q8a_generic,
            [CE_TYPE_Q5_0] = matvec_q5_0_q8a_generic,
            [CE_TYPE_Q5_1] = matvec_q5_1_q8a_generic,
            [CE_TYPE_Q4_K] = matvec_q4_k_q8a_generic,
            [CE_TYPE_Q5_K] = matvec_q5_k_q8a_generic,
            [CE_TYPE_Q6_K] = matvec_q6_k_q8a_generic,
        },
    .dot_rows = {[CE_TYPE_F32] = dot_rows_f32_generic, [CE_TYPE_F16] = dot_rows_f16_generic},
    .sum_rows = {[CE_TYPE_F32] = sum_rows_f32_generic, [CE_TYPE_F16] = sum_rows_f16_generic},
    .exp_shifted = exp_shifted_generic,
    .silu_mul = silu_mul_generic,
};

const ce_kernels *ce_kernels_generic(void) { return &kernels_generic; }

/* The dispatch point: the kernel sets this build has, best first. SIMD sets join this list with a
 * CPU-feature check. */
typedef struct {
    const ce_kernels *(*get)(void);
    int (*supported)(void);
} kernel_choice;

static int always(void) { return 1; }

static const kernel_choice kernel_choices[] = {
    {ce_kernels_avx512, ce_cpu_has_avx512},
    {ce_kernels_avx2, ce_cpu_has_avx2},
    {ce_kernels_generic, always},
};

static const ce_kernels *active_kernels = &kernels_generic;

const ce_kernels *ce_kernels_active(void) { return active_kernels; }

ce_status ce_kernels_select(const char *name, char *err, size_t errlen) {
    const size_t n_choices = sizeof kernel_choices / sizeof kernel_choices[0];
    for (size_t i = 0; i < n_choices; i++) {
        const ce_kernels *k = kernel_choices[i].get();
        int wanted = name == NULL || strcmp(name, "auto") == 0 || strcmp(name, k->name) == 0;
        if (wanted && kernel_choices[i].supported()) {
            active_kernels = k;
            return CE_OK;
        }
        if (wanted && name != NULL && strcmp(name, "auto") != 0)
            return ce_fail(err, errlen, CE_EINVAL, "kernel set '%s' is not supported by this CPU", name);
    }
    return ce_fail(err, errlen, CE_EINVAL, "unknown kernel set '%s'", name ? name : "(null)");
}
