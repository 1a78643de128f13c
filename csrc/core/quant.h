/* GGML block layouts (private to the core). Sizes pinned: they are the on-disk format. */
#ifndef CECOLLM_QUANT_H
#define CECOLLM_QUANT_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#include "cecollm/cecollm.h"

typedef struct {
    uint16_t d;              /* fp16 scale */
    uint8_t qs[CE_QK / 2];   /* element j in the low nibble of qs[j], element j+16 in the high */
} ce_block_q4_0;             /* x = d * (q - 8) */
static_assert(sizeof(ce_block_q4_0) == 18, "q4_0 block is 18 bytes");

typedef struct {
    uint16_t d, m;           /* fp16 scale and minimum */
    uint8_t qs[CE_QK / 2];
} ce_block_q4_1;             /* x = d * q + m */
static_assert(sizeof(ce_block_q4_1) == 20 && offsetof(ce_block_q4_1, m) == 2, "q4_1 block is d, m, qs: 20 bytes");

typedef struct {
    uint16_t d;
    int8_t qs[CE_QK];
} ce_block_q8_0;             /* x = d * q */
static_assert(sizeof(ce_block_q8_0) == 34, "q8_0 block is 34 bytes");

typedef struct {
    uint16_t d;
    uint8_t qh[4];          /* bit j: the fifth bit of element j */
    uint8_t qs[CE_QK / 2];  /* low four bits, as in Q4_0 */
} ce_block_q5_0;            /* x = d * (q - 16) */
static_assert(sizeof(ce_block_q5_0) == 22, "q5_0 block is 22 bytes");

typedef struct {
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[CE_QK / 2];
} ce_block_q5_1;            /* x = d * q + m */
static_assert(sizeof(ce_block_q5_1) == 24, "q5_1 block is 24 bytes");

/* K-quants: super-blocks of 256 in sub-blocks of 32 (Q4_K, Q5_K: 6-bit scales and minimums packed in
 * 12 bytes) or 16 (Q6_K: int8 scales). */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[CE_QK_K / 2];
} ce_block_q4_k;            /* x = d * scale_s * q - dmin * min_s */
static_assert(sizeof(ce_block_q4_k) == 144, "q4_K block is 144 bytes");

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[CE_QK_K / 8];
    uint8_t qs[CE_QK_K / 2];
} ce_block_q5_k;
static_assert(sizeof(ce_block_q5_k) == 176, "q5_K block is 176 bytes");

typedef struct {
    uint8_t ql[CE_QK_K / 2];  /* low four bits */
    uint8_t qh[CE_QK_K / 4];  /* high two bits */
    int8_t scales[CE_QK_K / 16];
    uint16_t d;
} ce_block_q6_k;              /* x = d * scale_s * (q - 32) */
static_assert(sizeof(ce_block_q6_k) == 210, "q6_K block is 210 bytes");

/* The 6-bit scale and minimum of sub-block s (0-7) of a Q4_K / Q5_K super-block: sub-blocks 0-3 in
 * the low six bits of bytes s and s + 4; sub-blocks 4-7 in the nibbles of byte s + 4, with the top two
 * bits of bytes s - 4 (scale) and s (minimum) above them. */
static inline void ce_k_scale_min(const uint8_t *sc, int s, int *scale, int *min) {
    if (s < 4) {
        *scale = sc[s] & 63, *min = sc[s + 4] & 63;
    } else {
        *scale = (sc[s + 4] & 0x0f) | (sc[s - 4] >> 6) << 4;
        *min = (sc[s + 4] >> 4) | (sc[s] >> 6) << 4;
    }
}

/* The 4- or 5-bit quant of element 32 s + l of a Q4_K / Q5_K super-block (qh: NULL for Q4_K): the
 * low nibbles of qs[32 (s / 2) ..] for even s, the high ones for odd s, and bit s of qh[l] as 16. */
static inline int ce_k_quant(const uint8_t *qs, const uint8_t *qh, int s, int l) {
    return (qs[32 * (s / 2) + l] >> (4 * (s % 2)) & 0x0f) | (qh != NULL ? (qh[l] >> s & 1) << 4 : 0);
}

/* The 6-bit quant of element e (0-255) of a Q6_K super-block, x = d * scales[e / 16] * (q - 32): in
 * each half of 128, elements 32 g + l take the low (g < 2) or high nibble of ql[32 (g % 2) + l] and
 * bits 2g, 2g + 1 of qh[l]. */
static inline int ce_q6_k_quant(const ce_block_q6_k *b, int e) {
    const int half = e / 128, g = e % 128 / 32, l = e % 32;
    const int low = b->ql[64 * half + 32 * (g & 1) + l] >> (4 * (g >> 1)) & 0x0f;
    return low | (b->qh[32 * half + l] >> (2 * g) & 3) << 4;
}

/* The types whose blocks the SIMD sets decode themselves in matmul_f32; they dequantize the others
 * (the K-quants) with ce_dequantize_row: the same values either way. */
static inline int ce_simd_decoded(int type) {
    return type == CE_TYPE_F32 || type == CE_TYPE_F16 || type == CE_TYPE_Q4_0 || type == CE_TYPE_Q4_1 ||
           type == CE_TYPE_Q8_0 || type == CE_TYPE_Q5_0 || type == CE_TYPE_Q5_1;
}

/* exp(x) for x <= 0 in the SIMD sets (one recipe for every vector width, so they agree lane for lane):
 * x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts so r is exact to float precision), exp(r) =
 * 1 + r + r² P(r) with Cephes' degree-5 P (about 1 ulp), times 2^n built in the exponent bits; below
 * CE_EXP_MIN_X the result (< 2^-126) is flushed to 0. CE_EXP_POLY: P's coefficients, highest first. */
#define CE_EXP_MIN_X (-87.3f)
#define CE_EXP_LOG2E 1.44269504088896341f
#define CE_EXP_LN2_HI 0.693359375f
#define CE_EXP_LN2_LO (-2.12194440e-4f)
#define CE_EXP_POLY_TERMS 6
static const float CE_EXP_POLY[CE_EXP_POLY_TERMS] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                                     4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/* SIMD kernel sets (csrc/arch); each falls back to generic where the build cannot have it. */
const ce_kernels *ce_kernels_avx2(void);
int ce_cpu_has_avx2(void);
const ce_kernels *ce_kernels_avx2_vnni(void); /* the AVX2 set's kernels built with VNNI dot products */
int ce_cpu_has_avx2_vnni(void);
const ce_kernels *ce_kernels_avx512(void);
int ce_cpu_has_avx512(void);

#endif
