/* AVX-512 kernels for fp32 activations (matmul_f32), prompt attention (attend_block) and, with VNNI,
 * prompts on 8-bit activations (matmul_q8a); every other entry is the AVX2 set's, from its VNNI build
 * (x86_avx2_vnni.c) where the CPU has VNNI. Same contract as the _generic kernels in core/quant.c.
 * Compiled for any x86-64 through target attributes and installed only when the CPU and the OS
 * support 512-bit registers. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "quant.h"

#define TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
/* Small fixed loops over rows and registers: unrolled so their accumulators stay in registers at -O2. */
#define UNROLL _Pragma("GCC unroll 4")

/* A half-precision scale in all sixteen lanes: one broadcast load, one conversion. */
TARGET static inline __m512 half_x16(uint16_t h) { return _mm512_cvtph_ps(_mm256_set1_epi16((int16_t)h)); }

/* The 32 weights of block i of a row as two vectors (elements 0-15, 16-31) with ce_dequantize_row's
 * values bit for bit. For the 4-bit types each block's 16 possible values are computed once, with the
 * same multiply (and add) ce_dequantize_row performs, and the nibbles pick from them (vpermps reads
 * only the low four bits of each index, so a byte's low nibble needs no mask). */
TARGET static inline __attribute__((always_inline)) void block_f32(const uint8_t *row, int type, int64_t i,
                                                                    __m512 *lo, __m512 *hi) {
    switch (type) {
    case CE_TYPE_F32:
        *lo = _mm512_loadu_ps((const float *)row + 32 * i);
        *hi = _mm512_loadu_ps((const float *)row + 32 * i + 16);
        return;
    case CE_TYPE_F16:
        *lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + 32 * i)));
        *hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + 32 * i + 16)));
        return;
    case CE_TYPE_Q8_0: {
        const ce_block_q8_0 *b = (const ce_block_q8_0 *)row + i;
        const __m512 d = half_x16(b->d);
        *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->qs))));
        *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16)))));
        return;
    }
    case CE_TYPE_Q5_0:
    case CE_TYPE_Q5_1: { /* 32 possible values in two vectors; q = nibble | (bit j of qh) << 4 */
        const int q51 = type == CE_TYPE_Q5_1;
        const uint8_t *b = row + i * (q51 ? sizeof(ce_block_q5_1) : sizeof(ce_block_q5_0));
        uint16_t dm[2];
        uint32_t qh;
        memcpy(dm, b, q51 ? 4 : 2);
        memcpy(&qh, b + (q51 ? 4 : 2), 4);
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 d = half_x16(dm[0]), sixteen = _mm512_set1_ps(16.0f);
        __m512 low, high; /* values of q in [0, 16) and [16, 32) */
        if (q51) {
            const __m512 m = half_x16(dm[1]);
            low = _mm512_add_ps(_mm512_mul_ps(d, iota), m);
            high = _mm512_add_ps(_mm512_mul_ps(d, _mm512_add_ps(iota, sixteen)), m);
        } else {
            low = _mm512_mul_ps(d, _mm512_sub_ps(iota, sixteen));
            high = _mm512_mul_ps(d, iota);
        }
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i bits = _mm512_set1_epi32((int32_t)qh), nibble = _mm512_set1_epi32(0x0f);
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + (q51 ? 8 : 6))));
        const __m512i fifth_lo = _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(bits, lanes), _mm512_set1_epi32(1)), 4);
        const __m512i fifth_hi = _mm512_slli_epi32(
            _mm512_and_si512(_mm512_srlv_epi32(bits, _mm512_add_epi32(lanes, _mm512_set1_epi32(16))), _mm512_set1_epi32(1)), 4);
        *lo = _mm512_permutex2var_ps(low, _mm512_or_si512(_mm512_and_si512(q, nibble), fifth_lo), high);
        *hi = _mm512_permutex2var_ps(low, _mm512_or_si512(_mm512_srli_epi32(q, 4), fifth_hi), high);
        return;
    }
    default: { /* Q4_0: d (q - 8); Q4_1: d q + m */
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512 table;
        const uint8_t *qs;
        if (type == CE_TYPE_Q4_0) {
            const ce_block_q4_0 *b = (const ce_block_q4_0 *)row + i;
            table = _mm512_mul_ps(half_x16(b->d), _mm512_sub_ps(iota, _mm512_set1_ps(8.0f)));
            qs = b->qs;
        } else { /* d and m converted together: lanes alternate d, m */
            const ce_block_q4_1 *b = (const ce_block_q4_1 *)row + i;
            uint32_t bits;
            memcpy(&bits, b, sizeof bits);
            const __m512 dm = _mm512_cvtph_ps(_mm256_set1_epi32((int32_t)bits));
            table = _mm512_add_ps(_mm512_mul_ps(_mm512_moveldup_ps(dm), iota), _mm512_movehdup_ps(dm));
            qs = b->qs;
        }
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
        *lo = _mm512_permutexvar_ps(q, table);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
        return;
    }
    }
}

