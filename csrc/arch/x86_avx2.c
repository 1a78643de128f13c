/* AVX2 + FMA + F16C dot products. Same contract as the _generic kernels in core/quant.c (which are
 * the specification); only the summation order differs. Compiled for any x86-64 through target
 * attributes and installed only when the CPU reports the features.
 *
 * x86_avx2_vnni.c compiles this file a second time with CE_AVX2_VNNI set: its integer dot products
 * (add_dot_i16, dot_u8_i8, dot_u8_i8_pair) become AVX-512 VNNI instructions on the same 256-bit
 * registers, one instruction where AVX2 needs two or three. The sums are exact in both, so the two
 * builds compute the same bits; the AVX-512 set takes its decode kernels from the VNNI build. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "quant.h"

#ifndef CE_AVX2_VNNI
#define CE_AVX2_VNNI 0
#endif
#if CE_AVX2_VNNI
#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#else
#define TARGET __attribute__((target("avx2,fma,f16c")))
#endif
/* Small fixed loops over rows and registers: unrolled so their accumulators stay in registers at -O2. */
#define UNROLL _Pragma("GCC unroll 4")

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

/* ---- matrix–vector products on quantized weights ----
 *
 * Each kernel runs GROUP_ROWS weight rows at once: the activation block is loaded (and rearranged)
 * once for all of them, and their independent accumulators hide the FMA latency. The weights are
 * prefetched PREFETCH_GROUPS groups ahead in address order: the step that covers a slice of this
 * group's blocks requests the same slice of the group that far on, so the requests form one
 * sequential stream. A core keeps too few misses in flight on its own to stream weights at DRAM
 * speed (`python benchmarks/kernels.py`, Q8_0 576-column rows of a 60 MB matrix, 8-bit activations:
 * one thread 9.5-10.5 GB/s with a prefetch 4 KB ahead of each row, 19.7-21.7 with the stream; two
 * threads 17.7-22.1 -> 30.7-33.9). */
#define GROUP_ROWS 4
#define PREFETCH_GROUPS 2

/* Requests bytes [offset, offset + bytes) of the group PREFETCH_GROUPS groups after `group`. Always
 * inlined: GCC 12 finds a function whose only effect is a prefetch free of side effects and drops
 * the calls. */
TARGET static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *group, size_t group_bytes,
                                                                         size_t offset, size_t bytes) {
    /* past the matrix's end for its last groups: computed as an integer, a prefetch never faults */
    const uintptr_t p = (uintptr_t)group + PREFETCH_GROUPS * group_bytes + offset;
    for (size_t k = 0; k < bytes; k += 64) _mm_prefetch((const char *)(p + k), _MM_HINT_T0);
}

/* The quantized weight formats through one code path: a block is d (fp16), m (fp16, Q4_1 and Q5_1
 * only), the fifth bits (qh, Q5 only) and its quants. */
enum { Q4_0, Q4_1, Q8_0, Q5_0, Q5_1 };
#define BLOCK_BYTES(kind) ((kind) == Q4_0 ? 18 : (kind) == Q4_1 ? 20 : (kind) == Q5_0 ? 22 : (kind) == Q5_1 ? 24 : 34)
#define QS_OFFSET(kind) ((kind) == Q4_1 ? 4 : (kind) == Q5_0 ? 6 : (kind) == Q5_1 ? 8 : 2)
#define QH_OFFSET(kind) ((kind) == Q5_1 ? 4 : 2)
#define HAS_M(kind) ((kind) == Q4_1 || (kind) == Q5_1)
/* coefficient of the offset term Σ_blocks (d_w or m_w) × s_x: Q4_0 stores q + 8, Q5_0 q + 16, Q4_1
 * and Q5_1 add m */
#define OFFSET_COEF(kind) ((kind) == Q4_0 ? -8.0f : (kind) == Q5_0 ? -16.0f : HAS_M(kind) ? 1.0f : 0.0f)

/* The block's (d, m) as two fp16 in the low 32 bits, for one conversion; the formats without m give
 * (d, d). */
TARGET static inline __m128i block_dm_bits(const uint8_t *block, int kind) {
    uint32_t bits;
    if (HAS_M(kind)) {
        memcpy(&bits, block, sizeof bits);
    } else {
        uint16_t d;
        memcpy(&d, block, sizeof d);
        bits = d * 0x10001u;
    }
    return _mm_cvtsi32_si128((int32_t)bits);
}

/* y[r] = Σ lanes of acc[r] + coef × (lanes 1 and 3 of off[r]) for r < n_rows. A row alone is summed
 * in the same order as in a group of four, so a row's result does not depend on how the rows were
 * split (between threads, tiles or groups). */
TARGET static inline void store_rows(const __m256 *acc, const __m128 *off, int n_rows, float coef, float *y) {
    const __m128 c = _mm_set1_ps(coef);
    if (n_rows == 4) {
        /* lane r of the two hadds: (a0 + a1) + (a2 + a3) in the low half, (a4 + a5) + (a6 + a7) high */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        const __m128 offs = _mm_hadd_ps(_mm_shuffle_ps(off[0], off[1], _MM_SHUFFLE(3, 1, 3, 1)),
                                        _mm_shuffle_ps(off[2], off[3], _MM_SHUFFLE(3, 1, 3, 1)));
        _mm_storeu_ps(y, _mm_fmadd_ps(c, offs, sums));
        return;
    }
    for (int r = 0; r < n_rows; r++) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r], acc[r]), _mm256_hadd_ps(acc[r], acc[r]));
        const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        const __m128 o = _mm_shuffle_ps(off[r], off[r], _MM_SHUFFLE(3, 1, 3, 1));
        y[r] = _mm_cvtss_f32(_mm_fmadd_ps(c, _mm_hadd_ps(o, o), sum));
    }
}

/* The integer dot products, exact in int32 in both builds of this file. */

