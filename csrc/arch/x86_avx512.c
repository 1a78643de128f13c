/* AVX-512 kernels for fp32 activations (matmul_f32); every other entry is the AVX2 set's. Same
 * contract as the _generic kernels in core/quant.c. Compiled for any x86-64 through target attributes
 * and installed only when the CPU and the OS support 512-bit registers. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
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

TARGET static void matmul_f32_avx512(int type, const void *w, size_t row_bytes, int64_t rows, int64_t cols,
                                     const float *x, int n, float *y, int64_t ldy, float *panel) {
    if (cols % CE_QK) { /* float weights of a width that is not whole blocks: the generic order */
        ce_kernels_generic()->matmul_f32(type, w, row_bytes, rows, cols, x, n, y, ldy, panel);
        return;
    }
    const uint8_t *wr = w;
    if (!ce_simd_decoded(type)) { /* Q5 and K-quants: the scalar dequantization, the same values */
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


static ce_kernels kernels_avx512;
static pthread_once_t kernels_avx512_once = PTHREAD_ONCE_INIT;

static void kernels_avx512_init(void) {
    kernels_avx512 = *ce_kernels_avx2();
    kernels_avx512.name = "avx512";
    kernels_avx512.matmul_f32 = matmul_f32_avx512;
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