/* Every output is sixteen lanes of partial sums, lane l taking the columns j ≡ l (mod 16) in column
 * order through fused multiply-adds, then _mm512_reduce_add_ps: the order belongs to the output alone. */

/* R panel rows × K activation rows: y[k * ldy + r] */
TARGET static inline __attribute__((always_inline)) void tile_f32(const float *p, const int R, int64_t cols,
                                                                   const float *x, const int K, float *y, int64_t ldy) {
    __m512 acc[4][4];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int k = 0; k < K; k++) acc[r][k] = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
        __m512 wv[4];
        UNROLL for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_ps(p + r * cols + j);
        UNROLL for (int k = 0; k < K; k++) {
            const __m512 xv = _mm512_loadu_ps(x + k * cols + j);
            UNROLL for (int r = 0; r < R; r++) acc[r][k] = _mm512_fmadd_ps(wv[r], xv, acc[r][k]);
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int k = 0; k < K; k++) y[k * ldy + r] = _mm512_reduce_add_ps(acc[r][k]);
}

/* K activation rows against every row of the panel: groups of four rows, then the rest one by one */
#define PANEL_ROWS_K(K)                                                                                      \
    TARGET static void panel_rows_##K(const float *p, int64_t rows, int64_t cols, const float *x, float *y, \
                                      int64_t ldy) {                                                       \
        int64_t r = 0;                                                                                      \
        for (; r + 4 <= rows; r += 4) tile_f32(p + r * cols, 4, cols, x, K, y + r, ldy);                     \
        for (; r < rows; r++) tile_f32(p + r * cols, 1, cols, x, K, y + r, ldy);                             \
    }
PANEL_ROWS_K(1)
PANEL_ROWS_K(2)
PANEL_ROWS_K(3)
PANEL_ROWS_K(4)
#undef PANEL_ROWS_K

/* ---- batches above CE_SMALL_BATCH (prompts): broadcast form ----
 * The tile's weight rows (at most 32) are dequantized once into the panel column by column,
 * panel[j * 32 + r] (rows past `rows` zero), so column j of the 32 rows is two vectors. Each
 * activation x[i][j] is broadcast and multiplied into them: output (i, r) is lane r of one
 * accumulator summed over j = 0, 1, ... in column order by fused multiply-adds, an order fixed by
 * the output alone. A pass holds BCAST_ROWS activation rows × 32 weight rows in 28 accumulators and
 * loads 2 weight vectors per 28 multiply-adds (the row form above loads one vector per two). */
#define BCAST_ROWS 14
static_assert(CE_TILE_ROWS == 32, "the broadcast form holds a tile's rows in two vectors");

/* 16 vectors v[r] (rows) become their transpose: v[c] lane r = old v[r] lane c */
TARGET static inline __attribute__((always_inline)) void transpose16(__m512 v[16]) {
    __m512 t[16];
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; i += 2) { /* 32-bit interleave of row pairs */
        t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; i += 4) /* 64-bit interleave: each 128-bit lane holds a 4 × 4 block's column */
        for (int k = 0; k < 2; k++) {
            const __m512d a = _mm512_castps_pd(t[i + k]), b = _mm512_castps_pd(t[i + k + 2]);
            v[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            v[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    /* v[4g + c] lane-quarter q holds column 4q + c... of rows 4g..4g+3: gather quarters across groups */
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
        const __m512 a = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88), b = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xdd);
        const __m512 e = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88), f = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xdd);
        t[c] = _mm512_shuffle_f32x4(a, e, 0x88);      /* quarter 0: columns c */
        t[8 + c] = _mm512_shuffle_f32x4(a, e, 0xdd);  /* quarter 2: columns 8 + c */
        t[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);  /* quarter 1: columns 4 + c */
        t[12 + c] = _mm512_shuffle_f32x4(b, f, 0xdd); /* quarter 3: columns 12 + c */
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) v[i] = t[i];
}

