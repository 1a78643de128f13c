/* AVX2 + FMA + F16C dot products. Same contract as the _generic kernels in core/quant.c (which are
 * the specification); only the summation order differs. Compiled for any x86-64 through target
 * attributes and installed only when the CPU reports the features. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "quant.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))

TARGET static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TARGET static inline float half(uint16_t h) { return _cvtsh_ss(h); }


TARGET static float vec_dot_f32_avx2(const void *wrow, const float *x, int64_t n) {
    const float *w = wrow;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), acc1);
    }
    float sum = hsum(_mm256_add_ps(acc0, acc1));
    for (; j < n; j++) sum += w[j] * x[j];
    return sum;
}

TARGET static float vec_dot_f16_avx2(const void *wrow, const float *x, int64_t n) {
    const uint16_t *w = wrow;
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j))), _mm256_loadu_ps(x + j), acc);
    float sum = hsum(acc);
    for (; j < n; j++) sum += half(w[j]) * x[j];
    return sum;
}

/* ---- activation blocks ---- */

/* Loads the 32 values of a block into v and returns max_j |x_j|, ignoring NaN as fmaxf does
 * (max_ps returns its second operand when the first is NaN). */
TARGET static inline float block_absmax(const float *x, __m256 v[4]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), amax);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* ---- 8-bit activations ---- */

/* Same float operations as quantize_q8a_generic, eight lanes at a time; NaN lanes become 0 as there. */
TARGET static void quantize_q8a_avx2(const float *x, ce_block_q8a *out, int64_t cols) {
    for (int64_t i = 0; i < cols / CE_QK; i++, x += CE_QK) {
        __m256 v[4];
        const float d = block_absmax(x, v) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], _mm256_set1_ps(id)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[k] = _mm256_cvtps_epi32(_mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q)));
        }
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        /* packs interleave 128-bit lanes: 32-bit groups come out as 0 4 1 5 2 6 3 7 */
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)out[i].qs, b);
        out[i].d = d;
        out[i].s = d * (float)_mm_cvtsi128_si32(s4);
    }
}

/* Eight int32 sums of four u8 × i8 products each (|u| <= 255 pairs with |s| <= 127 never saturate
 * maddubs' int16 when u is a nibble or an absolute value <= 128). */
TARGET static inline __m256i dot_u8_i8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* The 32 nibbles of a Q4 block as bytes in element order: low nibbles (0-15), then high (16-31). */
TARGET static inline __m256i nibbles_epi8(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

TARGET static inline __m256i load_q8a(const ce_block_q8a *x) { return _mm256_loadu_si256((const __m256i *)x->qs); }

/* (d_x, s_x) of an activation block in lanes 0 and 1 */
TARGET static inline __m128 load_ds(const ce_block_q8a *x) { return _mm_castpd_ps(_mm_load_sd((const double *)&x->d)); }

/* Both dot products accumulate per-block products in acc (lane-wise) and the offset terms in lane 1
 * of `offset`, whose lane 0 collects an unused copy of the scales. */

/* Σ_blocks d_w d_x Σ_j q_j y_j - 8 d_w s_x */
TARGET static float vec_dot_q4_0_q8a_avx2(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q4_0 *w = wrow;
    __m256 acc = _mm256_setzero_ps();
    __m128 offset = _mm_setzero_ps();
    for (int64_t i = 0; i < n / CE_QK; i++) {
        /* (d_w d_x, d_w s_x) */
        const __m128 scales = _mm_mul_ps(_mm_set1_ps(half(w[i].d)), load_ds(x + i));
        const __m256i dot = dot_u8_i8(nibbles_epi8(w[i].qs), load_q8a(x + i));
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(dot), acc);
        offset = _mm_add_ps(offset, scales);
    }
    return hsum(acc) - 8.0f * _mm_cvtss_f32(_mm_movehdup_ps(offset));
}

/* Σ_blocks d_w d_x Σ_j q_j y_j + m_w s_x */
TARGET static float vec_dot_q4_1_q8a_avx2(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q4_1 *w = wrow;
    __m256 acc = _mm256_setzero_ps();
    __m128 offset = _mm_setzero_ps();
    for (int64_t i = 0; i < n / CE_QK; i++) {
        /* (d_w, m_w) converted together, times (d_x, s_x): (d_w d_x, m_w s_x) */
        int32_t dm_bits;
        memcpy(&dm_bits, &w[i].d, sizeof dm_bits); /* d and m: adjacent halves */
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
        const __m128 scales = _mm_mul_ps(dm, load_ds(x + i));
        const __m256i dot = dot_u8_i8(nibbles_epi8(w[i].qs), load_q8a(x + i));
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(dot), acc);
        offset = _mm_add_ps(offset, scales);
    }
    return hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(offset));
}