/* acc + each lane's two int16 × int16 products */
TARGET static inline __m256i add_dot_i16(__m256i acc, __m256i a, __m256i b) {
#if CE_AVX2_VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* Eight int32 sums of four u8 × i8 products each (maddubs' int16 pair sums never saturate when u is a
 * nibble or an absolute value <= 128, with |s| <= 127). */
TARGET static inline __m256i dot_u8_i8(__m256i u, __m256i s) {
#if CE_AVX2_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* dot_u8_i8(u0, s0) + dot_u8_i8(u1, s1), for nibbles u (AVX2 adds the two pair sums in int16 first:
 * |·| <= 4 × 15 × 127) */
TARGET static inline __m256i dot_u8_i8_pair(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if CE_AVX2_VNNI
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
    const __m256i sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
    return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
#endif
}

/* (d_x, s_x) of an activation block in lanes 0 and 1 */
TARGET static inline __m128 load_ds(const void *x) { return _mm_castpd_ps(_mm_load_sd((const double *)x)); }

/* Q5 fifth bits as bytes 0x10 or 0: bits[k] of the 32-bit words in each 128-bit lane of qh, for
 * byte k of the lane from byte first + k / 8 of the word (lane by lane: first_lo, first_hi) */
TARGET static inline __m256i fifth_bits(__m256i qh, int first_lo, int first_hi) {
    const __m256i pick = _mm256_setr_epi8(first_lo, first_lo, first_lo, first_lo, first_lo, first_lo, first_lo, first_lo,
                                          first_lo + 1, first_lo + 1, first_lo + 1, first_lo + 1, first_lo + 1, first_lo + 1,
                                          first_lo + 1, first_lo + 1, first_hi, first_hi, first_hi, first_hi, first_hi, first_hi,
                                          first_hi, first_hi, first_hi + 1, first_hi + 1, first_hi + 1, first_hi + 1, first_hi + 1,
                                          first_hi + 1, first_hi + 1, first_hi + 1);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, pick), bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

TARGET static inline uint32_t block_qh(const uint8_t *block, int kind) {
    uint32_t qh;
    memcpy(&qh, block + QH_OFFSET(kind), sizeof qh);
    return qh;
}

/* n_rows (GROUP_ROWS or 1) rows of Q4_0 / Q4_1 / Q5_0 / Q5_1 · 8-bit activations: Σ_blocks d_w d_x Σ_j q_j y_j
 * + coef Σ_blocks (d_w or m_w) s_x. Blocks go in pairs A, B: one 32-byte register holds both blocks'
 * nibbles, its low nibbles are elements 0-15 of A and of B, the high ones 16-31, and the activations
 * are rearranged to match once per pair for all rows. */
TARGET static inline __attribute__((always_inline)) void q4_q8a_rows(const uint8_t *w, size_t row_bytes, int n_rows,
                                                                      int kind, const ce_block_q8a *x, int64_t blocks,
                                                                      float *y) {
    const int bb = BLOCK_BYTES(kind), qs = QS_OFFSET(kind);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2); /* lanes 0-3 <- A's scale, 4-7 <- B's */
    __m256 acc[GROUP_ROWS];
    __m128 off[GROUP_ROWS];
    for (int r = 0; r < n_rows; r++) acc[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= blocks; i += 2) {
        const __m256i xa = _mm256_loadu_si256((const __m256i *)x[i].qs), xb = _mm256_loadu_si256((const __m256i *)x[i + 1].qs);
        const __m256i x_lo = _mm256_permute2x128_si256(xa, xb, 0x20), x_hi = _mm256_permute2x128_si256(xa, xb, 0x31);
        const __m128 ds = _mm_movelh_ps(load_ds(&x[i]), load_ds(&x[i + 1])); /* (d_xA, s_xA, d_xB, s_xB) */
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * bb, 2 * n_rows * bb);
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *a = w + r * row_bytes + i * bb, *b = a + bb;
            const __m256i raw = _mm256_loadu2_m128i((const __m128i *)(b + qs), (const __m128i *)(a + qs));
            __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            if (kind == Q5_0 || kind == Q5_1) { /* elements 0-15 take qh bits 0-15, elements 16-31 bits 16-31 */
                const __m256i qh = _mm256_setr_epi32((int32_t)block_qh(a, kind), 0, 0, 0, (int32_t)block_qh(b, kind), 0, 0, 0);
                lo = _mm256_or_si256(lo, fifth_bits(qh, 0, 0));
                hi = _mm256_or_si256(hi, fifth_bits(qh, 2, 2));
            }
            /* both halves (Q5's quants reach 31: |·| <= 4 × 31 × 127): lanes 0-3 of dot are A's, 4-7 B's */
            const __m256 dot = _mm256_cvtepi32_ps(dot_u8_i8_pair(lo, x_lo, hi, x_hi));
            const __m128 dm = _mm_cvtph_ps(_mm_unpacklo_epi32(block_dm_bits(a, kind), block_dm_bits(b, kind)));
            const __m128 scales = _mm_mul_ps(dm, ds); /* (d_wA d_xA, m_wA s_xA, d_wB d_xB, m_wB s_xB) */
            acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(scales), spread), dot, acc[r]);
            off[r] = _mm_add_ps(off[r], scales);
        }
    }
    if (i < blocks) { /* an odd block count: the last block alone */
        const __m256i xq = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m128 ds = load_ds(&x[i]);
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * bb, n_rows * bb);
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *a = w + r * row_bytes + i * bb;
            const __m128i raw = _mm_loadu_si128((const __m128i *)(a + qs));
            __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
            if (kind == Q5_0 || kind == Q5_1) /* lane 0: elements 0-15 (qh bits 0-15), lane 1: 16-31 */
                q = _mm256_or_si256(q, fifth_bits(_mm256_set1_epi32((int32_t)block_qh(a, kind)), 0, 2));
            const __m128 scales = _mm_mul_ps(_mm_cvtph_ps(block_dm_bits(a, kind)), ds); /* (d_w d_x, m_w s_x, 0, 0) */
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(dot_u8_i8(q, xq)), acc[r]);
            off[r] = _mm_add_ps(off[r], scales);
        }
    }
    store_rows(acc, off, n_rows, OFFSET_COEF(kind), y);
}