/* panel[j * 32 + r] = w_r[j] for r < rows (ce_dequantize_row's values), 0 for rows <= r < 32: a block
 * (or K-quant super-block) of 16 rows is decoded row by row into buf, then each 16 × 16 square of it
 * is transposed in registers into the panel. */
TARGET static void fill_panel_by_column(int type, const uint8_t *w, size_t row_bytes, int64_t rows, int64_t cols,
                                        float *panel) {
    const int simd = ce_simd_decoded(type);
    const int64_t step = simd ? CE_QK : CE_QK_K; /* columns decoded at a time: a block or a K-quant super-block */
    const size_t step_bytes = ce_row_bytes(type, step);
    float buf[16][CE_QK_K] __attribute__((aligned(64)));
    for (int h = 0; h < 2; h++) /* rows 16h .. 16h + 15 */
        for (int64_t j0 = 0; j0 < cols; j0 += step) {
            for (int r = 0; r < 16; r++) {
                const uint8_t *row = w + (16 * h + r) * row_bytes;
                if (16 * h + r >= rows)
                    memset(buf[r], 0, sizeof(float) * step);
                else if (simd) {
                    /* sixteen rows read side by side outrun the hardware prefetcher: ask 8 blocks ahead */
                    _mm_prefetch((const char *)row + (j0 / CE_QK + 8) * step_bytes, _MM_HINT_T0);
                    __m512 lo, hi;
                    block_f32(row, type, j0 / CE_QK, &lo, &hi);
                    _mm512_store_ps(buf[r], lo);
                    _mm512_store_ps(buf[r] + 16, hi);
                } else {
                    const ce_tensor piece = {row + j0 / step * step_bytes, type, step, 1};
                    ce_dequantize_row(&piece, 0, buf[r]);
                }
            }
            for (int64_t c0 = 0; c0 < step; c0 += 16) {
                __m512 v[16];
                _Pragma("GCC unroll 16") for (int r = 0; r < 16; r++) v[r] = _mm512_load_ps(buf[r] + c0);
                transpose16(v);
                float *col = panel + (j0 + c0) * 32 + 16 * h;
                _Pragma("GCC unroll 16") for (int c = 0; c < 16; c++) _mm512_storeu_ps(col + c * 32, v[c]);
            }
        }
}

/* T activation rows (x, cols apart) × the panel's 32 rows: y[t * ldy + r] for the rows in masks m0, m1 */
TARGET static inline __attribute__((always_inline)) void bcast_pass(const float *panel, int64_t cols, const float *x,
                                                                     const int T, float *y, int64_t ldy, __mmask16 m0,
                                                                     __mmask16 m1) {
    __m512 acc[BCAST_ROWS][2];
    _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j++) {
        const __m512 w0 = _mm512_loadu_ps(panel + 32 * j), w1 = _mm512_loadu_ps(panel + 32 * j + 16);
        _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) {
            const __m512 xb = _mm512_set1_ps(x[t * cols + j]);
            acc[t][0] = _mm512_fmadd_ps(w0, xb, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, xb, acc[t][1]);
        }
    }
    _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) {
        _mm512_mask_storeu_ps(y + t * ldy, m0, acc[t][0]);
        _mm512_mask_storeu_ps(y + t * ldy + 16, m1, acc[t][1]);
    }
}

#define BCAST_PASS(T)                                                                                      \
    TARGET static void bcast_pass_##T(const float *panel, int64_t cols, const float *x, float *y, int64_t ldy, \
                                      __mmask16 m0, __mmask16 m1) {                                          \
        bcast_pass(panel, cols, x, T, y, ldy, m0, m1);                                                         \
    }
