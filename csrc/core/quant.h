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

/* SIMD kernel sets (csrc/arch); each falls back to generic where the build cannot have it. */
const ce_kernels *ce_kernels_avx2(void);
int ce_cpu_has_avx2(void);
const ce_kernels *ce_kernels_avx512(void);
int ce_cpu_has_avx512(void);

#endif