/* n_rows rows of Q8_0 · 8-bit activations: Σ_blocks d_w d_x Σ_j q_j y_j, signed × signed through |q|
 * and y carrying q's sign */
TARGET static inline __attribute__((always_inline)) void q8_0_q8a_rows(const uint8_t *w, size_t row_bytes, int n_rows,
                                                                        const ce_block_q8a *x, int64_t blocks, float *y) {
    __m256 acc[GROUP_ROWS];
    __m128 off[GROUP_ROWS];
    for (int r = 0; r < n_rows; r++) acc[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
    for (int64_t i = 0; i < blocks; i++) {
        const __m256i y8 = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m128 ds = load_ds(&x[i]);
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * BLOCK_BYTES(Q8_0), n_rows * BLOCK_BYTES(Q8_0));
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *a = w + r * row_bytes + i * BLOCK_BYTES(Q8_0);
            const __m256i q = _mm256_loadu_si256((const __m256i *)(a + 2));
            const __m256i dot = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y8, q));
            const __m128 scales = _mm_mul_ps(_mm_cvtph_ps(block_dm_bits(a, Q8_0)), ds);
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(dot), acc[r]);
        }
    }
    store_rows(acc, off, n_rows, 0.0f, y);
}

/* matvec_<name>_<act>_avx2: the rows in groups of GROUP_ROWS, the rest one at a time, through call
 * (a macro of the group's first row, its row count and its outputs; row_bytes, x and cols in scope) */
#define MATVEC(name, act_type, call)                                                                            \
    TARGET static void matvec_##name##_##act_type##_avx2(const void *w, size_t row_bytes, int64_t rows,         \
                                                         const ce_block_##act_type *x, int64_t cols, float *y) { \
        const uint8_t *wr = w;                                                                                  \
        int64_t r = 0;                                                                                          \
        for (; r + GROUP_ROWS <= rows; r += GROUP_ROWS) call(wr + r * row_bytes, GROUP_ROWS, y + r);           \
        for (; r < rows; r++) call(wr + r * row_bytes, 1, y + r);                                               \
    }
#define Q4_0_ROWS(wr, n, yr) q4_q8a_rows(wr, row_bytes, n, Q4_0, x, cols / CE_QK, yr)
#define Q4_1_ROWS(wr, n, yr) q4_q8a_rows(wr, row_bytes, n, Q4_1, x, cols / CE_QK, yr)
#define Q8_0_ROWS(wr, n, yr) q8_0_q8a_rows(wr, row_bytes, n, x, cols / CE_QK, yr)
#define Q5_0_ROWS(wr, n, yr) q4_q8a_rows(wr, row_bytes, n, Q5_0, x, cols / CE_QK, yr)
#define Q5_1_ROWS(wr, n, yr) q4_q8a_rows(wr, row_bytes, n, Q5_1, x, cols / CE_QK, yr)
MATVEC(q4_0, q8a, Q4_0_ROWS)
MATVEC(q4_1, q8a, Q4_1_ROWS)
MATVEC(q8_0, q8a, Q8_0_ROWS)
MATVEC(q5_0, q8a, Q5_0_ROWS)
MATVEC(q5_1, q8a, Q5_1_ROWS)

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
            __m256 h = _mm256_round_ps(_mm256_mul_ps(v[k], idv), round);
            __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_fnmadd_ps(h, dv, v[k]), lo_scale), round);
            /* x * (1 / d) can round to the wrong side of a half: then |l| passes 32767, and one unit
             * of hi (65534 of lo) moves over */
            const __m256 one = _mm256_set1_ps(1.0f), limit = _mm256_set1_ps(32767.0f);
            const __m256 carry = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(l, limit, _CMP_GT_OQ), one),
                                               _mm256_and_ps(_mm256_cmp_ps(l, _mm256_sub_ps(_mm256_setzero_ps(), limit), _CMP_LT_OQ), one));
            h = _mm256_add_ps(h, carry);
            l = _mm256_fnmadd_ps(carry, _mm256_set1_ps(65534.0f), l);
            store_epi16x8(out[i].hi + 8 * k, _mm256_cvtps_epi32(_mm256_and_ps(h, _mm256_cmp_ps(h, h, _CMP_ORD_Q))));
            store_epi16x8(out[i].lo + 8 * k, _mm256_cvtps_epi32(_mm256_and_ps(l, _mm256_cmp_ps(l, l, _CMP_ORD_Q))));
        }
        out[i].d = d;
        out[i].sum = hsum(sum);
    }
}

/* The pair (A, B)'s 64 quants as int16 in four registers, w[g] = [A's elements 8g..8g+7 | B's]:
 * in-lane unpacks of a register holding both blocks, no lane crossing. */
TARGET static inline void pair_epi16(const uint8_t *a, const uint8_t *b, int kind, __m256i w[4]) {
    const int qs = QS_OFFSET(kind);
    if (kind == Q8_0) { /* sign-extend: each byte into the high half of an int16, then shift down */
        const __m256i v0 = _mm256_loadu2_m128i((const __m128i *)(b + qs), (const __m128i *)(a + qs));
        const __m256i v1 = _mm256_loadu2_m128i((const __m128i *)(b + qs + 16), (const __m128i *)(a + qs + 16));
        w[0] = _mm256_srai_epi16(_mm256_unpacklo_epi8(v0, v0), 8);
        w[1] = _mm256_srai_epi16(_mm256_unpackhi_epi8(v0, v0), 8);
        w[2] = _mm256_srai_epi16(_mm256_unpacklo_epi8(v1, v1), 8);
        w[3] = _mm256_srai_epi16(_mm256_unpackhi_epi8(v1, v1), 8);
    } else { /* nibbles: low ones are elements 0-15, high ones 16-31; Q5's fifth bits as in q4_q8a_rows */
        const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
        const __m256i raw = _mm256_loadu2_m128i((const __m128i *)(b + qs), (const __m128i *)(a + qs));
        __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        if (kind == Q5_0 || kind == Q5_1) {
            const __m256i qh = _mm256_setr_epi32((int32_t)block_qh(a, kind), 0, 0, 0, (int32_t)block_qh(b, kind), 0, 0, 0);
            lo = _mm256_or_si256(lo, fifth_bits(qh, 0, 0));
            hi = _mm256_or_si256(hi, fifth_bits(qh, 2, 2));
        }
        w[0] = _mm256_unpacklo_epi8(lo, zero);
        w[1] = _mm256_unpackhi_epi8(lo, zero);
        w[2] = _mm256_unpacklo_epi8(hi, zero);
        w[3] = _mm256_unpackhi_epi8(hi, zero);
    }
}