BCAST_PASS(1) BCAST_PASS(2) BCAST_PASS(3) BCAST_PASS(4) BCAST_PASS(5) BCAST_PASS(6) BCAST_PASS(7)
BCAST_PASS(8) BCAST_PASS(9) BCAST_PASS(10) BCAST_PASS(11) BCAST_PASS(12) BCAST_PASS(13) BCAST_PASS(14)
#undef BCAST_PASS
static_assert(BCAST_ROWS == 14, "one pass function per row count up to BCAST_ROWS");

typedef void (*bcast_pass_fn)(const float *panel, int64_t cols, const float *x, float *y, int64_t ldy, __mmask16 m0,
                              __mmask16 m1);
static const bcast_pass_fn bcast_passes[BCAST_ROWS + 1] = {
    NULL,           bcast_pass_1,  bcast_pass_2,  bcast_pass_3,  bcast_pass_4,  bcast_pass_5,  bcast_pass_6, bcast_pass_7,
    bcast_pass_8,   bcast_pass_9,  bcast_pass_10, bcast_pass_11, bcast_pass_12, bcast_pass_13, bcast_pass_14};

/* n activation rows (x, cols apart) against the panel: passes of BCAST_ROWS rows, the last taking the rest */
TARGET static void bcast_rows(const float *panel, int64_t cols, const float *x, int n, float *y, int64_t ldy,
                              __mmask16 m0, __mmask16 m1) {
    for (int i = 0; i < n; i += BCAST_ROWS)
        bcast_passes[n - i < BCAST_ROWS ? n - i : BCAST_ROWS](panel, cols, x + (size_t)i * cols, y + (size_t)i * ldy, ldy,
                                                              m0, m1);
}

/* Up to CE_SMALL_BATCH rows: the row form, every output's order the same for any n (decode's); above,
 * the broadcast form (a different order, the same for any n above). */
TARGET static void matmul_f32_avx512(int type, const void *w, size_t row_bytes, int64_t rows, int64_t cols,
                                     const float *x, int n, float *y, int64_t ldy, float *panel) {
    if (cols % CE_QK) { /* float weights of a width that is not whole blocks: the generic order */
        ce_kernels_generic()->matmul_f32(type, w, row_bytes, rows, cols, x, n, y, ldy, panel);
        return;
    }
    const uint8_t *wr = w;
    if (n > CE_SMALL_BATCH) {
        fill_panel_by_column(type, wr, row_bytes, rows, cols, panel);
        const __mmask16 m0 = rows >= 16 ? 0xffff : (__mmask16)((1u << rows) - 1);
        const __mmask16 m1 = rows >= 32 ? 0xffff : rows > 16 ? (__mmask16)((1u << (rows - 16)) - 1) : 0;
        bcast_rows(panel, cols, x, n, y, ldy, m0, m1);
        return;
    }
    if (rows > CE_TILE_ROWS / 2) { /* the row form, half a tile at a time: its panel stays in L1 */
        const int64_t half = CE_TILE_ROWS / 2;
        matmul_f32_avx512(type, w, row_bytes, half, cols, x, n, y, ldy, panel);
        matmul_f32_avx512(type, wr + half * row_bytes, row_bytes, rows - half, cols, x, n, y + half, ldy, panel);
        return;
    }
    if (!ce_simd_decoded(type)) { /* K-quants: the scalar dequantization, the same values */
        const ce_tensor tile = {w, type, cols, rows};
        for (int64_t r = 0; r < rows; r++) ce_dequantize_row(&tile, r, panel + r * cols);
    }
    for (int64_t r = 0; r < rows && ce_simd_decoded(type); r++)
        for (int64_t i = 0; i < cols / CE_QK; i++) {
            __m512 lo, hi;
            block_f32(wr + r * row_bytes, type, i, &lo, &hi);
            _mm512_storeu_ps(panel + r * cols + 32 * i, lo);
            _mm512_storeu_ps(panel + r * cols + 32 * i + 16, hi);
        }
    int k = 0;
    for (; k + 4 <= n; k += 4) panel_rows_4(panel, rows, cols, x + (size_t)k * cols, y + (size_t)k * ldy, ldy);
    if (n - k == 3) panel_rows_3(panel, rows, cols, x + (size_t)k * cols, y + (size_t)k * ldy, ldy);
    if (n - k == 2) panel_rows_2(panel, rows, cols, x + (size_t)k * cols, y + (size_t)k * ldy, ldy);
    if (n - k == 1) panel_rows_1(panel, rows, cols, x + (size_t)k * cols, y + (size_t)k * ldy, ldy);
}