/* Σ_blocks d_w d_x Σ_j q_j y_j, signed × signed through |q| and y carrying q's sign */
TARGET static float vec_dot_q8_0_q8a_avx2(const void *wrow, const ce_block_q8a *x, int64_t n) {
    const ce_block_q8_0 *w = wrow;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / CE_QK; i++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)w[i].qs), y = load_q8a(x + i);
        __m256i dot = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w[i].d) * x[i].d), _mm256_cvtepi32_ps(dot), acc);
    }
    return hsum(acc);
}

/* ---- fp32 activations as 30-bit fixed point (ce_block_x16) ---- */

/* Eight int32 lanes of v narrowed to int16 and stored in order at out[0..7]. */
TARGET static inline void store_epi16x8(int16_t *out, __m256i v) {
    __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    _mm_storeu_si128((__m128i *)out, _mm_packs_epi32(lo, hi));
}

TARGET static void quantize_x16_avx2(const float *x, ce_block_x16 *out, int64_t cols) {
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t i = 0; i < cols / CE_QK; i++, x += CE_QK) {
        __m256 v[4];
        const float d = block_absmax(x, v) / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), v[2]), v[3]);
        const __m256 dv = _mm256_set1_ps(d), idv = _mm256_set1_ps(id), lo_scale = _mm256_set1_ps(id * 65534.0f);
        for (int k = 0; k < 4; k++) {
            const __m256 h = _mm256_round_ps(_mm256_mul_ps(v[k], idv), round);
            const __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_fnmadd_ps(h, dv, v[k]), lo_scale), round);
            store_epi16x8(out[i].hi + 8 * k, _mm256_cvtps_epi32(_mm256_and_ps(h, _mm256_cmp_ps(h, h, _CMP_ORD_Q))));
            store_epi16x8(out[i].lo + 8 * k, _mm256_cvtps_epi32(_mm256_and_ps(l, _mm256_cmp_ps(l, l, _CMP_ORD_Q))));
        }
        out[i].d = d;
        out[i].sum = hsum(sum);
    }
}

/* Σ_j q_j (hi_j + lo_j / 65534) for 32 int16 weights in w0 (elements 0-15) and w1 (16-31): exact
 * int32 pair sums (|q| <= 128, |hi|, |lo| <= 32767), then one float combination per lane. */
TARGET static inline __m256 dot_x16(__m256i w0, __m256i w1, const ce_block_x16 *x) {
    const __m256i *hi = (const __m256i *)x->hi, *lo = (const __m256i *)x->lo;
    __m256i s_hi = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(hi)), _mm256_madd_epi16(w1, _mm256_loadu_si256(hi + 1)));
    __m256i s_lo = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(lo)), _mm256_madd_epi16(w1, _mm256_loadu_si256(lo + 1)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_lo), _mm256_set1_ps(1.0f / 65534.0f), _mm256_cvtepi32_ps(s_hi));
}

/* Σ_blocks d_w d_x Σ_j (q_j - 8) x_j / d_x */
TARGET static float vec_dot_q4_0_x16_avx2(const void *wrow, const ce_block_x16 *x, int64_t n) {
    const ce_block_q4_0 *w = wrow;
    const __m128i mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / CE_QK; i++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)w[i].qs);
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(raw, mask), eight));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), eight));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w[i].d) * x[i].d), dot_x16(w0, w1, x + i), acc);
    }
    return hsum(acc);
}

/* Σ_blocks d_w d_x Σ_j q_j x_j / d_x + m_w Σ_j x_j */
TARGET static float vec_dot_q4_1_x16_avx2(const void *wrow, const ce_block_x16 *x, int64_t n) {
    const ce_block_q4_1 *w = wrow;
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    __m128 offset = _mm_setzero_ps(); /* lane 1 collects m_w Σx, lane 0 an unused copy of d_w d_x */
    for (int64_t i = 0; i < n / CE_QK; i++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)w[i].qs);
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
        int32_t dm;
        memcpy(&dm, &w[i].d, sizeof dm); /* d and m: adjacent halves, converted together */
        const __m128 scales = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(dm)),
                                         _mm_castpd_ps(_mm_load_sd((const double *)&x[i].d))); /* (d_w d_x, m_w Σx) */
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), dot_x16(w0, w1, x + i), acc);
        offset = _mm_add_ps(offset, scales);
    }
    return hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(offset));
}

/* Σ_blocks d_w d_x Σ_j q_j x_j / d_x */
TARGET static float vec_dot_q8_0_x16_avx2(const void *wrow, const ce_block_x16 *x, int64_t n) {
    const ce_block_q8_0 *w = wrow;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / CE_QK; i++) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].qs));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[i].qs + 16)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w[i].d) * x[i].d), dot_x16(w0, w1, x + i), acc);
    }
    return hsum(acc);
}