/* n_rows rows of quantized weights · fixed-point activations: Σ_blocks d_w d_x Σ_j q_j (hi_j + lo_j /
 * 65534) + coef Σ_blocks (d_w or m_w) Σx, with q the stored quants (Q4: nibbles 0-15, Q8_0: signed).
 * Per block: exact int32 pair sums of q × hi and q × lo (|q| <= 128, |hi|, |lo| <= 32767), then one
 * float combination per lane. Blocks go in pairs as in q4_q8a_rows: lanes 0-3 of every sum are A's,
 * 4-7 B's, and the activations are rearranged to match once per pair for all rows. */
TARGET static inline __attribute__((always_inline)) void x16_rows(const uint8_t *w, size_t row_bytes, int n_rows,
                                                                   int kind, const ce_block_x16 *x, int64_t blocks,
                                                                   float *y) {
    const int bb = BLOCK_BYTES(kind), qs = QS_OFFSET(kind);
    const __m256 lo_weight = _mm256_set1_ps(1.0f / 65534.0f);
    const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    __m256 acc[GROUP_ROWS];
    __m128 off[GROUP_ROWS];
    for (int r = 0; r < n_rows; r++) acc[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= blocks; i += 2) {
        __m256i xh[4], xl[4]; /* [A's activations 8g..8g+7 | B's], hi and lo parts */
        for (int h = 0; h < 2; h++) {
            const __m256i ha = _mm256_loadu_si256((const __m256i *)x[i].hi + h);
            const __m256i hb = _mm256_loadu_si256((const __m256i *)x[i + 1].hi + h);
            const __m256i la = _mm256_loadu_si256((const __m256i *)x[i].lo + h);
            const __m256i lb = _mm256_loadu_si256((const __m256i *)x[i + 1].lo + h);
            xh[2 * h] = _mm256_permute2x128_si256(ha, hb, 0x20), xh[2 * h + 1] = _mm256_permute2x128_si256(ha, hb, 0x31);
            xl[2 * h] = _mm256_permute2x128_si256(la, lb, 0x20), xl[2 * h + 1] = _mm256_permute2x128_si256(la, lb, 0x31);
        }
        const __m128 ds = _mm_movelh_ps(load_ds(&x[i]), load_ds(&x[i + 1])); /* (d_xA, Σx_A, d_xB, Σx_B) */
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * bb, 2 * n_rows * bb);
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *a = w + r * row_bytes + i * bb, *b = a + bb;
            __m256i q[4];
            pair_epi16(a, b, kind, q);
            __m256i s_hi = _mm256_madd_epi16(q[0], xh[0]), s_lo = _mm256_madd_epi16(q[0], xl[0]);
            for (int g = 1; g < 4; g++) {
                s_hi = add_dot_i16(s_hi, q[g], xh[g]);
                s_lo = add_dot_i16(s_lo, q[g], xl[g]);
            }
            const __m256 dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_lo), lo_weight, _mm256_cvtepi32_ps(s_hi));
            const __m128 dm = _mm_cvtph_ps(_mm_unpacklo_epi32(block_dm_bits(a, kind), block_dm_bits(b, kind)));
            const __m128 scales = _mm_mul_ps(dm, ds); /* (d_wA d_xA, m_wA Σx_A, d_wB d_xB, m_wB Σx_B) */
            acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(scales), spread), dot, acc[r]);
            if (kind != Q8_0) off[r] = _mm_add_ps(off[r], scales);
        }
    }
    if (i < blocks) { /* an odd block count: the last block alone, elements 0-15 and 16-31 as int16 */
        const __m256i *hi = (const __m256i *)x[i].hi, *lo = (const __m256i *)x[i].lo;
        const __m128 ds = load_ds(&x[i]);
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * bb, n_rows * bb);
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *a = w + r * row_bytes + i * bb;
            __m256i w0, w1;
            if (kind == Q8_0) {
                w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + qs)));
                w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + qs + 16)));
            } else { /* lane 0: elements 0-15 (qh bits 0-15), lane 1: 16-31 */
                const __m128i raw = _mm_loadu_si128((const __m128i *)(a + qs));
                __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
                if (kind == Q5_0 || kind == Q5_1)
                    q = _mm256_or_si256(q, fifth_bits(_mm256_set1_epi32((int32_t)block_qh(a, kind)), 0, 2));
                w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
                w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
            }
            const __m256i s_hi = add_dot_i16(_mm256_madd_epi16(w0, _mm256_loadu_si256(hi)), w1, _mm256_loadu_si256(hi + 1));
            const __m256i s_lo = add_dot_i16(_mm256_madd_epi16(w0, _mm256_loadu_si256(lo)), w1, _mm256_loadu_si256(lo + 1));
            const __m256 dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_lo), lo_weight, _mm256_cvtepi32_ps(s_hi));
            const __m128 scales = _mm_mul_ps(_mm_cvtph_ps(block_dm_bits(a, kind)), ds); /* (d_w d_x, m_w Σx, 0, 0) */
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), dot, acc[r]);
            if (kind != Q8_0) off[r] = _mm_add_ps(off[r], scales);
        }
    }
    store_rows(acc, off, n_rows, OFFSET_COEF(kind), y);
}