/* ---- attention of prompt rows: up to 32 queries of one head against one kv head ----
 * Scores in the broadcast form: the queries, scaled by 1/√hd, are the panel (qt[d * 32 + i]) and each
 * key row is broadcast over them, so st[t * 32 + i] is key t's score for query i. The softmax runs
 * down the columns, a query per lane; then each weight st[t * 32 + i] is broadcast over 64 value
 * columns of key t. Every sum runs over the keys in order (keys past a query's position weigh an
 * exact 0), so a query's result does not depend on the others in its block. */
#define VALUE_PASS_QUERIES 12 /* × 32 value columns in 24 accumulators: two value loads per 24 multiply-adds */

/* exp(x) for x <= 0, sixteen lanes (the recipe of CE_EXP_POLY in quant.h, as the AVX2 set's) */
TARGET static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 min_x = _mm512_set1_ps(CE_EXP_MIN_X);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, min_x, _CMP_LT_OQ);
    x = _mm512_max_ps(x, min_x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(CE_EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CE_EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CE_EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(CE_EXP_POLY[0]);
    _Pragma("GCC unroll 8") for (int k = 1; k < CE_EXP_POLY_TERMS; k++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CE_EXP_POLY[k]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~underflow, p, _mm512_castsi512_ps(scale));
}

/* out[i * ldo + c] for the pass's VALUE_PASS_QUERIES queries (columns i0.. of st) and 32 value columns
 * c0.. of V: Σ_{t < keys} st[t * 32 + i] V[t][c] × inv[i] */
TARGET static inline __attribute__((always_inline)) void value_pass(const void *V, const int f16, int hd, const float *st,
                                                                     int i0, int keys, int c0, const float *inv,
                                                                     float *out, int64_t ldo) {
    __m512 acc[VALUE_PASS_QUERIES][2];
    _Pragma("GCC unroll 16") for (int i = 0; i < VALUE_PASS_QUERIES; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const float *weights = st + i0; /* key t's weights at weights[32 t + i] */
    for (int t = 0; t < keys; t++, weights += 32) {
        __m512 v[2];
        _Pragma("GCC unroll 2") for (int k = 0; k < 2; k++) {
            const size_t at = (size_t)t * hd + c0 + 16 * k;
            v[k] = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)V + at)))
                       : _mm512_loadu_ps((const float *)V + at);
        }
        _Pragma("GCC unroll 16") for (int i = 0; i < VALUE_PASS_QUERIES; i++) {
            const __m512 w = _mm512_set1_ps(weights[i]);
            acc[i][0] = _mm512_fmadd_ps(v[0], w, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(v[1], w, acc[i][1]);
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < VALUE_PASS_QUERIES; i++) {
        const __m512 s = _mm512_set1_ps(inv[i0 + i]);
        _mm512_storeu_ps(out + i * ldo, _mm512_mul_ps(acc[i][0], s));
        _mm512_storeu_ps(out + i * ldo + 16, _mm512_mul_ps(acc[i][1], s));
    }
}

TARGET static void value_pass_f32(const void *V, int hd, const float *st, int i0, int keys, int c0, const float *inv,
                                  float *out, int64_t ldo) {
    value_pass(V, 0, hd, st, i0, keys, c0, inv, out, ldo);
}

TARGET static void value_pass_f16(const void *V, int hd, const float *st, int i0, int keys, int c0, const float *inv,
                                  float *out, int64_t ldo) {
    value_pass(V, 1, hd, st, i0, keys, c0, inv, out, ldo);
}