/* Eight floats of row t, column j of a float-typed block (F32 or F16 converted). */
#define LOAD_ROW8(X, is_f16, t, n, j)                                                                     \
    ((is_f16) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(X) + (t) * (n) + (j)))) \
              : _mm256_loadu_ps((const float *)(X) + (t) * (n) + (j)))

TARGET static void dot_rows_f32_avx2(const void *X, const float *q, int64_t rows, int64_t n, float *out) {
    for (int64_t t = 0; t < rows; t++) out[t] = vec_dot_f32_avx2((const float *)X + t * n, q, n);
}

TARGET static void dot_rows_f16_avx2(const void *X, const float *q, int64_t rows, int64_t n, float *out) {
    for (int64_t t = 0; t < rows; t++) out[t] = vec_dot_f16_avx2((const uint16_t *)X + t * n, q, n);
}

/* y = Σ_t a[t] X[t, :], 64 columns at a time held in eight registers across all rows */
TARGET static inline void sum_rows_avx2(const void *X, int is_f16, const float *a, int64_t rows, int64_t n,
                                        float *y) {
    int64_t j0 = 0;
    for (; j0 + 64 <= n; j0 += 64) {
        __m256 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
        for (int64_t t = 0; t < rows; t++) {
            const __m256 at = _mm256_set1_ps(a[t]);
            for (int k = 0; k < 8; k++) acc[k] = _mm256_fmadd_ps(at, LOAD_ROW8(X, is_f16, t, n, j0 + 8 * k), acc[k]);
        }
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(y + j0 + 8 * k, acc[k]);
    }
    for (int64_t j = j0; j < n; j++) { /* columns past the last multiple of 64 */
        float sum = 0.0f;
        for (int64_t t = 0; t < rows; t++)
            sum += a[t] * (is_f16 ? half(((const uint16_t *)X)[t * n + j]) : ((const float *)X)[t * n + j]);
        y[j] = sum;
    }
}

TARGET static void sum_rows_f32_avx2(const void *X, const float *a, int64_t rows, int64_t n, float *y) {
    sum_rows_avx2(X, 0, a, rows, n, y);
}

TARGET static void sum_rows_f16_avx2(const void *X, const float *a, int64_t rows, int64_t n, float *y) {
    sum_rows_avx2(X, 1, a, rows, n, y);
}

/* exp(x) for x <= 0, eight lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts so r is exact
 * to float precision), exp(r) by Cephes' degree-6 polynomial (about 1 ulp), times 2^n built in the
 * exponent bits. Below -87.3 the result (< 2^-126) is flushed to 0. */
TARGET static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 min_x = _mm256_set1_ps(-87.3f);
    const __m256 underflow = _mm256_cmp_ps(x, min_x, _CMP_LT_OQ);
    x = _mm256_max_ps(x, min_x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

TARGET static double exp_shifted_avx2(float *x, float shift, int64_t n) {
    const __m256 s = _mm256_set1_ps(shift);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
        _mm256_storeu_ps(x + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    double total = hsum(sum);
    for (; j < n; j++) total += x[j] = expf(x[j] - shift);
    return total;
}

static const ce_kernels kernels_avx2 = {
    .name = "avx2",
    .vec_dot =
        {
            [CE_TYPE_F32] = vec_dot_f32_avx2,
            [CE_TYPE_F16] = vec_dot_f16_avx2, /* quantized weights: vec_dot_x16 */
        },
    .quantize_q8a = quantize_q8a_avx2,
    .vec_dot_q8a =
        {
            [CE_TYPE_Q4_0] = vec_dot_q4_0_q8a_avx2,
            [CE_TYPE_Q4_1] = vec_dot_q4_1_q8a_avx2,
            [CE_TYPE_Q8_0] = vec_dot_q8_0_q8a_avx2,
        },
    .quantize_x16 = quantize_x16_avx2,
    .vec_dot_x16 =
        {
            [CE_TYPE_Q4_0] = vec_dot_q4_0_x16_avx2,
            [CE_TYPE_Q4_1] = vec_dot_q4_1_x16_avx2,
            [CE_TYPE_Q8_0] = vec_dot_q8_0_x16_avx2,
        },
    .dot_rows = {[CE_TYPE_F32] = dot_rows_f32_avx2, [CE_TYPE_F16] = dot_rows_f16_avx2},
    .sum_rows = {[CE_TYPE_F32] = sum_rows_f32_avx2, [CE_TYPE_F16] = sum_rows_f16_avx2},
    .exp_shifted = exp_shifted_avx2,
};

const ce_kernels *ce_kernels_avx2(void) { return &kernels_avx2; }

int ce_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#else
#include "quant.h"
const ce_kernels *ce_kernels_avx2(void) { return ce_kernels_generic(); }
int ce_cpu_has_avx2(void) { return 0; }
#endif