#define Q4_0_X16(wr, n, yr) x16_rows(wr, row_bytes, n, Q4_0, x, cols / CE_QK, yr)
#define Q4_1_X16(wr, n, yr) x16_rows(wr, row_bytes, n, Q4_1, x, cols / CE_QK, yr)
#define Q8_0_X16(wr, n, yr) x16_rows(wr, row_bytes, n, Q8_0, x, cols / CE_QK, yr)
#define Q5_0_X16(wr, n, yr) x16_rows(wr, row_bytes, n, Q5_0, x, cols / CE_QK, yr)
#define Q5_1_X16(wr, n, yr) x16_rows(wr, row_bytes, n, Q5_1, x, cols / CE_QK, yr)
MATVEC(q4_0, x16, Q4_0_X16)
MATVEC(q4_1, x16, Q4_1_X16)
MATVEC(q8_0, x16, Q8_0_X16)
MATVEC(q5_0, x16, Q5_0_X16)
MATVEC(q5_1, x16, Q5_1_X16)

/* ---- the K-quants, with either kind of activations ---- */

enum { ACT_Q8A, ACT_X16 };

/* Σ_j w_j (hi_j + lo_j / 65534) of one activation block, w the block's 32 weights as int16 (w0:
 * elements 0-15, w1: 16-31), in eight float lanes: exact int32 sums of w × hi and w × lo (|w| <= 4096,
 * two products per madd lane and two madds per sum: below 2^31), then one float combination. */
TARGET static inline __m256 x16_block_dot(__m256i w0, __m256i w1, const ce_block_x16 *x) {
    const __m256i *hi = (const __m256i *)x->hi, *lo = (const __m256i *)x->lo;
    const __m256i s_hi = add_dot_i16(_mm256_madd_epi16(w0, _mm256_loadu_si256(hi)), w1, _mm256_loadu_si256(hi + 1));
    const __m256i s_lo = add_dot_i16(_mm256_madd_epi16(w0, _mm256_loadu_si256(lo)), w1, _mm256_loadu_si256(lo + 1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_lo), _mm256_set1_ps(1.0f / 65534.0f), _mm256_cvtepi32_ps(s_hi));
}

/* The 32 quants (0-31) of sub-block sub of a Q4_K / Q5_K super-block, as bytes: the low nibbles of
 * qs[32 (sub / 2) ..] for even sub, the high ones for odd, and (q5) bit sub of qh's 32 bytes as 16. */
TARGET static inline __m256i k_quants(const uint8_t *qs, __m256i qh, int q5, int sub) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * (sub / 2)));
    const __m256i q = _mm256_and_si256(sub % 2 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0f));
    if (!q5) return q;
    return _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, sub), _mm256_set1_epi8(1)), 4));
}

/* The 32 quants (0-63) of activation block g (0-3) of a Q6_K half, as bytes: ql0 / ql1 hold the half's
 * 64 ql bytes (the low nibbles for g < 2, the high ones after; ql1 for odd g), qh its 32 qh bytes (bits
 * 2g and 2g + 1 as 16 and 32). */
TARGET static inline __m256i q6_k_quants(__m256i ql0, __m256i ql1, __m256i qh, int g) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ql = g % 2 ? ql1 : ql0;
    const __m256i low = _mm256_and_si256(g < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
    return _mm256_or_si256(low, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), _mm256_set1_epi8(3)), 4));
}

/* n_rows rows of Q4_K / Q5_K (q5) · activations of kind act (x: ce_block_q8a or ce_block_x16 blocks),
 * as vec_dot_k_q8a_generic: per sub-block s (one activation block) an exact int32 dot in eight lanes
 * (8-bit: maddubs of the quants with the activations; fixed point: the quants as int16 against hi and
 * lo), scaled by d scale_s d_x; the minimums' term dmin min_s (s_x or Σx) apart. Each row alone. */
TARGET static inline __attribute__((always_inline)) void k_rows(const uint8_t *w, size_t row_bytes, int n_rows, int q5,
                                                                 int act, const void *x, int64_t superblocks, float *y) {
    const size_t bb = q5 ? sizeof(ce_block_q5_k) : sizeof(ce_block_q4_k);
    __m256 acc[GROUP_ROWS];
    float off[GROUP_ROWS];
    for (int r = 0; r < n_rows; r++) acc[r] = _mm256_setzero_ps(), off[r] = 0.0f;
    for (int64_t i = 0; i < superblocks; i++) {
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * bb, n_rows * bb);
        for (int r = 0; r < n_rows; r++) {
            const ce_block_q5_k *k5 = (const ce_block_q5_k *)(w + r * row_bytes + i * bb);
            const ce_block_q4_k *k4 = (const ce_block_q4_k *)k5;
            const float d = half(k4->d), dmin = half(k4->dmin);
            const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)k5->qh) : _mm256_setzero_si256();
            for (int sub = 0; sub < 8; sub++) {
                const __m256i q = k_quants(q5 ? k5->qs : k4->qs, qh, q5, sub);
                const int64_t b = i * (CE_QK_K / CE_QK) + sub; /* the activation block */
                int scale, min;
                ce_k_scale_min(k4->scales, sub, &scale, &min);
                __m256 dot;
                float dx, sx;
                if (act == ACT_Q8A) {
                    const ce_block_q8a *xb = (const ce_block_q8a *)x + b;
                    dot = _mm256_cvtepi32_ps(dot_u8_i8(q, _mm256_loadu_si256((const __m256i *)xb->qs)));
                    dx = xb->d, sx = xb->s;
                } else {
                    const ce_block_x16 *xb = (const ce_block_x16 *)x + b;
                    dot = x16_block_dot(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)),
                                        _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)), xb);
                    dx = xb->d, sx = xb->sum;
                }
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)scale * dx), dot, acc[r]);
                off[r] += dmin * (float)min * sx;
            }
        }
    }
    for (int r = 0; r < n_rows; r++) y[r] = hsum(acc[r]) - off[r];
}