TARGET static void attend_block_avx512(int type, const void *K, const void *V, int hd, int nq, const float *q,
                                       int64_t ldq, const int *pos, float *out, int64_t ldo, float *scratch) {
    int keys = 0;
    for (int i = 0; i < nq; i++) keys = pos[i] + 1 > keys ? pos[i] + 1 : keys;
    if (nq < VALUE_PASS_QUERIES || hd % 32) { /* too few for the passes: query by query */
        for (int i = 0; i < nq; i++) ce_attend(q + i * ldq, K, V, type, pos[i], hd, scratch, out + i * ldo);
        return;
    }
    float *qt = scratch, *st = qt + (size_t)32 * hd, *kt = st + (size_t)32 * keys;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int d = 0; d < hd; d++)
        for (int i = 0; i < 32; i++) qt[d * 32 + i] = i < nq ? q[i * ldq + d] * scale : 0.0f;
    /* scores, BCAST_ROWS keys a pass (a tile of F16 keys converted to fp32 once for all 32 queries) */
    for (int t0 = 0; t0 < keys; t0 += BCAST_ROWS) {
        const int tile = keys - t0 < BCAST_ROWS ? keys - t0 : BCAST_ROWS;
        const float *rows = (const float *)K + (size_t)t0 * hd;
        if (type == CE_TYPE_F16) {
            const uint16_t *k16 = (const uint16_t *)K + (size_t)t0 * hd;
            for (int j = 0; j < tile * hd; j += 16)
                _mm512_storeu_ps(kt + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k16 + j))));
            rows = kt;
        }
        bcast_passes[tile](qt, hd, rows, st + (size_t)t0 * 32, 32, 0xffff, 0xffff);
    }
    /* softmax down each column, query i in lane i % 16 of half i / 16: keys past the lane's position
     * (all keys, for lanes past nq) weigh 0. Maxima and sums run over even and odd keys apart (two
     * chains each, the loop is latency-bound), the sums then add. */
    int lane_pos[32];
    for (int i = 0; i < 32; i++) lane_pos[i] = i < nq ? pos[i] : -1;
    const __m512i p[2] = {_mm512_loadu_si512(lane_pos), _mm512_loadu_si512(lane_pos + 16)};
    __m512 m[2][2], sum[2][2];
    for (int h = 0; h < 2; h++) m[h][0] = m[h][1] = _mm512_set1_ps(-INFINITY), sum[h][0] = sum[h][1] = _mm512_setzero_ps();
#define LIVE(t, h) _mm512_cmp_epi32_mask(_mm512_set1_epi32(t), p[h], _MM_CMPINT_LE)
    for (int t = 0; t < keys; t++)
        for (int h = 0; h < 2; h++) m[h][t & 1] = _mm512_mask_max_ps(m[h][t & 1], LIVE(t, h), m[h][t & 1], _mm512_loadu_ps(st + t * 32 + 16 * h));
    for (int h = 0; h < 2; h++) m[h][0] = _mm512_max_ps(m[h][0], m[h][1]);
    for (int t = 0; t < keys; t++)
        for (int h = 0; h < 2; h++) {
            float *at = st + t * 32 + 16 * h;
            const __m512 e = _mm512_maskz_mov_ps(LIVE(t, h), exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(at), m[h][0])));
            _mm512_storeu_ps(at, e);
            sum[h][t & 1] = _mm512_add_ps(sum[h][t & 1], e);
        }
#undef LIVE
    float inv[32];
    for (int h = 0; h < 2; h++) _mm512_storeu_ps(inv + 16 * h, _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(sum[h][0], sum[h][1])));
    /* values, VALUE_PASS_QUERIES queries a pass, each over the keys up to the pass's last position */
    for (int i0 = 0;; i0 += VALUE_PASS_QUERIES) {
        if (i0 > nq - VALUE_PASS_QUERIES) i0 = nq - VALUE_PASS_QUERIES;
        int last = 0;
        for (int i = 0; i < VALUE_PASS_QUERIES; i++) last = pos[i0 + i] > last ? pos[i0 + i] : last;
        for (int c0 = 0; c0 < hd; c0 += 32)
            (type == CE_TYPE_F16 ? value_pass_f16 : value_pass_f32)(V, hd, st, i0, last + 1, c0, inv, out + i0 * ldo + c0, ldo);
        if (i0 == nq - VALUE_PASS_QUERIES) break;
    }
}