/* n_rows rows of Q6_K · activations of kind act, as vec_dot_q6_k_q8a_generic: per activation block the
 * block's two 16-value sub-blocks, exact in int32 — 8-bit: maddubs(q, y) - maddubs(32, y) gives int16
 * pair sums of (q - 32) y (|.| <= 8128), lanes 0-7 the first sub-block and 8-15 the second, and one
 * madd by their scales the int32 sums; fixed point: scale (q - 32) as int16 (|.| <= 4096) against hi
 * and lo — scaled by d d_x. Each row alone. */
TARGET static inline __attribute__((always_inline)) void q6_k_rows(const uint8_t *w, size_t row_bytes, int n_rows,
                                                                    int act, const void *x, int64_t superblocks, float *y) {
    const size_t bb = sizeof(ce_block_q6_k);
    const __m256i bias = _mm256_set1_epi8(32);
    __m256 acc[GROUP_ROWS];
    for (int r = 0; r < n_rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < superblocks; i++) {
        prefetch_ahead(w, n_rows * row_bytes, i * n_rows * bb, n_rows * bb);
        for (int r = 0; r < n_rows; r++) {
            const ce_block_q6_k *blk = (const ce_block_q6_k *)(w + r * row_bytes + i * bb);
            const float d = half(blk->d);
            for (int h = 0; h < 2; h++) {
                const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h));
                const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h + 32));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
                for (int g = 0; g < 4; g++) {
                    const __m256i q = q6_k_quants(ql0, ql1, qh, g);
                    const int8_t *sc = blk->scales + 8 * h + 2 * g;
                    const int64_t b = i * (CE_QK_K / CE_QK) + 4 * h + g; /* the activation block */
                    __m256 dot;
                    float dx;
                    if (act == ACT_Q8A) {
                        const ce_block_q8a *xb = (const ce_block_q8a *)x + b;
                        const __m256i y8 = _mm256_loadu_si256((const __m256i *)xb->qs);
                        const __m256i pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y8), _mm256_maddubs_epi16(bias, y8));
                        const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[1]), _mm_set1_epi16(sc[0]));
                        dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, scales));
                        dx = xb->d;
                    } else {
                        const ce_block_x16 *xb = (const ce_block_x16 *)x + b;
                        const __m256i centered = _mm256_sub_epi8(q, bias); /* q - 32 */
                        const __m256i w0 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(centered)), _mm256_set1_epi16(sc[0]));
                        const __m256i w1 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(centered, 1)), _mm256_set1_epi16(sc[1]));
                        dot = x16_block_dot(w0, w1, xb);
                        dx = xb->d;
                    }
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), dot, acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < n_rows; r++) y[r] = hsum(acc[r]);
}

#define Q4_K_Q8A(wr, n, yr) k_rows(wr, row_bytes, n, 0, ACT_Q8A, x, cols / CE_QK_K, yr)
#define Q5_K_Q8A(wr, n, yr) k_rows(wr, row_bytes, n, 1, ACT_Q8A, x, cols / CE_QK_K, yr)
#define Q6_K_Q8A(wr, n, yr) q6_k_rows(wr, row_bytes, n, ACT_Q8A, x, cols / CE_QK_K, yr)
#define Q4_K_X16(wr, n, yr) k_rows(wr, row_bytes, n, 0, ACT_X16, x, cols / CE_QK_K, yr)
#define Q5_K_X16(wr, n, yr) k_rows(wr, row_bytes, n, 1, ACT_X16, x, cols / CE_QK_K, yr)
#define Q6_K_X16(wr, n, yr) q6_k_rows(wr, row_bytes, n, ACT_X16, x, cols / CE_QK_K, yr)
MATVEC(q4_k, q8a, Q4_K_Q8A)
MATVEC(q5_k, q8a, Q5_K_Q8A)
MATVEC(q6_k, q8a, Q6_K_Q8A)
MATVEC(q4_k, x16, Q4_K_X16)
MATVEC(q5_k, x16, Q5_K_X16)
MATVEC(q6_k, x16, Q6_K_X16)

/* ---- fp32 activations on dequantized weights ---- */

/* The 32 weights of block i of a row as four vectors, elements 8g..8g+7 in v[g], with
 * ce_dequantize_row's values bit for bit: exact conversions, then the same one multiply (and, for
 * Q4_1, one add) per element. */