/* ---- prompts with 8-bit activations (VNNI): matmul_q8a for Q4_0 and Q4_1 ----
 * The tile's 32 rows are repacked once into the panel, per block: the quants as unsigned bytes in
 * groups of four columns, group g of rows 16h.. in one vector (lane r: row 16h + r's columns 4g..4g+3),
 * then the rows' scales d_w and offset coefficients c_w (Q4_0: -8 d_w; Q4_1: the minimum m_w). A pass
 * of T activation rows broadcasts each row's four quants of a group and accumulates the block's exact
 * integer sums Σ q_w q_x with vpdpbusd (64 multiply-adds an instruction), then adds
 * d_w d_x Σ q_w q_x + c_w s_x to the output in block order: matvec_q8a's terms, one fixed order. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define Q8_PASS_ROWS 6 /* × 2 vectors of integer and of float sums: 24 accumulators */

typedef struct {
    int32_t quants[8][2][16]; /* [group][half][row]: four unsigned quants */
    float d[32], c[32];
} packed_block;
static_assert(sizeof(packed_block) <= 4 * 32 * CE_QK, "a tile's packed blocks fit its panel");

VNNI_TARGET static void pack_q4(int type, const uint8_t *w, size_t row_bytes, int64_t rows, int64_t cols,
                                packed_block *out) {
    const size_t block_bytes = type == CE_TYPE_Q4_0 ? sizeof(ce_block_q4_0) : sizeof(ce_block_q4_1);
    for (int64_t b = 0; b < cols / CE_QK; b++) {
        packed_block *p = out + b;
        memset(p, 0, sizeof *p); /* rows past `rows` add 0 */
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *blk = w + r * row_bytes + b * block_bytes;
            uint16_t dm[2];
            memcpy(dm, blk, type == CE_TYPE_Q4_0 ? 2 : 4);
            const float d = ce_fp16_to_fp32(dm[0]);
            p->d[r] = d;
            p->c[r] = type == CE_TYPE_Q4_0 ? -8.0f * d : ce_fp16_to_fp32(dm[1]);
            /* element j in the low nibble of qs[j], element j + 16 in the high one */
            const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + block_bytes - CE_QK / 2));
            const __m128i low = _mm_and_si128(qs, _mm_set1_epi8(0x0f));
            const __m128i high = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
            int32_t groups[8];
            _mm_storeu_si128((__m128i *)groups, low);
            _mm_storeu_si128((__m128i *)(groups + 4), high);
            for (int g = 0; g < 8; g++) p->quants[g][r / 16][r % 16] = groups[g];
        }
    }
}

/* T activation rows (x: blocks rows of cols / CE_QK blocks apart) against the packed tile */
VNNI_TARGET static inline __attribute__((always_inline)) void q8_pass(const packed_block *pk, int64_t blocks,
                                                                       const ce_block_q8a *x, const int T, float *y,
                                                                       int64_t ldy, __mmask16 m0, __mmask16 m1) {
    __m512 acc[Q8_PASS_ROWS][2];
    _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const packed_block *p = pk + b;
        __m512i sum[Q8_PASS_ROWS][2];
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) sum[t][0] = sum[t][1] = _mm512_setzero_si512();
        _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++) {
            const __m512i w0 = _mm512_loadu_si512(p->quants[g][0]), w1 = _mm512_loadu_si512(p->quants[g][1]);
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
                int32_t four;
                memcpy(&four, x[t * blocks + b].qs + 4 * g, 4);
                const __m512i xb = _mm512_set1_epi32(four);
                sum[t][0] = _mm512_dpbusd_epi32(sum[t][0], w0, xb);
                sum[t][1] = _mm512_dpbusd_epi32(sum[t][1], w1, xb);
            }
        }
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
            const ce_block_q8a *xb = &x[t * blocks + b];
            const __m512 dx = _mm512_set1_ps(xb->d), sx = _mm512_set1_ps(xb->s);
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(p->d + 16 * h), dx);
                acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t][h]), scale, acc[t][h]);
                acc[t][h] = _mm512_fmadd_ps(_mm512_loadu_ps(p->c + 16 * h), sx, acc[t][h]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
        _mm512_mask_storeu_ps(y + t * ldy, m0, acc[t][0]);
        _mm512_mask_storeu_ps(y + t * ldy + 16, m1, acc[t][1]);
    }
}

#define Q8_PASS(T)                                                                                              \
    VNNI_TARGET static void q8_pass_##T(const packed_block *pk, int64_t blocks, const ce_block_q8a *x, float *y,   \
                                        int64_t ldy, __mmask16 m0, __mmask16 m1) {                                \
        q8_pass(pk, blocks, x, T, y, ldy, m0, m1);                                                                  \
    }
Q8_PASS(1) Q8_PASS(2) Q8_PASS(3) Q8_PASS(4) Q8_PASS(5) Q8_PASS(6)
#undef Q8_PASS
static_assert(Q8_PASS_ROWS == 6, "one pass function per row count up to Q8_PASS_ROWS");
typedef void (*q8_pass_fn)(const packed_block *pk, int64_t blocks, const ce_block_q8a *x, float *y, int64_t ldy,
                           __mmask16 m0, __mmask16 m1);
static const q8_pass_fn q8_passes[Q8_PASS_ROWS + 1] = {NULL, q8_pass_1, q8_pass_2, q8_pass_3, q8_pass_4, q8_pass_5, q8_pass_6};

VNNI_TARGET static void matmul_q8a_q4(int type, const void *w, size_t row_bytes, int64_t rows, const ce_block_q8a *x,
                                      int64_t cols, int n, float *y, int64_t ldy, float *panel) {
    packed_block *pk = (packed_block *)panel;
    pack_q4(type, w, row_bytes, rows, cols, pk);
    const __mmask16 m0 = rows >= 16 ? 0xffff : (__mmask16)((1u << rows) - 1);
    const __mmask16 m1 = rows >= 32 ? 0xffff : rows > 16 ? (__mmask16)((1u << (rows - 16)) - 1) : 0;
    const int64_t blocks = cols / CE_QK;
    for (int i = 0; i < n; i += Q8_PASS_ROWS)
        q8_passes[n - i < Q8_PASS_ROWS ? n - i : Q8_PASS_ROWS](pk, blocks, x + i * blocks, y + (size_t)i * ldy, ldy, m0, m1);
}

VNNI_TARGET static void matmul_q8a_q4_0(const void *w, size_t row_bytes, int64_t rows, const ce_block_q8a *x,
                                        int64_t cols, int n, float *y, int64_t ldy, float *panel) {
    matmul_q8a_q4(CE_TYPE_Q4_0, w, row_bytes, rows, x, cols, n, y, ldy, panel);
}

VNNI_TARGET static void matmul_q8a_q4_1(const void *w, size_t row_bytes, int64_t rows, const ce_block_q8a *x,
                                        int64_t cols, int n, float *y, int64_t ldy, float *panel) {
    matmul_q8a_q4(CE_TYPE_Q4_1, w, row_bytes, rows, x, cols, n, y, ldy, panel);
}

static ce_kernels kernels_avx512;
static pthread_once_t kernels_avx512_once = PTHREAD_ONCE_INIT;

static void kernels_avx512_init(void) {
    kernels_avx512 = *(ce_cpu_has_avx2_vnni() ? ce_kernels_avx2_vnni() : ce_kernels_avx2());
    kernels_avx512.name = "avx512";
    kernels_avx512.matmul_f32 = matmul_f32_avx512;
    kernels_avx512.attend_block = attend_block_avx512;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
        kernels_avx512.matmul_q8a[CE_TYPE_Q4_0] = matmul_q8a_q4_0;
        kernels_avx512.matmul_q8a[CE_TYPE_Q4_1] = matmul_q8a_q4_1;
    }
}

const ce_kernels *ce_kernels_avx512(void) {
    pthread_once(&kernels_avx512_once, kernels_avx512_init);
    return &kernels_avx512;
}

int ce_cpu_has_avx512(void) {
    __builtin_cpu_init(); /* the AVX2 set's features too: its kernels fill the rest of the table */
    return ce_cpu_has_avx2() && __builtin_cpu_supports("avx512f");
}

#else
#include "quant.h"
const ce_kernels *ce_kernels_avx512(void) { return ce_kernels_generic(); }
int ce_cpu_has_avx512(void) { return 0; }
#endif