TARGET static inline __attribute__((always_inline)) void block_f32(const uint8_t *row, int type, int64_t i, __m256 v[4]) {
    if (type == CE_TYPE_F32 || type == CE_TYPE_F16) {
        UNROLL for (int g = 0; g < 4; g++)
            v[g] = type == CE_TYPE_F32 ? _mm256_loadu_ps((const float *)row + 32 * i + 8 * g)
                                       : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + 32 * i + 8 * g)));
        return;
    }
    if (type == CE_TYPE_Q5_0 || type == CE_TYPE_Q5_1) { /* q = nibble | (bit e of qh) << 4 for element e */
        const int q51 = type == CE_TYPE_Q5_1;
        const uint8_t *b = row + i * (q51 ? sizeof(ce_block_q5_1) : sizeof(ce_block_q5_0)), *qs = b + (q51 ? 8 : 6);
        uint16_t dm[2];
        uint32_t qh;
        memcpy(dm, b, q51 ? 4 : 2);
        memcpy(&qh, b + (q51 ? 4 : 2), 4);
        const __m256 d = _mm256_set1_ps(half(dm[0])), m = _mm256_set1_ps(q51 ? half(dm[1]) : 0.0f);
        UNROLL for (int g = 0; g < 4; g++) { /* elements 8g.. from bytes 8 (g % 2).., low nibbles for g < 2 */
            __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * (g & 1))));
            q = g < 2 ? _mm256_and_si256(q, _mm256_set1_epi32(0x0f)) : _mm256_srli_epi32(q, 4);
            const __m256i lanes = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * g));
            const __m256i fifth = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)qh), lanes), _mm256_set1_epi32(1));
            q = _mm256_or_si256(q, _mm256_slli_epi32(fifth, 4));
            v[g] = q51 ? _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m)
                       : _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(16))));
        }
        return;
    }
    const int kind = type == CE_TYPE_Q4_0 ? Q4_0 : type == CE_TYPE_Q4_1 ? Q4_1 : Q8_0;
    const uint8_t *b = row + i * BLOCK_BYTES(kind), *qs = b + QS_OFFSET(kind);
    uint16_t dm[2];
    memcpy(dm, b, kind == Q4_1 ? 4 : 2);
    const __m256 d = _mm256_set1_ps(half(dm[0]));
    UNROLL for (int g = 0; g < 4; g++) {
        __m256i q;
        if (kind == Q8_0) {
            q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * g)));
        } else { /* bytes 0-7 hold elements 0-7 (low nibbles) and 16-23 (high), bytes 8-15 the rest */
            q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * (g & 1))));
            q = g < 2 ? _mm256_and_si256(q, _mm256_set1_epi32(0x0f)) : _mm256_srli_epi32(q, 4);
            if (kind == Q4_0) q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
        }
        v[g] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
        if (kind == Q4_1) v[g] = _mm256_add_ps(v[g], _mm256_set1_ps(half(dm[1])));
    }
}

/* Every output is eight lanes of partial sums, lane l taking the columns j ≡ l (mod 8) in column
 * order through fused multiply-adds, then hsum: the order belongs to the output alone. */

/* R panel rows × K activation rows: y[k * ldy + r] */
TARGET static inline __attribute__((always_inline)) void tile_f32(const float *p, const int R, int64_t cols,
                                                                   const float *x, const int K, float *y, int64_t ldy) {
    __m256 acc[4][2];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int k = 0; k < K; k++) acc[r][k] = _mm256_setzero_ps();
    for (int64_t j = 0; j < cols; j += 8) {
        __m256 wv[4];
        UNROLL for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_ps(p + r * cols + j);
        UNROLL for (int k = 0; k < K; k++) {
            const __m256 xv = _mm256_loadu_ps(x + k * cols + j);
            UNROLL for (int r = 0; r < R; r++) acc[r][k] = _mm256_fmadd_ps(wv[r], xv, acc[r][k]);
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int k = 0; k < K; k++) y[k * ldy + r] = hsum(acc[r][k]);
}

TARGET static void matmul_f32_avx2(int type, const void *w, size_t row_bytes, int64_t rows, int64_t cols, const float *x,
                                   int n, float *y, int64_t ldy, float *panel) {
    if (cols % CE_QK) { /* float weights of a width that is not whole blocks: the generic order */
        ce_kernels_generic()->matmul_f32(type, w, row_bytes, rows, cols, x, n, y, ldy, panel);
        return;
    }
    const uint8_t *wr = w;
    if (rows > CE_TILE_ROWS / 2) { /* half a tile at a time: the panel stays in L1 */
        const int64_t half = CE_TILE_ROWS / 2;
        matmul_f32_avx2(type, w, row_bytes, half, cols, x, n, y, ldy, panel);
        matmul_f32_avx2(type, wr + half * row_bytes, row_bytes, rows - half, cols, x, n, y + half, ldy, panel);
        return;
    }
    if (!ce_simd_decoded(type)) { /* Q5 and K-quants: the scalar dequantization, the same values */
        const ce_tensor tile = {w, type, cols, rows};
        for (int64_t r = 0; r < rows; r++) ce_dequantize_row(&tile, r, panel + r * cols);
    }
    for (int64_t r = 0; r < rows && ce_simd_decoded(type); r++)
        for (int64_t i = 0; i < cols / CE_QK; i++) {
            __m256 v[4];
            block_f32(wr + r * row_bytes, type, i, v);
            UNROLL for (int g = 0; g < 4; g++) _mm256_storeu_ps(panel + r * cols + 32 * i + 8 * g, v[g]);
        }
    for (int k = 0; k < n; k += 2) {
        const float *xk = x + (size_t)k * cols;
        float *yk = y + (size_t)k * ldy;
        int64_t r = 0;
        if (n - k >= 2) {
            for (; r + 4 <= rows; r += 4) tile_f32(panel + r * cols, 4, cols, xk, 2, yk + r, ldy);
            for (; r < rows; r++) tile_f32(panel + r * cols, 1, cols, xk, 2, yk + r, ldy);
        } else {
            for (; r + 4 <= rows; r += 4) tile_f32(panel + r * cols, 4, cols, xk, 1, yk + r, ldy);
            for (; r < rows; r++) tile_f32(panel + r * cols, 1, cols, xk, 1, yk + r, ldy);
        }
    }
}


/* Eight floats of row t, column j of a float-typed block (F32 or F16 converted). */
#define LOAD_ROW8(X, is_f16, t, n, j)                                                                     \
    ((is_f16) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(X) + (t) * (n) + (j)))) \
              : _mm256_loadu_ps((const float *)(X) + (t) * (n) + (j)))

/* The lane sums of eight vectors: out lane r = Σ lanes of a[r], as ((a0 + a1) + (a2 + a3)) + ((a4 + a5)
 * + (a6 + a7)) for every r. */
TARGET static inline __m256 hsum8(const __m256 a[8]) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* out[t] = X[t, :] · q, eight rows at a time (one accumulator per row, q loaded once for all). The
 * last rows run as a group of eight too, the missing ones reading row 0 and never stored, so a row's
 * score does not depend on how many rows there are. */
TARGET static inline void dot_rows_avx2(const void *X, int is_f16, const float *q, int64_t rows, int64_t n,
                                        float *out) {
    if (n % 8) { /* widths the model never has */
        for (int64_t t = 0; t < rows; t++)
            out[t] = is_f16 ? vec_dot_f16_avx2((const uint16_t *)X + t * n, q, n) : vec_dot_f32_avx2((const float *)X + t * n, q, n);
        return;
    }
    for (int64_t t0 = 0; t0 < rows; t0 += 8) {
        int64_t row[8];
        for (int r = 0; r < 8; r++) row[r] = t0 + r < rows ? t0 + r : 0;
        __m256 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j += 8) {
            const __m256 qj = _mm256_loadu_ps(q + j);
            for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(LOAD_ROW8(X, is_f16, row[r], n, j), qj, acc[r]);
        }
        float sums[8];
        _mm256_storeu_ps(sums, hsum8(acc));
        for (int r = 0; r < 8 && t0 + r < rows; r++) out[t0 + r] = sums[r];
    }
}

TARGET static void dot_rows_f32_avx2(const void *X, const float *q, int64_t rows, int64_t n, float *out) {
    dot_rows_avx2(X, 0, q, rows, n, out);
}

TARGET static void dot_rows_f16_avx2(const void *X, const float *q, int64_t rows, int64_t n, float *out) {
    dot_rows_avx2(X, 1, q, rows, n, out);
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

/* exp(x) for x <= 0, eight lanes (the recipe of CE_EXP_POLY in quant.h) */
TARGET static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 min_x = _mm256_set1_ps(CE_EXP_MIN_X);
    const __m256 underflow = _mm256_cmp_ps(x, min_x, _CMP_LT_OQ);
    x = _mm256_max_ps(x, min_x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(CE_EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(CE_EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(CE_EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(CE_EXP_POLY[0]);
    _Pragma("GCC unroll 8") for (int k = 1; k < CE_EXP_POLY_TERMS; k++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CE_EXP_POLY[k]));
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

/* silu(g) u = g u / (1 + exp(-g)), with exp taken of -|g| only: e = exp(-|g|), silu(g) = g / (1 + e)
 * for g >= 0 and g e / (1 + e) below. */
TARGET static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp_nonpositive(_mm256_or_ps(g, _mm256_set1_ps(-0.0f))); /* -|g| */
    const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.0f), e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_mul_ps(_mm256_div_ps(_mm256_mul_ps(g, num), _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

/* Eight lanes at a time; the last n % 8 through the same lanes of a copy, so every element gets the
 * same arithmetic wherever it sits. */
TARGET static void silu_mul_avx2(float *gate, const float *up, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(gate + j, silu_mul8(_mm256_loadu_ps(gate + j), _mm256_loadu_ps(up + j)));
    if (j < n) {
        float g[8] = {0}, u[8] = {0};
        memcpy(g, gate + j, sizeof(float) * (size_t)(n - j));
        memcpy(u, up + j, sizeof(float) * (size_t)(n - j));
        _mm256_storeu_ps(g, silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
        memcpy(gate + j, g, sizeof(float) * (size_t)(n - j));
    }
}

static const ce_kernels kernels_avx2 = {
    .name = CE_AVX2_VNNI ? "avx2-vnni" : "avx2",
    .matmul_f32 = matmul_f32_avx2,
    .quantize_x16 = quantize_x16_avx2,
    .matvec_x16 =
        {
            [CE_TYPE_Q4_0] = matvec_q4_0_x16_avx2,
            [CE_TYPE_Q4_1] = matvec_q4_1_x16_avx2,
            [CE_TYPE_Q8_0] = matvec_q8_0_x16_avx2,
            [CE_TYPE_Q5_0] = matvec_q5_0_x16_avx2,
            [CE_TYPE_Q5_1] = matvec_q5_1_x16_avx2,
            [CE_TYPE_Q4_K] = matvec_q4_k_x16_avx2,
            [CE_TYPE_Q5_K] = matvec_q5_k_x16_avx2,
            [CE_TYPE_Q6_K] = matvec_q6_k_x16_avx2,
        },
    .quantize_q8a = quantize_q8a_avx2,
    .matvec_q8a =
        {
            [CE_TYPE_Q4_0] = matvec_q4_0_q8a_avx2,
            [CE_TYPE_Q4_1] = matvec_q4_1_q8a_avx2,
            [CE_TYPE_Q8_0] = matvec_q8_0_q8a_avx2,
            [CE_TYPE_Q5_0] = matvec_q5_0_q8a_avx2,
            [CE_TYPE_Q5_1] = matvec_q5_1_q8a_avx2,
            [CE_TYPE_Q4_K] = matvec_q4_k_q8a_avx2,
            [CE_TYPE_Q5_K] = matvec_q5_k_q8a_avx2,
            [CE_TYPE_Q6_K] = matvec_q6_k_q8a_avx2,
        },
    .dot_rows = {[CE_TYPE_F32] = dot_rows_f32_avx2, [CE_TYPE_F16] = dot_rows_f16_avx2},
    .sum_rows = {[CE_TYPE_F32] = sum_rows_f32_avx2, [CE_TYPE_F16] = sum_rows_f16_avx2},
    .exp_shifted = exp_shifted_avx2,
    .silu_mul = silu_mul_avx2,
};

#if CE_AVX2_VNNI
const ce_kernels *ce_kernels_avx2_vnni(void) { return &kernels_avx2; }

int ce_cpu_has_avx2_vnni(void) {
    return ce_cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
#else
const ce_kernels *ce_kernels_avx2(void) { return &kernels_avx2; }

int ce_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

#else
#include "quant.h"
#if CE_AVX2_VNNI
const ce_kernels *ce_kernels_avx2_vnni(void) { return ce_kernels_generic(); }
int ce_cpu_has_avx2_vnni(void) { return 0; }
#else
const ce_kernels *ce_kernels_avx2(void) { return ce_kernels_generic(); }
int ce_cpu_has_avx2(void) { return 0; }
#endif
#endif
