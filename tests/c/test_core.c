/* C unit tests of the core, built twice by `make test`: optimized, and under ASan + UBSan.
 * Each kernel set is checked against a double-precision reference over dequantized weights; the
 * forward pass is checked for its exactness invariants on a small random model. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cecollm/cecollm.h"
#include "cecollm/wire.h"
#include "quant.h"

/* Tolerances, relative to Σ|w_j x_j| (the size of the terms summed): float accumulation over a few
 * thousand terms stays well inside these. */
#define TOL_DOT_REL 1e-5
#define TOL_FP16_REL 1e-3

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                                                                \
    do {                                                                                                \
        checks++;                                                                                       \
        if (!(cond)) {                                                                                  \
            failures++;                                                                                 \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                        \
            fprintf(stderr, __VA_ARGS__);                                                               \
            fprintf(stderr, "\n");                                                                      \
        }                                                                                               \
    } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rng_u32(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
static float rng_uniform(void) { return (float)rng_u32() / 4294967296.0f * 2.0f - 1.0f; }

/* Random bytes for a weight tensor of the given type, with sane (finite, small) scales. */
static void *random_tensor(int type, int64_t rows, int64_t cols) {
    size_t rb = ce_row_bytes(type, cols);
    uint8_t *p = malloc(rb * (size_t)rows);
    for (size_t i = 0; i < rb * (size_t)rows; i++) p[i] = (uint8_t)rng_u32();
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = p + rb * (size_t)r;
        switch (type) {
        case CE_TYPE_F32:
            for (int64_t j = 0; j < cols; j++) ((float *)row)[j] = rng_uniform();
            break;
        case CE_TYPE_F16:
            for (int64_t j = 0; j < cols; j++) ((uint16_t *)row)[j] = ce_fp32_to_fp16(rng_uniform());
            break;
        case CE_TYPE_Q4_0:
            for (int64_t b = 0; b < cols / CE_QK; b++) ((ce_block_q4_0 *)row)[b].d = ce_fp32_to_fp16(0.01f * rng_uniform());
            break;
        case CE_TYPE_Q4_1:
            for (int64_t b = 0; b < cols / CE_QK; b++) {
                ((ce_block_q4_1 *)row)[b].d = ce_fp32_to_fp16(0.01f * rng_uniform());
                ((ce_block_q4_1 *)row)[b].m = ce_fp32_to_fp16(0.05f * rng_uniform());
            }
            break;
        case CE_TYPE_Q8_0:
            for (int64_t b = 0; b < cols / CE_QK; b++) ((ce_block_q8_0 *)row)[b].d = ce_fp32_to_fp16(0.001f * rng_uniform());
            break;
        case CE_TYPE_Q5_0:
            for (int64_t b = 0; b < cols / CE_QK; b++) ((ce_block_q5_0 *)row)[b].d = ce_fp32_to_fp16(0.01f * rng_uniform());
            break;
        case CE_TYPE_Q5_1:
            for (int64_t b = 0; b < cols / CE_QK; b++) {
                ((ce_block_q5_1 *)row)[b].d = ce_fp32_to_fp16(0.01f * rng_uniform());
                ((ce_block_q5_1 *)row)[b].m = ce_fp32_to_fp16(0.05f * rng_uniform());
            }
            break;
        case CE_TYPE_Q4_K: /* scales up to 63: super-block scales small enough for finite products */
        case CE_TYPE_Q5_K:
            for (int64_t b = 0; b < cols / CE_QK_K; b++) {
                uint16_t *dm = (uint16_t *)(row + b * ce_row_bytes(type, CE_QK_K)); /* d, dmin lead both */
                dm[0] = ce_fp32_to_fp16(0.0002f * rng_uniform());
                dm[1] = ce_fp32_to_fp16(0.001f * rng_uniform());
            }
            break;
        case CE_TYPE_Q6_K:
            for (int64_t b = 0; b < cols / CE_QK_K; b++) ((ce_block_q6_k *)row)[b].d = ce_fp32_to_fp16(0.0001f * rng_uniform());
            break;
        }
    }
    return p;
}

static void test_fp16(void) {
    /* every finite half survives half -> float -> half unchanged */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if (((h >> 10) & 0x1f) == 0x1f) continue; /* inf / nan */
        if (ce_fp32_to_fp16(ce_fp16_to_fp32((uint16_t)h)) != h) bad++;
    }
    CHECK(bad == 0, "%d halves do not round-trip", bad);
    CHECK(ce_fp16_to_fp32(0x3c00) == 1.0f, "1.0");
    CHECK(ce_fp16_to_fp32(0xc000) == -2.0f, "-2.0");
    CHECK(ce_fp16_to_fp32(0x0001) == ldexpf(1.0f, -24), "smallest subnormal");
    CHECK(ce_fp32_to_fp16(65520.0f) == 0x7c00, "overflow to inf");
    CHECK(ce_fp32_to_fp16(1.0f + ldexpf(1.0f, -11)) == 0x3c00, "ties to even (down)");
    CHECK(ce_fp32_to_fp16(1.0f + 3 * ldexpf(1.0f, -11)) == 0x3c02, "ties to even (up)");
    CHECK(isnan(ce_fp16_to_fp32(ce_fp32_to_fp16(NAN))), "nan stays nan");
}

static void test_row_bytes(void) {
    CHECK(ce_row_bytes(CE_TYPE_Q4_1, 576) == 18 * 20, "q4_1 row");
    CHECK(ce_row_bytes(CE_TYPE_Q8_0, 64) == 2 * 34, "q8_0 row");
    CHECK(ce_row_bytes(CE_TYPE_Q4_0, 33) == 0, "partial block rejected");
    CHECK(ce_row_bytes(9, 64) == 0, "unknown type rejected (Q8_1)");
    CHECK(ce_row_bytes(CE_TYPE_Q4_K, 512) == 2 * 144 && ce_row_bytes(CE_TYPE_Q6_K, 64) == 0, "K-quant rows: whole super-blocks");
    CHECK(ce_row_bytes(CE_TYPE_F32, 0) == 0, "empty row rejected");
}

/* fp32 activations, every kernel set: each output within float rounding of a double-precision dot
 * over the dequantized row, and bit for bit the same whatever the batch around it, on each side of
 * CE_SMALL_BATCH: up to it, n = 1 (decode) and n = CE_SMALL_BATCH, each weight row alone or in a tile;
 * above it, n = 31, 26 and CE_SMALL_BATCH + 1 activation rows, a tile of 29 weight rows or its first
 * 7. Widths: whole blocks, and for the float types one that is not (40). */
static void test_matmul_f32(const ce_kernels *k) {
    static const int types[] = {CE_TYPE_F32,  CE_TYPE_F16,  CE_TYPE_Q4_0, CE_TYPE_Q4_1, CE_TYPE_Q8_0,
                                CE_TYPE_Q5_0, CE_TYPE_Q5_1, CE_TYPE_Q4_K, CE_TYPE_Q5_K, CE_TYPE_Q6_K};
    static const int64_t sizes[] = {32, 40, 64, 256, 576, 1536};
    enum { ROWS = CE_TILE_ROWS - 3, N = 31, FEW = 7, SMALL = CE_SMALL_BATCH };
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
            const int64_t cols = sizes[s];
            const size_t row_bytes = ce_row_bytes(types[t], cols);
            if (row_bytes == 0) continue; /* 40 columns: float types only; K-quants: whole super-blocks */
            void *w = random_tensor(types[t], ROWS, cols);
            ce_tensor tensor = {w, types[t], cols, ROWS};
            float *x = malloc(sizeof(float) * N * cols), *row = malloc(sizeof(float) * cols);
            float *panel = malloc(sizeof(float) * CE_TILE_ROWS * cols);
            float together[N][ROWS], part[N][ROWS], few[N][FEW], small[SMALL][ROWS], alone[N][ROWS];
            for (int64_t j = 0; j < N * cols; j++) x[j] = rng_uniform() * (j % 5 ? 1.0f : 20.0f);
            const char *name = ce_type_name(types[t]);
            /* above CE_SMALL_BATCH */
            k->matmul_f32(types[t], w, row_bytes, ROWS, cols, x, N, &together[0][0], ROWS, panel);
            k->matmul_f32(types[t], w, row_bytes, FEW, cols, x, N, &few[0][0], FEW, panel);
            k->matmul_f32(types[t], w, row_bytes, ROWS, cols, x + 5 * cols, N - 5, &part[5][0], ROWS, panel);
            for (int i = 5; i < N; i++)
                CHECK(memcmp(part[i], together[i], sizeof part[i]) == 0, "%s matmul_f32 %s cols %lld: row %d of %d differs in %d",
                      k->name, name, (long long)cols, i, N - 5, N);
            k->matmul_f32(types[t], w, row_bytes, ROWS, cols, x + (N - SMALL - 1) * cols, SMALL + 1,
                          &part[N - SMALL - 1][0], ROWS, panel);
            for (int i = N - SMALL - 1; i < N; i++)
                CHECK(memcmp(part[i], together[i], sizeof part[i]) == 0, "%s matmul_f32 %s cols %lld: row %d of %d differs in %d",
                      k->name, name, (long long)cols, i, SMALL + 1, N);
            for (int i = 0; i < N; i++)
                CHECK(memcmp(few[i], together[i], sizeof few[i]) == 0, "%s matmul_f32 %s cols %lld: a tile of %d rows differs",
                      k->name, name, (long long)cols, FEW);
            /* up to CE_SMALL_BATCH */
            k->matmul_f32(types[t], w, row_bytes, ROWS, cols, x, SMALL, &small[0][0], ROWS, panel);
            for (int i = 0; i < N; i++)
                for (int64_t r = 0; r < ROWS; r++)
                    k->matmul_f32(types[t], (const uint8_t *)w + r * row_bytes, row_bytes, 1, cols, x + i * cols, 1,
                                  &alone[i][r], 1, panel);
            for (int i = 0; i < SMALL; i++)
                CHECK(memcmp(small[i], alone[i], sizeof alone[i]) == 0, "%s matmul_f32 %s cols %lld: row %d of %d differs alone",
                      k->name, name, (long long)cols, i, SMALL);
            for (int i = 0; i < N; i++)
                for (int64_t r = 0; r < ROWS; r++) {
                    ce_dequantize_row(&tensor, r, row);
                    double ref = 0.0, mag = 0.0;
                    for (int64_t j = 0; j < cols; j++) {
                        ref += (double)row[j] * x[i * cols + j];
                        mag += fabs((double)row[j] * x[i * cols + j]);
                    }
                    CHECK(fabs(together[i][r] - ref) <= TOL_DOT_REL * mag + 1e-30 && fabs(alone[i][r] - ref) <= TOL_DOT_REL * mag + 1e-30,
                          "%s matmul_f32 %s cols %lld (%d, %lld): %g and %g vs %g (mag %g)", k->name, name, (long long)cols, i,
                          (long long)r, (double)together[i][r], (double)alone[i][r], ref, mag);
                }
            free(w);
            free(x);
            free(row);
            free(panel);
        }
    }
}

/* A matrix–vector kernel's row computed alone equals the same row computed among others, bit for bit:
 * results do not depend on how rows are split between threads, tiles or groups. */
static void check_rows_alone(const ce_kernels *k, const char *kernel, int type, int64_t cols, int rows,
                             const float *together, const float *alone) {
    for (int r = 0; r < rows; r++)
        CHECK(memcmp(&alone[r], &together[r], sizeof alone[r]) == 0, "%s %s %s cols %lld row %d alone: %g vs %g",
              k->name, kernel, ce_type_name(type), (long long)cols, r, (double)alone[r], (double)together[r]);
}

/* 8-bit activations: every kernel set quantizes exactly as the generic specification (bit for bit,
 * edge values included), and its integer dots match a double-precision dot of the dequantized weights
 * with the dequantized activations. */
static void test_q8a(const ce_kernels *k) {
    enum { COLS = 1536, BLOCKS = COLS / CE_QK };
    static float x[COLS];
    static ce_block_q8a got[BLOCKS], want[BLOCKS];
    for (int j = 0; j < COLS; j++) x[j] = rng_uniform() * (j < 512 ? 1.0f : 1e-3f);
    for (int j = 0; j < CE_QK; j++) x[j] = 0.0f;                    /* block 0: all zero */
    x[CE_QK] = NAN, x[2 * CE_QK] = INFINITY, x[3 * CE_QK] = -1e30f; /* blocks 1-3: hostile values */
    for (int j = 0; j < CE_QK; j++) x[4 * CE_QK + j] = (float)(j - 16) * 0.5f; /* block 4: ties at .5 */
    x[4 * CE_QK + 1] = 127.0f;
    k->quantize_q8a(x, got, COLS);
    ce_kernels_generic()->quantize_q8a(x, want, COLS);
    for (int b = 0; b < BLOCKS; b++) {
        CHECK(memcmp(&got[b], &want[b], sizeof got[b]) == 0, "%s quantize_q8a block %d equals generic", k->name, b);
        int32_t sum = 0;
        for (int j = 0; j < CE_QK; j++) sum += got[b].qs[j];
        CHECK(!isfinite(got[b].d) || got[b].s == got[b].d * (float)sum, "%s block %d s = d * sum", k->name, b);
        if (b >= 4) /* finite blocks: |x - d q| <= d / 2 */
            for (int j = 0; j < CE_QK; j++)
                CHECK(fabsf(x[b * CE_QK + j] - got[b].d * got[b].qs[j]) <= 0.5001f * got[b].d, "%s block %d elem %d",
                      k->name, b, j);
    }
    /* 7 rows: a group of four and three alone; 3 blocks: a pair and one alone */
    static const int types[] = {CE_TYPE_Q4_0, CE_TYPE_Q4_1, CE_TYPE_Q8_0, CE_TYPE_Q5_0, CE_TYPE_Q5_1,
                                CE_TYPE_Q4_K, CE_TYPE_Q5_K, CE_TYPE_Q6_K};
    static const int64_t sizes[] = {32, 96, 256, 576, COLS};
    enum { ROWS = 7 };
    float *row = malloc(sizeof(float) * COLS), dots[ROWS], alone[ROWS];
    for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
        const int64_t cols = sizes[c];
        for (int j = 0; j < cols; j++) x[j] = rng_uniform();
        k->quantize_q8a(x, got, cols);
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            if (ce_row_bytes(types[t], cols) == 0) continue; /* K-quant rows are whole super-blocks of 256 */
            void *w = random_tensor(types[t], ROWS, cols); /* random bytes: Q8_0 rows include -128 */
            ce_tensor tensor = {w, types[t], cols, ROWS};
            const size_t row_bytes = ce_row_bytes(types[t], cols);
            k->matvec_q8a[types[t]](w, row_bytes, ROWS, got, cols, dots);
            for (int64_t r = 0; r < ROWS; r++)
                k->matvec_q8a[types[t]]((const uint8_t *)w + r * row_bytes, row_bytes, 1, got, cols, &alone[r]);
            check_rows_alone(k, "matvec_q8a", types[t], cols, ROWS, dots, alone);
            for (int64_t r = 0; r < ROWS; r++) {
                ce_dequantize_row(&tensor, r, row);
                double ref = 0.0, mag = 0.0;
                for (int64_t j = 0; j < cols; j++) {
                    double xj = (double)got[j / CE_QK].d * got[j / CE_QK].qs[j % CE_QK];
                    ref += (double)row[j] * xj;
                    mag += fabs((double)row[j] * xj);
                }
                CHECK(fabs(dots[r] - ref) <= TOL_DOT_REL * mag + 1e-30, "%s matvec_q8a %s cols %lld row %lld: %g vs %g (mag %g)",
                      k->name, ce_type_name(types[t]), (long long)cols, (long long)r, (double)dots[r], ref, mag);
            }
            free(w);
        }
    }
    free(row);
}

/* The VNNI build of the AVX2 kernels computes the AVX2 build's bits: both sum exactly in int32. The
 * activations are all ±1 (every 8-bit quant at ±127, the largest products) and then random. */
static void test_vnni_same_bits(void) {
    if (!ce_cpu_has_avx2_vnni()) return;
    const ce_kernels *plain = ce_kernels_avx2(), *vnni = ce_kernels_avx2_vnni();
    enum { COLS = 1536, BLOCKS = COLS / CE_QK, ROWS = 7 };
    static float x[COLS];
    static ce_block_q8a q8[BLOCKS];
    static ce_block_x16 x16[BLOCKS];
    static const int types[] = {CE_TYPE_Q4_0, CE_TYPE_Q4_1, CE_TYPE_Q8_0, CE_TYPE_Q5_0,
                                CE_TYPE_Q5_1, CE_TYPE_Q4_K, CE_TYPE_Q5_K, CE_TYPE_Q6_K};
    static const int64_t sizes[] = {96, 256, 576, COLS};
    for (int extreme = 1; extreme >= 0; extreme--) {
        for (int j = 0; j < COLS; j++) x[j] = extreme ? (rng_u32() & 1 ? 1.0f : -1.0f) : rng_uniform();
        for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
            const int64_t cols = sizes[c];
            plain->quantize_q8a(x, q8, cols);
            plain->quantize_x16(x, x16, cols);
            for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
                if (ce_row_bytes(types[t], cols) == 0) continue;
                void *w = random_tensor(types[t], ROWS, cols);
                const size_t row_bytes = ce_row_bytes(types[t], cols);
                float a[ROWS], b[ROWS];
                plain->matvec_q8a[types[t]](w, row_bytes, ROWS, q8, cols, a);
                vnni->matvec_q8a[types[t]](w, row_bytes, ROWS, q8, cols, b);
                CHECK(memcmp(a, b, sizeof a) == 0, "vnni matvec_q8a %s cols %lld (extreme %d) = avx2 bit for bit",
                      ce_type_name(types[t]), (long long)cols, extreme);
                plain->matvec_x16[types[t]](w, row_bytes, ROWS, x16, cols, a);
                vnni->matvec_x16[types[t]](w, row_bytes, ROWS, x16, cols, b);
                CHECK(memcmp(a, b, sizeof a) == 0, "vnni matvec_x16 %s cols %lld (extreme %d) = avx2 bit for bit",
                      ce_type_name(types[t]), (long long)cols, extreme);
                free(w);
            }
        }
    }
}

/* exp_shifted of every kernel set against double-precision exp: each value within TOL_EXP_REL
 * (or below 1e-37 where exp underflows), and the returned sum within TOL_EXP_REL of the true sum. */
#define TOL_EXP_REL 1e-6
static void test_exp_shifted(const ce_kernels *k) {
    enum { N = 1003 }; /* not a multiple of 8: the scalar tail runs too */
    static float x[N];
    for (int j = 0; j < N; j++) x[j] = -100.0f * (float)j / (N - 1) + 2.0f; /* [-98, 2], shift 2 */
    x[7] = -INFINITY;
    x[8] = 2.0f;
    double want[N], total = 0.0;
    for (int j = 0; j < N; j++) total += want[j] = exp((double)x[j] - 2.0);
    const double sum = k->exp_shifted(x, 2.0f, N);
    for (int j = 0; j < N; j++)
        CHECK(fabs(x[j] - want[j]) <= TOL_EXP_REL * want[j] || (want[j] < 1e-37 && fabs(x[j]) < 1e-37),
              "%s exp_shifted element %d: %g vs %g", k->name, j, (double)x[j], want[j]);
    CHECK(fabs(sum - total) <= TOL_EXP_REL * total, "%s exp_shifted sum %g vs %g", k->name, sum, total);
}

/* silu_mul of every kernel set against double precision, on a length with a tail and on extremes */
static void test_silu_mul(const ce_kernels *k) {
    enum { N = 1003 };
    static float g[N], u[N], got[N];
    for (int j = 0; j < N; j++) g[j] = 12.0f * rng_uniform(), u[j] = rng_uniform();
    g[0] = 0.0f, g[1] = -100.0f, g[2] = 100.0f, g[3] = -87.0f, g[4] = -1e-30f, g[N - 1] = -3.5f;
    memcpy(got, g, sizeof g);
    k->silu_mul(got, u, N);
    for (int j = 0; j < N; j++) {
        const double want = (double)g[j] / (1.0 + exp(-(double)g[j])) * u[j];
        CHECK(fabs(got[j] - want) <= 4e-7 * fabs(want) + 1e-37, "%s silu_mul element %d (gate %g): %g vs %g", k->name, j,
              (double)g[j], (double)got[j], want);
    }
}

/* Attention's row kernels (scores and weighted value sums over a KV block) for F32 and F16 blocks,
 * against double precision, with widths that do and do not fill the 64-column register block. */
static void test_attention_rows(const ce_kernels *k) {
    enum { ROWS = 37, MAXN = 72 };
    static const int types[] = {CE_TYPE_F32, CE_TYPE_F16};
    static const int widths[] = {64, 72, 16};
    float q[MAXN], a[ROWS], out[ROWS], y[MAXN], row[MAXN];
    for (int j = 0; j < MAXN; j++) q[j] = rng_uniform();
    for (int t = 0; t < ROWS; t++) a[t] = rng_uniform();
    for (int ti = 0; ti < 2; ti++) {
        for (int wi = 0; wi < 3; wi++) {
            const int n = widths[wi], type = types[ti];
            void *X = random_tensor(type, ROWS, n);
            const ce_tensor tensor = {X, type, n, ROWS};
            k->dot_rows[type](X, q, ROWS, n, out);
            k->sum_rows[type](X, a, ROWS, n, y);
            double ysum[MAXN] = {0}, ymag[MAXN] = {0};
            for (int t = 0; t < ROWS; t++) {
                ce_dequantize_row(&tensor, t, row);
                double ref = 0.0, mag = 0.0;
                for (int j = 0; j < n; j++) {
                    ref += (double)row[j] * q[j], mag += fabs((double)row[j] * q[j]);
                    ysum[j] += (double)a[t] * row[j], ymag[j] += fabs((double)a[t] * row[j]);
                }
                CHECK(fabs(out[t] - ref) <= TOL_DOT_REL * mag + 1e-30, "%s dot_rows %s n %d row %d", k->name,
                      ce_type_name(type), n, t);
                float first[ROWS]; /* a row's score does not depend on how many rows there are */
                k->dot_rows[type](X, q, t + 1, n, first);
                CHECK(memcmp(&first[t], &out[t], sizeof out[t]) == 0, "%s dot_rows %s n %d row %d of %d", k->name,
                      ce_type_name(type), n, t, t + 1);
            }
            for (int j = 0; j < n; j++)
                CHECK(fabs(y[j] - ysum[j]) <= TOL_DOT_REL * ymag[j] + 1e-30, "%s sum_rows %s n %d col %d", k->name,
                      ce_type_name(type), n, j);
            free(X);
        }
    }
}

/* Prompts with 8-bit activations, where a set has matmul_q8a: each output within float rounding of a
 * double-precision dot of the dequantized weights and activations and of matvec_q8a's (the integer
 * sums are the same, the float sums over blocks may differ in order); bit for bit the same in a batch
 * of 31, 26 or 9 rows and in a tile of 29 or 7 weight rows. */
static void test_matmul_q8a(const ce_kernels *k) {
    static const int types[] = {CE_TYPE_Q4_0, CE_TYPE_Q4_1};
    static const int64_t sizes[] = {32, 576, 1536};
    enum { ROWS = CE_TILE_ROWS - 3, N = 31, FEW = 7, MAXC = 1536 };
    static ce_block_q8a xq[N * MAXC / CE_QK];
    static float x[MAXC], row[MAXC], together[N][ROWS], part[N][ROWS], few[N][FEW], alone[ROWS];
    float *panel = malloc(sizeof(float) * CE_TILE_ROWS * MAXC);
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        if (k->matmul_q8a[types[t]] == NULL) continue;
        for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
            const int64_t cols = sizes[c], blocks = cols / CE_QK;
            for (int i = 0; i < N; i++) {
                for (int64_t j = 0; j < cols; j++) x[j] = rng_uniform() * (j % 7 ? 1.0f : 10.0f);
                k->quantize_q8a(x, xq + i * blocks, cols);
            }
            void *w = random_tensor(types[t], ROWS, cols);
            const ce_tensor tensor = {w, types[t], cols, ROWS};
            const size_t row_bytes = ce_row_bytes(types[t], cols);
            const char *name = ce_type_name(types[t]);
            const ce_matmul_q8a_fn mm = k->matmul_q8a[types[t]];
            mm(w, row_bytes, ROWS, xq, cols, N, &together[0][0], ROWS, panel);
            mm(w, row_bytes, FEW, xq, cols, N, &few[0][0], FEW, panel);
            mm(w, row_bytes, ROWS, xq + 5 * blocks, cols, N - 5, &part[5][0], ROWS, panel);
            for (int i = 5; i < N; i++)
                CHECK(memcmp(part[i], together[i], sizeof part[i]) == 0, "%s matmul_q8a %s cols %lld: row %d differs in 26",
                      k->name, name, (long long)cols, i);
            mm(w, row_bytes, ROWS, xq + (N - 9) * blocks, cols, 9, &part[N - 9][0], ROWS, panel);
            for (int i = N - 9; i < N; i++)
                CHECK(memcmp(part[i], together[i], sizeof part[i]) == 0, "%s matmul_q8a %s cols %lld: row %d differs in 9",
                      k->name, name, (long long)cols, i);
            for (int i = 0; i < N; i++)
                CHECK(memcmp(few[i], together[i], sizeof few[i]) == 0, "%s matmul_q8a %s cols %lld: a tile of %d rows differs",
                      k->name, name, (long long)cols, FEW);
            for (int i = 0; i < N; i++) {
                k->matvec_q8a[types[t]](w, row_bytes, ROWS, xq + i * blocks, cols, alone);
                for (int64_t r = 0; r < ROWS; r++) {
                    ce_dequantize_row(&tensor, r, row);
                    double ref = 0.0, mag = 0.0;
                    for (int64_t j = 0; j < cols; j++) {
                        const ce_block_q8a *b = &xq[i * blocks + j / CE_QK];
                        ref += (double)row[j] * b->d * b->qs[j % CE_QK];
                        mag += fabs((double)row[j] * b->d * b->qs[j % CE_QK]);
                    }
                    CHECK(fabs(together[i][r] - ref) <= TOL_DOT_REL * mag + 1e-30 &&
                              fabs(together[i][r] - alone[r]) <= TOL_DOT_REL * mag + 1e-30,
                          "%s matmul_q8a %s cols %lld (%d, %lld): %g vs %g, matvec %g", k->name, name, (long long)cols, i,
                          (long long)r, (double)together[i][r], ref, (double)alone[r]);
                }
            }
            free(w);
        }
    }
    free(panel);
}

/* Attention of a block of prompt rows, where a set has it: each query against a double-precision
 * softmax attention over the keys up to its position, F32 and F16 caches, head widths of one and two
 * 64-column passes (and 32, which the set answers query by query); a query's result is the same in a
 * block of 32, in one of 12 (the fewest the passes take) or 13, and in one of 3 (query by query). */
static void test_attend_block(const ce_kernels *k) {
    if (k->attend_block == NULL) return;
    enum { KEYS = 90, NQ = 32, MAXHD = 128, LDQ = MAXHD + 8 };
    static const int types[] = {CE_TYPE_F32, CE_TYPE_F16}, widths[] = {64, 128, 32}, firsts[] = {0, 50};
    static float q[NQ * LDQ], out[NQ][LDQ], part[NQ][LDQ], krow[MAXHD], vrow[MAXHD];
    float *scratch = malloc(sizeof(float) * CE_ATTEND_SCRATCH(KEYS, MAXHD));
    for (int j = 0; j < NQ * LDQ; j++) q[j] = 2.0f * rng_uniform();
    for (int ti = 0; ti < 2; ti++)
        for (int wi = 0; wi < 3; wi++)
            for (int fi = 0; fi < 2; fi++) {
                const int type = types[ti], hd = widths[wi];
                void *K = random_tensor(type, KEYS, hd), *V = random_tensor(type, KEYS, hd);
                const ce_tensor kt = {K, type, hd, KEYS}, vt = {V, type, hd, KEYS};
                int pos[NQ];
                for (int i = 0; i < NQ; i++) pos[i] = firsts[fi] + i;
                k->attend_block(type, K, V, hd, NQ, q, LDQ, pos, &out[0][0], LDQ, scratch);
                for (int i = 0; i < NQ; i++) {
                    double scores[KEYS], m = -INFINITY, sum = 0.0, ref[MAXHD] = {0}, mag[MAXHD] = {0};
                    for (int t = 0; t <= pos[i]; t++) {
                        ce_dequantize_row(&kt, t, krow);
                        scores[t] = 0.0;
                        for (int j = 0; j < hd; j++) scores[t] += (double)q[i * LDQ + j] * krow[j];
                        scores[t] /= sqrt((double)hd);
                        m = fmax(m, scores[t]);
                    }
                    for (int t = 0; t <= pos[i]; t++) sum += scores[t] = exp(scores[t] - m);
                    for (int t = 0; t <= pos[i]; t++) {
                        ce_dequantize_row(&vt, t, vrow);
                        for (int j = 0; j < hd; j++) ref[j] += scores[t] / sum * vrow[j], mag[j] += scores[t] / sum * fabs(vrow[j]);
                    }
                    for (int j = 0; j < hd; j++)
                        CHECK(fabs(out[i][j] - ref[j]) <= 1e-5 * mag[j] + 1e-7, "%s attend_block %s hd %d query %d (pos %d) col %d: %g vs %g",
                              k->name, ce_type_name(type), hd, i, pos[i], j, (double)out[i][j], ref[j]);
                }
                static const int subsets[][2] = {{10, 12}, {19, 13}, {4, 3}}; /* first query, count */
                for (int b = 0; b < 3; b++) {
                    const int i0 = subsets[b][0], nq = subsets[b][1];
                    k->attend_block(type, K, V, hd, nq, q + i0 * LDQ, LDQ, pos + i0, &part[i0][0], LDQ, scratch);
                    for (int i = i0; i < i0 + nq; i++)
                        for (int j = 0; j < hd; j++)
                            CHECK(nq == 3 ? fabs(part[i][j] - out[i][j]) <= 1e-5 : part[i][j] == out[i][j],
                                  "%s attend_block %s hd %d: query %d alone in %d differs", k->name, ce_type_name(type), hd, i, nq);
                }
                free(K);
                free(V);
            }
    free(scratch);
}

/* The fixed-point realization of fp32 activations, where a kernel set has it: each value within
 * d / 131068 (plus float rounding) of its block, sums exact to float rounding, and dots within the
 * fp32 tolerance of double-precision dots with the original floats. */
static void test_x16(const ce_kernels *k) {
    if (k->quantize_x16 == NULL) return;
    enum { COLS = 1536, BLOCKS = COLS / CE_QK };
    static float x[COLS];
    static ce_block_x16 b[BLOCKS];
    for (int j = 0; j < COLS; j++) x[j] = rng_uniform() * (j % 7 ? 1.0f : 30.0f) * (j < 768 ? 1.0f : 1e-4f);
    for (int j = 0; j < CE_QK; j++) x[j] = 0.0f; /* an all-zero block */
    k->quantize_x16(x, b, COLS);
    for (int i = 0; i < BLOCKS; i++) {
        float amax = 0.0f;
        double sum = 0.0;
        for (int j = 0; j < CE_QK; j++) amax = fmaxf(amax, fabsf(x[i * CE_QK + j])), sum += x[i * CE_QK + j];
        for (int j = 0; j < CE_QK; j++) {
            double v = (double)b[i].d * (b[i].hi[j] + b[i].lo[j] / 65534.0);
            CHECK(fabs(v - x[i * CE_QK + j]) <= amax * 1e-8, "%s x16 block %d elem %d: %g vs %g", k->name, i, j, v,
                  (double)x[i * CE_QK + j]);
        }
        CHECK(fabs(b[i].sum - sum) <= 1e-6 * (fabs(sum) + amax), "%s x16 block %d sum", k->name, i);
    }
    /* 7 rows: a group of four and three alone; the first 96 columns (3 blocks) and all of them */
    static const int types[] = {CE_TYPE_Q4_0, CE_TYPE_Q4_1, CE_TYPE_Q8_0, CE_TYPE_Q5_0,
                                CE_TYPE_Q5_1, CE_TYPE_Q4_K, CE_TYPE_Q5_K, CE_TYPE_Q6_K};
    static const int64_t sizes[] = {96, 512, COLS};
    enum { ROWS = 7 };
    float *row = malloc(sizeof(float) * COLS), dots[ROWS], alone[ROWS];
    for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
        const int64_t cols = sizes[c];
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            if (ce_row_bytes(types[t], cols) == 0) continue; /* K-quant rows are whole super-blocks of 256 */
            void *w = random_tensor(types[t], ROWS, cols);
            ce_tensor tensor = {w, types[t], cols, ROWS};
            const size_t row_bytes = ce_row_bytes(types[t], cols);
            k->matvec_x16[types[t]](w, row_bytes, ROWS, b, cols, dots);
            for (int64_t r = 0; r < ROWS; r++)
                k->matvec_x16[types[t]]((const uint8_t *)w + r * row_bytes, row_bytes, 1, b, cols, &alone[r]);
            check_rows_alone(k, "matvec_x16", types[t], cols, ROWS, dots, alone);
            for (int64_t r = 0; r < ROWS; r++) {
                ce_dequantize_row(&tensor, r, row);
                double ref = 0.0, mag = 0.0;
                for (int64_t j = 0; j < cols; j++) ref += (double)row[j] * x[j], mag += fabs((double)row[j] * x[j]);
                CHECK(fabs(dots[r] - ref) <= TOL_DOT_REL * mag, "%s matvec_x16 %s cols %lld row %lld: %g vs %g (mag %g)",
                      k->name, ce_type_name(types[t]), (long long)cols, (long long)r, (double)dots[r], ref, mag);
            }
            free(w);
        }
    }
    free(row);
}

static void test_ops(void) {
    float x[64], w[64], y[64];
    for (int j = 0; j < 64; j++) x[j] = rng_uniform(), w[j] = rng_uniform();
    ce_rmsnorm(y, x, w, 64, 1e-5f);
    double ss = 0;
    for (int j = 0; j < 64; j++) ss += (double)x[j] * x[j];
    double scale = 1.0 / sqrt(ss / 64 + 1e-5);
    for (int j = 0; j < 64; j++) CHECK(fabs(y[j] - x[j] * scale * w[j]) < 1e-5, "rmsnorm %d", j);

    float s[5] = {1, 2, 3, 4, 1000};
    ce_softmax(s, 5);
    CHECK(fabsf(s[4] - 1.0f) < 1e-6f && s[0] >= 0.0f, "softmax with a large logit is stable");

    /* rope preserves each rotated pair's norm, and position 0 is the identity */
    float inv_freq[32], v[64], v0[64];
    for (int i = 0; i < 32; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / 64.0f);
    for (int style = 0; style < 2; style++) {
        for (int j = 0; j < 64; j++) v[j] = v0[j] = rng_uniform();
        ce_rope(v, 64, 0, inv_freq, style);
        CHECK(memcmp(v, v0, sizeof v) == 0, "rope at 0 is identity (style %d)", style);
        ce_rope(v, 64, 17, inv_freq, style);
        for (int i = 0; i < 32; i++) {
            int a = style == CE_ROPE_ADJACENT ? 2 * i : i, b = style == CE_ROPE_ADJACENT ? 2 * i + 1 : i + 32;
            float before = v0[a] * v0[a] + v0[b] * v0[b], after = v[a] * v[a] + v[b] * v[b];
            CHECK(fabsf(before - after) < 1e-5f, "rope keeps pair norms (style %d pair %d)", style, i);
        }
    }
}

/* A tiny random model: 3 layers, dim 64, 4 heads of 16 (2 kv heads), ffn 96, vocab 50. */
typedef struct {
    ce_model m;
    ce_layer layers[3];
    void *blobs[64];
    int n_blobs;
} tiny_model;

static ce_tensor tiny_tensor(tiny_model *t, int type, int64_t rows, int64_t cols) {
    void *p = random_tensor(type, rows, cols);
    t->blobs[t->n_blobs++] = p;
    return (ce_tensor){p, type, cols, rows};
}

static ce_tensor tiny_norm(tiny_model *t, int64_t cols) {
    float *p = malloc(sizeof(float) * cols);
    for (int64_t j = 0; j < cols; j++) p[j] = 1.0f + 0.1f * rng_uniform();
    t->blobs[t->n_blobs++] = p;
    return (ce_tensor){p, CE_TYPE_F32, cols, 1};
}

static void tiny_build(tiny_model *t) {
    memset(t, 0, sizeof *t);
    t->m.cfg = (ce_config){3, 64, 96, 4, 2, 16, 50, 10000.0f, 1e-5f, CE_ROPE_ADJACENT};
    t->m.token_embd = tiny_tensor(t, CE_TYPE_Q8_0, 50, 64);
    t->m.output_norm = tiny_norm(t, 64);
    t->m.output = t->m.token_embd;
    for (int l = 0; l < 3; l++) {
        ce_layer *L = &t->layers[l];
        L->attn_norm = tiny_norm(t, 64);
        L->wq = tiny_tensor(t, CE_TYPE_Q4_1, 64, 64);
        L->wk = tiny_tensor(t, CE_TYPE_Q4_0, 32, 64);
        L->wv = tiny_tensor(t, CE_TYPE_F16, 32, 64);
        L->wo = tiny_tensor(t, CE_TYPE_Q4_1, 64, 64);
        L->ffn_norm = tiny_norm(t, 64);
        L->w_gate = tiny_tensor(t, CE_TYPE_Q4_1, 96, 64);
        L->w_up = tiny_tensor(t, CE_TYPE_Q8_0, 96, 64);
        L->w_down = tiny_tensor(t, CE_TYPE_F32, 64, 96);
    }
    t->m.layers = t->layers;
}

static void tiny_free(tiny_model *t) {
    for (int i = 0; i < t->n_blobs; i++) free(t->blobs[i]);
    ce_model_free(&t->m);
}

/* A tiny model built and initialized for the given activations. */
static void tiny_init(tiny_model *t, int activations) {
    char err[CE_ERRLEN];
    tiny_build(t);
    t->m.activations = activations;
    CHECK(ce_model_init(&t->m, err, sizeof err) == CE_OK, "tiny model initializes: %s", err);
}

static void test_model_validation(void) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_build(&t);
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_OK, "tiny model initializes: %s", err);
    ce_model_free(&t.m);

    t.m.activations = 7;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL && strstr(err, "activation"), "bad activations: %s", err);
    t.m.activations = CE_ACT_F32;

    ce_tensor saved = t.layers[1].wk;
    t.layers[1].wk.rows = 31;
    err[0] = 0;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL && strstr(err, "blk.1.attn_k"), "bad shape named: %s", err);
    t.layers[1].wk = saved;

    t.layers[2].ffn_norm.type = CE_TYPE_F16;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL && strstr(err, "blk.2.ffn_norm"), "norm type: %s", err);
    t.layers[2].ffn_norm.type = CE_TYPE_F32;

    t.layers[0].w_up.type = 9;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL && strstr(err, "not supported"), "unknown type: %s", err);
    t.layers[0].w_up.type = CE_TYPE_Q8_0;

    t.m.cfg.n_kv_heads = 3;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL, "heads must group: %s", err);
    t.m.cfg.n_kv_heads = 2;

    /* RoPE frequency divisors (Llama 3 scaling): head_dim / 2 positive floats, each dividing its frequency */
    float factors[8] = {1, 1, 2, 4, 8, 8, 8, 8};
    t.m.rope_freqs = (ce_tensor){factors, CE_TYPE_F32, 8, 1};
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_OK, "rope_freqs accepted: %s", err);
    const float plain = 1.0f / powf(t.m.cfg.rope_theta, 6.0f / 16.0f);
    CHECK(t.m.rope_inv_freq[3] == plain / 4.0f, "rope_freqs divides: %g vs %g", (double)t.m.rope_inv_freq[3], (double)plain);
    ce_model_free(&t.m);
    factors[5] = 0.0f;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL && strstr(err, "rope_freqs[5]"), "zero divisor: %s", err);
    t.m.rope_freqs.cols = 7;
    CHECK(ce_model_init(&t.m, err, sizeof err) == CE_EINVAL && strstr(err, "rope_freqs"), "rope_freqs shape: %s", err);
    t.m.rope_freqs = (ce_tensor){0};
    tiny_free(&t);
}

/* Runs tokens through all layers one position at a time; returns the last hidden state in out. */
static void tiny_forward_tokens(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, const int32_t *tok, int n, float *h) {
    char err[CE_ERRLEN];
    for (int i = 0; i < n; i++) {
        ce_embed(m, 1, tok + i, h + (size_t)i * m->cfg.dim, err, sizeof err);
        ce_forward(m, kv, ws, 0, m->cfg.n_layers, 1, i, h + (size_t)i * m->cfg.dim, err, sizeof err);
    }
}

/* The KV cache type the model-level tests run with (both are exercised from main). */
static int test_kv_type = CE_TYPE_F32;

/* Bytes of npos positions of one kv head of the tiny model (head_dim 16). */
static size_t kv_bytes(int npos) { return ce_row_bytes(test_kv_type, 16) * (size_t)npos; }

static void test_forward_invariants(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    ce_model *m = &t.m;
    const int n = 6, d = 64;
    int32_t tok[6] = {3, 17, 42, 0, 49, 8};
    float one[6 * 64], batch[6 * 64], split[6 * 64];
    ce_workspace ws = {0};
    ce_kv_cache a, b, c;
    CHECK(ce_kv_cache_init(&a, &m->cfg, 0, 3, 16, test_kv_type, err, sizeof err) == CE_OK, "cache a");
    CHECK(ce_kv_cache_init(&b, &m->cfg, 0, 3, 16, test_kv_type, err, sizeof err) == CE_OK, "cache b");
    CHECK(ce_kv_cache_init(&c, &m->cfg, 0, 3, 16, test_kv_type, err, sizeof err) == CE_OK, "cache c");

    /* small batches are bitwise identical to one position at a time */
    tiny_forward_tokens(m, &a, &ws, tok, n, one);
    CHECK(ce_embed(m, n, tok, batch, err, sizeof err) == CE_OK, "embed");
    CHECK(ce_forward(m, &b, &ws, 0, 3, n, 0, batch, err, sizeof err) == CE_OK, "batch forward: %s", err);
    CHECK(memcmp(one, batch, sizeof one) == 0, "batch of %d == one at a time", n);
    for (int l = 0; l < 3; l++)
        for (int g = 0; g < 2; g++)
            CHECK(memcmp(ce_kv_cache_k(&a, l, g), ce_kv_cache_k(&b, l, g), kv_bytes(n)) == 0 &&
                      memcmp(ce_kv_cache_v(&a, l, g), ce_kv_cache_v(&b, l, g), kv_bytes(n)) == 0,
                  "kv equal layer %d head %d", l, g);

    /* a layer range split (edge [0,1), cloud [1,3)) composes to the whole */
    ce_embed(m, n, tok, split, err, sizeof err);
    CHECK(ce_forward(m, &c, &ws, 0, 1, n, 0, split, err, sizeof err) == CE_OK, "lower layers");
    CHECK(ce_forward(m, &c, &ws, 1, 3, n, 0, split, err, sizeof err) == CE_OK, "upper layers");
    CHECK(memcmp(split, batch, sizeof split) == 0, "split forward == whole forward");

    /* head on the last position (fp32 activations): logits agree with a sum over dequantized embedding rows */
    float logits[50], xn[64], row[64];
    CHECK(ce_head(m, &ws, NULL, 1, one + (n - 1) * d, 50, logits, err, sizeof err) == CE_OK, "head: %s", err);
    ce_rmsnorm(xn, one + (n - 1) * d, m->output_norm.data, d, m->cfg.norm_eps);
    for (int v = 0; v < 50 && activations == CE_ACT_F32; v += 7) {
        ce_dequantize_row(&m->output, v, row);
        double ref = 0, mag = 0;
        for (int j = 0; j < d; j++) ref += (double)row[j] * xn[j], mag += fabs((double)row[j] * xn[j]);
        CHECK(fabs(logits[v] - ref) <= TOL_DOT_REL * mag + 1e-30, "logit %d: %g vs %g", v, (double)logits[v], ref);
    }

    /* errors: gaps, capacity, layers outside the cache, bad tokens */
    float h[64] = {0};
    CHECK(ce_forward(m, &a, &ws, 0, 3, 1, n + 1, h, err, sizeof err) == CE_ERANGE, "gap rejected: %s", err);
    CHECK(ce_forward(m, &a, &ws, 0, 3, 1, 16, h, err, sizeof err) == CE_ERANGE, "past capacity rejected");
    ce_kv_cache upper;
    CHECK(ce_kv_cache_init(&upper, &m->cfg, 1, 3, 8, test_kv_type, err, sizeof err) == CE_OK, "upper cache");
    CHECK(ce_forward(m, &upper, &ws, 0, 3, 1, 0, h, err, sizeof err) == CE_EINVAL, "layer 0 not in upper cache");
    ce_kv_cache_free(&upper);
    CHECK(ce_kv_cache_init(&upper, &m->cfg, 2, 4, 8, test_kv_type, err, sizeof err) == CE_EINVAL, "range past n_layers");
    /* a cache of 2 MiB or more of keys sits on 2 MiB boundaries (where huge pages can back it) and works */
    ce_kv_cache large;
    CHECK(ce_kv_cache_init(&large, &m->cfg, 0, 3, 1 << 15, test_kv_type, err, sizeof err) == CE_OK, "large cache");
    CHECK((size_t)3 * m->cfg.n_kv_heads * m->cfg.head_dim * ce_row_bytes(test_kv_type, 1 << 15) >= (2u << 20) &&
              (uintptr_t)large.k % (2u << 20) == 0 && (uintptr_t)large.v % (2u << 20) == 0,
          "large cache's keys and values 2 MiB-aligned");
    memcpy(h, batch, sizeof h);
    CHECK(ce_forward(m, &large, &ws, 0, 3, 1, 0, h, err, sizeof err) == CE_OK, "large cache runs: %s", err);
    ce_kv_cache_free(&large);
    int32_t bad = 50;
    CHECK(ce_embed(m, 1, &bad, h, err, sizeof err) == CE_EINVAL, "token outside vocab");

    /* recomputing a position drops what followed it */
    memcpy(h, batch, sizeof h);
    CHECK(ce_forward(m, &b, &ws, 0, 3, 1, 2, h, err, sizeof err) == CE_OK, "recompute position 2");
    CHECK(b.len[0] == 3 && b.len[2] == 3, "lengths truncated to 3");

    /* truncation forgets positions; running them again restores the cache and outputs bit for bit */
    ce_kv_cache_truncate(&a, 4);
    CHECK(a.len[0] == 4 && a.len[1] == 4 && a.len[2] == 4, "truncated to 4");
    ce_kv_cache_truncate(&a, 9);
    CHECK(a.len[0] == 4, "truncating past the length changes nothing");
    float again[2 * 64];
    CHECK(ce_embed(m, 2, tok + 4, again, err, sizeof err) == CE_OK, "embed 4..5");
    CHECK(ce_forward(m, &a, &ws, 0, 3, 2, 4, again, err, sizeof err) == CE_OK, "rerun 4..5: %s", err);
    CHECK(memcmp(again, one + 4 * d, sizeof again) == 0, "rerun outputs equal the first run");
    for (int l = 0; l < 3; l++)
        CHECK(memcmp(ce_kv_cache_k(&a, l, 1), ce_kv_cache_k(&c, l, 1), kv_bytes(n)) == 0, "rerun keys layer %d", l);
    ce_kv_cache_truncate(&a, -1);
    CHECK(a.len[0] == 0 && a.len[2] == 0, "negative truncates to empty");

    ce_kv_cache_free(&a);
    ce_kv_cache_free(&b);
    ce_kv_cache_free(&c);
    ce_workspace_free(&ws);
    tiny_free(&t);
}

/* An F16 cache stores each key and value rounded to half precision (relative error <= 2^-11); the
 * hidden states after three layers stay within TOL_KV_F16 of the F32 cache's, relative to their
 * largest magnitude, and an unknown cache type is refused. */
#define TOL_KV_F16 2e-3
static void test_kv_f16_matches_f32(void) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, CE_ACT_F32);
    ce_model *m = &t.m;
    int32_t tok[6] = {3, 17, 42, 0, 49, 8};
    float h32[6 * 64], h16[6 * 64];
    ce_workspace ws = {0};
    ce_kv_cache a, b;
    CHECK(ce_kv_cache_init(&a, &m->cfg, 0, 3, 8, CE_TYPE_F32, err, sizeof err) == CE_OK, "f32 cache");
    CHECK(ce_kv_cache_init(&b, &m->cfg, 0, 3, 8, CE_TYPE_F16, err, sizeof err) == CE_OK, "f16 cache");
    tiny_forward_tokens(m, &a, &ws, tok, 6, h32);
    tiny_forward_tokens(m, &b, &ws, tok, 6, h16);
    float amax = 0.0f, diff = 0.0f;
    for (int j = 0; j < 6 * 64; j++) amax = fmaxf(amax, fabsf(h32[j])), diff = fmaxf(diff, fabsf(h16[j] - h32[j]));
    CHECK(diff <= TOL_KV_F16 * amax && diff > 0.0f, "f16 cache: max diff %g of max %g", (double)diff, (double)amax);
    ce_kv_cache c;
    CHECK(ce_kv_cache_init(&c, &m->cfg, 0, 3, 8, CE_TYPE_Q8_0, err, sizeof err) == CE_EINVAL && strstr(err, "F16"),
          "q8_0 cache refused: %s", err);
    ce_kv_cache_free(&a);
    ce_kv_cache_free(&b);
    ce_workspace_free(&ws);
    tiny_free(&t);
}

/* Catch-up at the C level: token q stops after layer 1 (an exit), then rides along with token p
 * through layers [1, 3); the cache equals one-at-a-time full passes, and the "exit at the last layer"
 * head equals the full model's logits. */
static void test_catch_up_composition(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    ce_model *m = &t.m;
    int32_t tok[4] = {5, 9, 33, 2};
    float plain[4 * 64], x[2 * 64], head_a[50], head_b[50];
    ce_workspace ws = {0};
    ce_kv_cache a, b;
    ce_kv_cache_init(&a, &m->cfg, 0, 3, 8, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&b, &m->cfg, 0, 3, 8, test_kv_type, err, sizeof err);
    tiny_forward_tokens(m, &a, &ws, tok, 4, plain);
    /* positions 0, 1 in full; 2 exits after layer 1; 3 carries 2 through layers [1, 3) */
    float h[64];
    for (int i = 0; i < 2; i++) {
        ce_embed(m, 1, tok + i, h, err, sizeof err);
        ce_forward(m, &b, &ws, 0, 3, 1, i, h, err, sizeof err);
    }
    ce_embed(m, 1, tok + 2, x, err, sizeof err);
    CHECK(ce_forward(m, &b, &ws, 0, 1, 1, 2, x, err, sizeof err) == CE_OK, "position 2 to its exit");
    CHECK(b.len[0] == 3 && b.len[1] == 2, "layers after the exit lack position 2");
    ce_embed(m, 1, tok + 3, x + 64, err, sizeof err);
    CHECK(ce_forward(m, &b, &ws, 0, 1, 1, 3, x + 64, err, sizeof err) == CE_OK, "position 3, layer 0");
    CHECK(ce_forward(m, &b, &ws, 1, 3, 2, 2, x, err, sizeof err) == CE_OK, "catch-up: positions 2-3 through [1, 3)");
    for (int l = 0; l < 3; l++)
        for (int g = 0; g < 2; g++)
            CHECK(memcmp(ce_kv_cache_k(&a, l, g), ce_kv_cache_k(&b, l, g), kv_bytes(4)) == 0 &&
                      memcmp(ce_kv_cache_v(&a, l, g), ce_kv_cache_v(&b, l, g), kv_bytes(4)) == 0,
                  "catch-up cache equals the plain pass (layer %d head %d)", l, g);
    CHECK(memcmp(x + 64, plain + 3 * 64, sizeof(float) * 64) == 0, "position 3's output equals the plain pass");
    ce_head(m, &ws, NULL, 1, x + 64, 50, head_a, err, sizeof err);
    ce_head(m, &ws, NULL, 1, plain + 3 * 64, 50, head_b, err, sizeof err);
    CHECK(memcmp(head_a, head_b, sizeof head_a) == 0, "exit at the last layer gives the full logits");
    int accept, top1;
    float conf;
    CHECK(ce_exit_decide(head_a, 50, CE_METRIC_MAX_PROB, 1.01f, &accept, &conf, &top1, err, sizeof err) == CE_OK && !accept,
          "a threshold above 1 disables the exit");
    CHECK(ce_exit_decide(head_a, 50, CE_METRIC_MAX_PROB, 0.0f, &accept, &conf, &top1, err, sizeof err) == CE_OK && accept,
          "threshold 0 always accepts");
    ce_kv_cache_free(&a);
    ce_kv_cache_free(&b);
    ce_workspace_free(&ws);
    tiny_free(&t);
}

/* Two sequences in one pass equal two separate passes, bit for bit (small batches). */
static void test_forward_multi(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    ce_model *m = &t.m;
    int32_t ta[3] = {1, 2, 3}, tb[2] = {40, 41};
    float ha[3 * 64], hb[2 * 64], both[5 * 64];
    ce_workspace ws = {0};
    ce_kv_cache a, b, a2, b2;
    ce_kv_cache_init(&a, &m->cfg, 1, 3, 8, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&b, &m->cfg, 1, 3, 8, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&a2, &m->cfg, 1, 3, 8, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&b2, &m->cfg, 1, 3, 8, test_kv_type, err, sizeof err);
    /* the first two positions of a, one of b, separately; then one more each, together */
    ce_embed(m, 3, ta, ha, err, sizeof err);
    ce_embed(m, 2, tb, hb, err, sizeof err);
    memcpy(both, ha, sizeof(float) * 2 * 64);
    memcpy(both + 2 * 64, hb, sizeof(float) * 64);
    CHECK(ce_forward(m, &a, &ws, 1, 3, 3, 0, ha, err, sizeof err) == CE_OK, "a alone");
    CHECK(ce_forward(m, &b, &ws, 1, 3, 2, 0, hb, err, sizeof err) == CE_OK, "b alone");
    ce_seq_rows first[2] = {{&a2, 0, 2}, {&b2, 0, 1}};
    CHECK(ce_forward_multi(m, &ws, 1, 3, 2, first, both, err, sizeof err) == CE_OK, "together: %s", err);
    ce_embed(m, 1, ta + 2, both, err, sizeof err);
    ce_embed(m, 1, tb + 1, both + 64, err, sizeof err);
    ce_seq_rows second[2] = {{&a2, 2, 1}, {&b2, 1, 1}};
    CHECK(ce_forward_multi(m, &ws, 1, 3, 2, second, both, err, sizeof err) == CE_OK, "together again: %s", err);
    CHECK(memcmp(both, ha + 2 * 64, sizeof(float) * 64) == 0 && memcmp(both + 64, hb + 64, sizeof(float) * 64) == 0,
          "outputs equal separate passes");
    for (int l = 1; l < 3; l++)
        for (int g = 0; g < 2; g++)
            CHECK(memcmp(ce_kv_cache_k(&a, l, g), ce_kv_cache_k(&a2, l, g), kv_bytes(3)) == 0 &&
                      memcmp(ce_kv_cache_v(&b, l, g), ce_kv_cache_v(&b2, l, g), kv_bytes(2)) == 0,
                  "caches equal separate passes (layer %d head %d)", l, g);
    ce_seq_rows same[2] = {{&a2, 3, 1}, {&a2, 3, 1}};
    CHECK(ce_forward_multi(m, &ws, 1, 3, 2, same, both, err, sizeof err) == CE_EINVAL, "one cache twice is refused");
    ce_kv_cache_free(&a);
    ce_kv_cache_free(&b);
    ce_kv_cache_free(&a2);
    ce_kv_cache_free(&b2);
    ce_workspace_free(&ws);
    tiny_free(&t);
}

/* Batches above CE_BATCH_CHUNK rows run in chunks: the same as the caller passing the chunks in turn,
 * bit for bit, also where a chunk boundary cuts a sequence of a multi-sequence batch. */
static void test_batch_chunks(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    ce_model *m = &t.m;
    enum { NA = CE_BATCH_CHUNK - 56, NB = 150, N = NA + NB, CAP = CE_BATCH_CHUNK, D = 64 };
    int32_t tokens[N];
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(rng_u32() % 50);
    float *whole = malloc(sizeof(float) * N * D), *parts = malloc(sizeof(float) * N * D);
    ce_embed(m, N, tokens, whole, err, sizeof err);
    memcpy(parts, whole, sizeof(float) * N * D);
    ce_workspace ws = {0};
    ce_kv_cache a, b, a2, b2;
    ce_kv_cache_init(&a, &m->cfg, 0, 3, CAP, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&b, &m->cfg, 0, 3, CAP, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&a2, &m->cfg, 0, 3, CAP, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&b2, &m->cfg, 0, 3, CAP, test_kv_type, err, sizeof err);
    ce_seq_rows both[2] = {{&a, 0, NA}, {&b, 0, NB}};
    CHECK(ce_forward_multi(m, &ws, 0, 3, 2, both, whole, err, sizeof err) == CE_OK, "one call: %s", err);
    /* by hand: rows [0, CE_BATCH_CHUNK) = all of a and b's first 56; then b's remaining 94 */
    const int cut = CE_BATCH_CHUNK - NA;
    ce_seq_rows first[2] = {{&a2, 0, NA}, {&b2, 0, cut}};
    CHECK(ce_forward_multi(m, &ws, 0, 3, 2, first, parts, err, sizeof err) == CE_OK, "first chunk: %s", err);
    CHECK(ce_forward(m, &b2, &ws, 0, 3, NB - cut, cut, parts + (size_t)CE_BATCH_CHUNK * D, err, sizeof err) == CE_OK,
          "second chunk: %s", err);
    CHECK(memcmp(whole, parts, sizeof(float) * N * D) == 0, "chunked batch equals its chunks in turn");
    for (int g = 0; g < 2; g++)
        CHECK(memcmp(ce_kv_cache_k(&b, 2, g), ce_kv_cache_k(&b2, 2, g), kv_bytes(NB)) == 0 &&
                  memcmp(ce_kv_cache_v(&a, 2, g), ce_kv_cache_v(&a2, 2, g), kv_bytes(NA)) == 0,
              "caches equal (kv head %d)", g);
    ce_kv_cache_free(&a);
    ce_kv_cache_free(&b);
    ce_kv_cache_free(&a2);
    ce_kv_cache_free(&b2);
    ce_workspace_free(&ws);
    free(whole);
    free(parts);
    tiny_free(&t);
}

/* ce_generate against the same steps taken one call at a time (embed, forward, head, ce_pick), for
 * greedy and sampled picks; the loop continued one token per call equals one call; end tokens stop
 * it without being stored; bad arguments are refused. */
static void test_generate(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    const ce_model *m = &t.m;
    enum { PROMPT = 3, N = 12, V = 50 };
    const int32_t prompt[PROMPT] = {4, 17, 30};
    for (int sampled = 0; sampled <= 1; sampled++) {
        const ce_sampler base = {sampled ? 0.9f : 0.0f, sampled ? 20 : 0, sampled ? 0.9f : 1.0f, 1.3f, {1, 2, 3, 4}};
        int32_t ref[N], got[N], step[N];
        int n_ref = 0;
        /* the reference: one core call per step */
        {
            ce_workspace ws = {0};
            ce_kv_cache kv;
            ce_kv_cache_init(&kv, &m->cfg, 0, 3, PROMPT + N, test_kv_type, err, sizeof err);
            float h[PROMPT * 64], logits[V];
            uint8_t seen[V] = {0};
            for (int i = 0; i < PROMPT; i++) seen[prompt[i]] = 1;
            ce_sampler s = base;
            tiny_forward_tokens(m, &kv, &ws, prompt, PROMPT, h);
            ce_head(m, &ws, NULL, 1, h + (PROMPT - 1) * 64, V, logits, err, sizeof err);
            for (int i = 0; i < N; i++) {
                int token;
                CHECK(ce_pick(&s, logits, V, seen, NULL, &token, err, sizeof err) == CE_OK, "pick: %s", err);
                ref[n_ref++] = token;
                seen[token] = 1;
                ce_embed(m, 1, &token, h, err, sizeof err);
                ce_forward(m, &kv, &ws, 0, 3, 1, PROMPT + i, h, err, sizeof err);
                ce_head(m, &ws, NULL, 1, h, V, logits, err, sizeof err);
            }
            ce_kv_cache_free(&kv);
            ce_workspace_free(&ws);
        }
        /* one call for all N, then one call per token */
        for (int per_token = 0; per_token <= 1; per_token++) {
            ce_workspace ws = {0};
            ce_kv_cache kv;
            ce_kv_cache_init(&kv, &m->cfg, 0, 3, PROMPT + N, test_kv_type, err, sizeof err);
            float h[PROMPT * 64], logits[V];
            uint8_t seen[V] = {0};
            for (int i = 0; i < PROMPT; i++) seen[prompt[i]] = 1;
            ce_sampler s = base;
            tiny_forward_tokens(m, &kv, &ws, prompt, PROMPT, h);
            ce_head(m, &ws, NULL, 1, h + (PROMPT - 1) * 64, V, logits, err, sizeof err);
            int n = 0, ended = 1, n_out;
            const int32_t no_end = -1;
            while (n < N) {
                const int want = per_token ? 1 : N - n;
                CHECK(ce_generate(m, &kv, &ws, &s, logits, seen, n ? got[n - 1] : -1, PROMPT + (n ? n - 1 : 0), want,
                                  &no_end, 1, 0, step, NULL, NULL, NULL, &n_out, &ended, err, sizeof err) == CE_OK,
                      "generate: %s", err);
                CHECK(n_out == want && !ended, "generate stored %d of %d", n_out, want);
                memcpy(got + n, step, sizeof(int32_t) * (size_t)n_out);
                n += n_out;
            }
            CHECK(memcmp(got, ref, sizeof ref) == 0, "generate (sampled %d, per token %d) = the step-by-step loop", sampled,
                  per_token);
            ce_kv_cache_free(&kv);
            ce_workspace_free(&ws);
        }
        /* an end token: the first greedy token ends the loop unstored */
        if (!sampled) {
            ce_workspace ws = {0};
            ce_kv_cache kv;
            ce_kv_cache_init(&kv, &m->cfg, 0, 3, PROMPT + N, test_kv_type, err, sizeof err);
            float h[PROMPT * 64], logits[V];
            uint8_t seen[V] = {0};
            for (int i = 0; i < PROMPT; i++) seen[prompt[i]] = 1;
            ce_sampler s = base;
            tiny_forward_tokens(m, &kv, &ws, prompt, PROMPT, h);
            ce_head(m, &ws, NULL, 1, h + (PROMPT - 1) * 64, V, logits, err, sizeof err);
            int n_out = -1, ended = 0;
            const int32_t end = ref[2];
            CHECK(ce_generate(m, &kv, &ws, &s, logits, seen, -1, PROMPT, N, &end, 1, 0, step, NULL, NULL, NULL, &n_out,
                              &ended, err, sizeof err) == CE_OK && ended,
                  "an end token ends generation");
            int first = 0;
            while (ref[first] != end) first++;
            CHECK(n_out == first && memcmp(step, ref, sizeof(int32_t) * (size_t)first) == 0, "tokens before the end: %d",
                  n_out);
            ce_sampler bad = base;
            bad.top_p = 0.0f;
            CHECK(ce_generate(m, &kv, &ws, &bad, logits, seen, -1, PROMPT, N, &end, 1, 0, step, NULL, NULL, NULL, &n_out,
                              &ended, err, sizeof err) == CE_EINVAL && strstr(err, "top_p"),
                  "bad sampler refused: %s", err);
            ce_kv_cache_free(&kv);
            ce_workspace_free(&ws);
        }
    }
    tiny_free(&t);
}

/* The C edge, driven through an exact exit pattern (the thresholds of each step choose its exit): the
 * exits' logits, the cache and the split states equal a plain pass's bit for bit, catch-up runs
 * longer than CE_SMALL_BATCH included; flush, rollback and a full sequence behave. */
static void test_edge_step(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    const ce_model *m = &t.m;
    enum { PROMPT = 3, N = 26, V = 50, D = 64, CAP = PROMPT + N };
    const int32_t prompt[PROMPT] = {4, 17, 30};
    /* exits per step: 11 at layer 1 (a catch-up run longer than CE_SMALL_BATCH), then mixed */
    const int pattern[N] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3, 1, 2, 2, 3, 1, 1, 3, 2, 1, 3, 3, 1, 2};
    int32_t tokens[N];
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(rng_u32() % V);
    const ce_exit_head heads[3] = {{.layer = 1}, {.layer = 2}, {.layer = 3}};
    ce_workspace ws = {0}, ws_ref = {0};
    ce_kv_cache kv, ref;
    ce_edge e;
    ce_kv_cache_init(&kv, &m->cfg, 0, 3, CAP, test_kv_type, err, sizeof err);
    ce_kv_cache_init(&ref, &m->cfg, 0, 3, CAP, test_kv_type, err, sizeof err);
    CHECK(ce_edge_init(&e, m, &kv, &ws, heads, 3, CE_METRIC_MAX_PROB, 0, 0, err, sizeof err) == CE_OK, "edge: %s", err);
    CHECK(ce_edge_prefill(&e, PROMPT, prompt, err, sizeof err) == CE_OK && e.layer_positions == PROMPT * 3, "prefill");
    float plain[CAP * D], h[D], logits[V], expect[V];
    tiny_forward_tokens(m, &ref, &ws_ref, prompt, PROMPT, plain);
    int ok = 1, ok_logits = 1;
    for (int i = 0; i < N; i++) {
        const int p = PROMPT + i, exit_layer = pattern[i];
        const double thresholds[3] = {exit_layer == 1 ? 0.0 : 2.0, exit_layer == 2 ? 0.0 : 2.0, 2.0};
        ce_edge_decision d;
        CHECK(ce_edge_step(&e, tokens[i], thresholds, 1, logits, &d, err, sizeof err) == CE_OK, "step %d: %s", i, err);
        ok &= d.exited && d.exit_layer == exit_layer && e.n_pos == p + 1 && d.head_checks == 1;
        /* the plain pass: the exit's logits are the head over its hidden state after exit_layer layers */
        ce_embed(m, 1, &tokens[i], h, err, sizeof err);
        ce_forward(m, &ref, &ws_ref, 0, exit_layer, 1, p, h, err, sizeof err);
        ce_head(m, &ws_ref, NULL, 1, h, V, expect, err, sizeof err);
        ce_forward(m, &ref, &ws_ref, exit_layer, 3, 1, p, h, err, sizeof err);
        memcpy(plain + (size_t)p * D, h, sizeof h);
        ok_logits &= memcmp(logits, expect, sizeof logits) == 0;
        for (int l = 0; l < 3; l++) /* every layer's filled prefix is already the plain pass's */
            for (int g = 0; g < 2; g++)
                ok &= memcmp(ce_kv_cache_k(&kv, l, g), ce_kv_cache_k(&ref, l, g), kv_bytes(kv.len[l])) == 0 &&
                      memcmp(ce_kv_cache_v(&kv, l, g), ce_kv_cache_v(&ref, l, g), kv_bytes(kv.len[l])) == 0;
    }
    CHECK(ok, "the exits follow the thresholds and every filled prefix equals the plain pass");
    CHECK(ok_logits, "each exit's logits equal the head over the plain pass's hidden state");
    int first;
    CHECK(ce_edge_flush(&e, &first, err, sizeof err) == CE_OK && first >= 0 && e.split_len == CAP, "flush: %s", err);
    CHECK(kv.len[0] == CAP && kv.len[1] == CAP && kv.len[2] == CAP, "flush completes every layer");
    for (int l = 0; l < 3; l++)
        for (int g = 0; g < 2; g++)
            CHECK(memcmp(ce_kv_cache_k(&kv, l, g), ce_kv_cache_k(&ref, l, g), kv_bytes(CAP)) == 0 &&
                      memcmp(ce_kv_cache_v(&kv, l, g), ce_kv_cache_v(&ref, l, g), kv_bytes(CAP)) == 0,
                  "after the flush the cache equals the plain pass (layer %d head %d)", l, g);
    CHECK(memcmp(e.split_states, plain, sizeof plain) == 0, "split states equal the plain pass's last hidden states");
    CHECK(ce_edge_flush(&e, &first, err, sizeof err) == CE_OK && first == -1, "nothing left to flush");
    /* a full sequence refuses another token */
    ce_edge_decision d;
    const double split_only[3] = {2.0, 2.0, 2.0};
    CHECK(ce_edge_step(&e, 1, split_only, 1, logits, &d, err, sizeof err) == CE_ERANGE && strstr(err, "full"),
          "a full sequence: %s", err);
    /* rollback: positions PROMPT + 5.. again, all at the split: the cache is the plain pass's again */
    ce_edge_rollback(&e, PROMPT + 5);
    CHECK(e.n_pos == PROMPT + 5 && e.split_len == PROMPT + 5 && kv.len[2] == PROMPT + 5, "rollback");
    for (int i = 5; i < N; i++) {
        CHECK(ce_edge_step(&e, tokens[i], split_only, 1, logits, &d, err, sizeof err) == CE_OK && d.exit_layer == 3 &&
                  d.segments == 1 && d.layers_run == 3,
              "step %d after the rollback", i);
    }
    for (int l = 0; l < 3; l++)
        CHECK(memcmp(ce_kv_cache_k(&kv, l, 0), ce_kv_cache_k(&ref, l, 0), kv_bytes(CAP)) == 0,
              "re-fed positions equal the plain pass (layer %d)", l);
    /* collaborative: no exit accepts, the split's states go to the cloud */
    ce_edge_rollback(&e, PROMPT);
    CHECK(ce_edge_step(&e, tokens[0], split_only, 0, logits, &d, err, sizeof err) == CE_OK && !d.exited &&
              d.split_start == PROMPT && d.head_checks == 0 &&
              memcmp(e.split_states + (size_t)PROMPT * D, plain + (size_t)PROMPT * D, sizeof h) == 0,
          "collaborative step without an exit");
    ce_edge_free(&e);
    /* invalid configurations */
    const ce_exit_head backwards[2] = {{.layer = 2}, {.layer = 1}};
    ce_kv_cache short_kv;
    ce_kv_cache_init(&short_kv, &m->cfg, 0, 1, CAP, test_kv_type, err, sizeof err);
    CHECK(ce_edge_init(&e, m, &short_kv, &ws, backwards, 2, CE_METRIC_MAX_PROB, 0, 0, err, sizeof err) == CE_EINVAL,
          "exit layers must increase: %s", err);
    CHECK(ce_edge_init(&e, m, &kv, &ws, heads, 3, CE_METRIC_GATE, 0, 0, err, sizeof err) == CE_EINVAL && strstr(err, "gate"),
          "gates needed: %s", err);
    CHECK(ce_edge_init(&e, m, &kv, &ws, heads, 2, CE_METRIC_MAX_PROB, 0, 0, err, sizeof err) == CE_EINVAL,
          "the last head must be at the cache's end: %s", err);
    ce_kv_cache_free(&short_kv);
    ce_kv_cache_free(&kv);
    ce_kv_cache_free(&ref);
    ce_workspace_free(&ws);
    ce_workspace_free(&ws_ref);
    tiny_free(&t);
}

/* An edge over the tiny model's three layers after a prompt, with the split's logits of its last position */
typedef struct {
    ce_workspace ws;
    ce_kv_cache kv;
    ce_edge e;
} edge_fixture;

static void edge_fixture_init(edge_fixture *f, const ce_model *m, const ce_exit_head *heads, int capacity,
                              const int32_t *prompt, int n, float *logits) {
    char err[CE_ERRLEN];
    memset(&f->ws, 0, sizeof f->ws);
    CHECK(ce_kv_cache_init(&f->kv, &m->cfg, 0, 3, capacity, test_kv_type, err, sizeof err) == CE_OK &&
              ce_edge_init(&f->e, m, &f->kv, &f->ws, heads, 3, CE_METRIC_MAX_PROB, 0, 0, err, sizeof err) == CE_OK &&
              ce_edge_prefill(&f->e, n, prompt, err, sizeof err) == CE_OK &&
              ce_head(m, &f->ws, NULL, 1, f->e.split_states + (size_t)(n - 1) * m->cfg.dim, m->cfg.vocab, logits, err,
                      sizeof err) == CE_OK,
          "edge fixture: %s", err);
}

static void edge_fixture_free(edge_fixture *f) {
    ce_edge_free(&f->e);
    ce_kv_cache_free(&f->kv);
    ce_workspace_free(&f->ws);
}

/* Standalone generation's loop: with the exits disabled it is ce_generate, token for token; with exits,
 * it is ce_edge_step + ce_pick one token at a time; an adapter head is x + up (down x) before the head. */
static void test_edge_generate(int activations) {
    char err[CE_ERRLEN];
    tiny_model t;
    tiny_init(&t, activations);
    const ce_model *m = &t.m;
    enum { PROMPT = 3, N = 14, V = 50, D = 64 };
    const int32_t prompt[PROMPT] = {7, 8, 9}, no_end = -1;
    const ce_exit_head heads[3] = {{.layer = 1}, {.layer = 2}, {.layer = 3}};
    for (int sampled = 0; sampled <= 1; sampled++) {
        const ce_sampler base = {sampled ? 0.8f : 0.0f, sampled ? 10 : 0, 1.0f, 1.0f, {5, 6, 7, 8}};
        int32_t full[N], got[N], step_tokens[N];
        ce_edge_decision dec[N];
        float h[PROMPT * D], logits[V];
        int n_out, ended;
        { /* the full model's loop */
            ce_workspace ws = {0};
            ce_kv_cache kv;
            ce_kv_cache_init(&kv, &m->cfg, 0, 3, PROMPT + N, test_kv_type, err, sizeof err);
            uint8_t seen[V] = {0};
            ce_sampler s = base;
            tiny_forward_tokens(m, &kv, &ws, prompt, PROMPT, h);
            ce_head(m, &ws, NULL, 1, h + (PROMPT - 1) * D, V, logits, err, sizeof err);
            ce_generate(m, &kv, &ws, &s, logits, seen, -1, PROMPT, N, &no_end, 1, 0, full, NULL, NULL, NULL, &n_out,
                        &ended, err, sizeof err);
            ce_kv_cache_free(&kv);
            ce_workspace_free(&ws);
        }
        /* the exit at 1 at the first step's confidence there: that step certainly exits at 1, later ones may */
        double first_conf;
        {
            edge_fixture f;
            edge_fixture_init(&f, m, heads, PROMPT + N, prompt, PROMPT, logits);
            ce_sampler s = base;
            const double at_one[3] = {0.0, 2.0, 2.0};
            ce_edge_generate(&f.e, &s, at_one, logits, -1, 2, &no_end, 1, got, dec, &n_out, &ended, err, sizeof err);
            first_conf = dec[1].confidence;
            edge_fixture_free(&f);
        }
        for (int exits_on = 0; exits_on <= 1; exits_on++) {
            const double thresholds[3] = {exits_on ? first_conf : 2.0, exits_on ? first_conf : 2.0, 2.0};
            for (int per_step = 0; per_step <= 1; per_step++) {
                edge_fixture f;
                edge_fixture_init(&f, m, heads, PROMPT + N, prompt, PROMPT, logits);
                ce_sampler s = base;
                if (!per_step) {
                    CHECK(ce_edge_generate(&f.e, &s, thresholds, logits, -1, N, &no_end, 1, got, dec, &n_out, &ended, err,
                                           sizeof err) == CE_OK && n_out == N,
                          "edge generate: %s", err);
                    int early = 0;
                    for (int i = 1; i < N; i++) early += dec[i].exit_layer < 3;
                    CHECK(exits_on ? dec[1].exit_layer == 1 : early == 0, "early exits: %d of %d", early, N - 1);
                } else { /* the reference: one step and one pick at a time */
                    for (int i = 0; i < N; i++) {
                        if (i > 0) ce_edge_step(&f.e, step_tokens[i - 1], thresholds, 1, logits, &dec[i], err, sizeof err);
                        ce_pick(&s, logits, V, NULL, NULL, &step_tokens[i], err, sizeof err);
                    }
                }
                edge_fixture_free(&f);
            }
            CHECK(memcmp(got, step_tokens, sizeof got) == 0, "edge generate = step + pick (sampled %d, exits %d)", sampled,
                  exits_on);
            if (!exits_on) CHECK(memcmp(got, full, sizeof got) == 0, "exits disabled: the full model's tokens (sampled %d)", sampled);
        }
    }
    /* an adapter head: the head over x + up (down x) */
    ce_workspace ws = {0};
    float x[D], adapted[D], down[2 * D], up[D * 2], scratch[D + 2], with[V], expect[V];
    for (int j = 0; j < D; j++) x[j] = rng_uniform(), down[j] = rng_uniform(), down[D + j] = rng_uniform();
    for (int j = 0; j < 2 * D; j++) up[j] = 0.1f * rng_uniform();
    for (int j = 0; j < D; j++) {
        double t0 = 0, t1 = 0;
        for (int k = 0; k < D; k++) t0 += (double)down[k] * x[k], t1 += (double)down[D + k] * x[k];
        adapted[j] = (float)(x[j] + up[2 * j] * t0 + up[2 * j + 1] * t1);
    }
    const ce_exit_head adapter = {.layer = 1, .down = down, .up = up, .rank = 2};
    CHECK(ce_exit_logits(m, &ws, &adapter, 1, x, V, with, scratch, err, sizeof err) == CE_OK, "adapter head: %s", err);
    ce_head(m, &ws, NULL, 1, adapted, V, expect, err, sizeof err);
    double worst = 0;
    for (int j = 0; j < V; j++) worst = fmax(worst, fabs((double)with[j] - expect[j]) / (1.0 + fabs((double)expect[j])));
    CHECK(worst < 1e-3, "adapter head within %g of the double-precision adapter", worst);
    ce_workspace_free(&ws);
    tiny_free(&t);
}

static void test_matmul_paths(void) {
    /* fp32 activations: a batch above CE_SMALL_BATCH (matmul_f32 on dequantized tiles) agrees with
     * decode (the integer kernels where the set has them) within float rounding, and a row of a
     * CE_SMALL_BATCH batch equals that row decoded alone, bit for bit */
    char err[CE_ERRLEN];
    const int n = CE_SMALL_BATCH + 3, rows = 300, cols = 128; /* 300 rows: tiles of every thread */
    void *w = random_tensor(CE_TYPE_Q4_1, rows, cols);
    ce_tensor t = {w, CE_TYPE_Q4_1, cols, rows};
    float *x = malloc(sizeof(float) * n * cols), *big = malloc(sizeof(float) * n * rows), small[300];
    for (int j = 0; j < n * cols; j++) x[j] = rng_uniform();
    ce_workspace ws = {0};
    CHECK(ce_matmul(&t, &ws, CE_ACT_F32, n, x, big, err, sizeof err) == CE_OK, "f32 large batch");
    for (int i = 0; i < n; i++) {
        CHECK(ce_matmul(&t, &ws, CE_ACT_F32, 1, x + i * cols, small, err, sizeof err) == CE_OK, "f32 row");
        for (int r = 0; r < rows; r++)
            CHECK(fabsf(small[r] - big[i * rows + r]) <= 1e-4f * (1.0f + fabsf(small[r])), "row %d col %d: %g vs %g", i, r,
                  (double)small[r], (double)big[i * rows + r]);
    }
    CHECK(ce_matmul(&t, &ws, CE_ACT_F32, CE_SMALL_BATCH, x, big, err, sizeof err) == CE_OK, "f32 small batch");
    for (int i = 0; i < CE_SMALL_BATCH; i++) {
        CHECK(ce_matmul(&t, &ws, CE_ACT_F32, 1, x + i * cols, small, err, sizeof err) == CE_OK, "f32 row");
        CHECK(memcmp(small, big + i * rows, sizeof(float) * rows) == 0, "f32 row %d equals its batch result", i);
    }
    /* 8-bit activations: a row's result does not depend on the batch it shares */
    CHECK(ce_matmul(&t, &ws, CE_ACT_Q8, CE_SMALL_BATCH, x, big, err, sizeof err) == CE_OK, "q8 batch");
    for (int i = 0; i < CE_SMALL_BATCH; i++) {
        CHECK(ce_matmul(&t, &ws, CE_ACT_Q8, 1, x + i * cols, small, err, sizeof err) == CE_OK, "q8 row");
        CHECK(memcmp(small, big + i * rows, sizeof(float) * rows) == 0, "q8 row %d equals its batch result", i);
    }
    ce_workspace_free(&ws);
    free(w);
    free(x);
    free(big);
}

/* ---- wire format ---- */

static ce_msg sample_upload(uint8_t *payload, int n, int dim) {
    ce_msg m;
    memset(&m, 0, sizeof m);
    m.type = CE_MSG_UPLOAD;
    m.fields = CE_F_SEQ | CE_F_SID | CE_F_POS | CE_F_N | CE_F_DIM | CE_F_DTYPE | CE_F_DATA;
    m.seq = 7;
    for (int i = 0; i < CE_WIRE_SESSION_BYTES; i++) m.sid[i] = (uint8_t)(i * 13);
    m.pos = 3;
    m.n = n;
    m.dim = dim;
    m.dtype = CE_WIRE_F16;
    m.data = payload;
    m.data_len = ce_wire_hidden_bytes(CE_WIRE_F16, n, dim);
    return m;
}

static void test_wire_round_trip(void) {
    char err[CE_ERRLEN];
    float x[2 * 64], y[2 * 64];
    uint8_t payload[2 * 64 * 2];
    for (int i = 0; i < 128; i++) x[i] = rng_uniform() * 4.0f;
    CHECK(ce_wire_hidden_encode(CE_WIRE_F16, x, 2, 64, payload, err, sizeof err) == CE_OK, "f16 encode");
    ce_msg m = sample_upload(payload, 2, 64), d;
    uint8_t *frame;
    size_t len, body;
    CHECK(ce_wire_encode(&m, &frame, &len, err, sizeof err) == CE_OK, "encode: %s", err);
    CHECK(ce_wire_frame_length(frame, 1 << 20, &body, err, sizeof err) == CE_OK && body == len - 4, "length prefix");
    CHECK(ce_wire_decode(frame + 4, body, 1 << 20, &d, err, sizeof err) == CE_OK, "decode: %s", err);
    CHECK(d.type == CE_MSG_UPLOAD && d.seq == 7 && d.pos == 3 && d.n == 2 && d.dim == 64 && memcmp(d.sid, m.sid, 16) == 0,
          "fields survive");
    CHECK(ce_wire_hidden_decode(d.dtype, d.data, d.data_len, d.n, d.dim, y, err, sizeof err) == CE_OK, "f16 decode");
    for (int i = 0; i < 128; i++) CHECK(fabsf(y[i] - x[i]) <= fabsf(x[i]) * TOL_FP16_REL, "f16 value %d", i);
    /* every strict prefix of the body is rejected, and nothing leaks or overreads */
    for (size_t cut = 0; cut < body; cut++) {
        ce_msg t;
        CHECK(ce_wire_decode(frame + 4, cut, 1 << 20, &t, err, sizeof err) != CE_OK, "prefix %zu rejected", cut);
    }
    /* a payload limit below the data size is enforced */
    ce_msg t;
    CHECK(ce_wire_decode(frame + 4, body, 100, &t, err, sizeof err) == CE_EINVAL, "max_data enforced");
    ce_msg_clear(&d);
    free(frame);

    /* Q8_0: error at most half a quantization step d / 2, plus what storing d as fp16 moves the
     * largest code (|q| <= 127) by: 127 |d - fp16(d)| */
    uint8_t q[2 * 2 * 34];
    CHECK(ce_wire_hidden_encode(CE_WIRE_Q8_0, x, 2, 64, q, err, sizeof err) == CE_OK, "q8 encode");
    CHECK(ce_wire_hidden_decode(CE_WIRE_Q8_0, q, sizeof q, 2, 64, y, err, sizeof err) == CE_OK, "q8 decode");
    for (int b = 0; b < 4; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        const float d = amax / 127.0f, d16 = ce_fp16_to_fp32(ce_fp32_to_fp16(d));
        for (int j = 0; j < 32; j++)
            CHECK(fabsf(y[b * 32 + j] - x[b * 32 + j]) <= 0.5f * d + 127.0f * fabsf(d - d16) + 1e-6f, "q8 value %d: %g vs %g",
                  b * 32 + j, (double)y[b * 32 + j], (double)x[b * 32 + j]);
    }
    CHECK(ce_wire_hidden_decode(CE_WIRE_Q8_0, q, sizeof q - 1, 2, 64, y, err, sizeof err) == CE_EINVAL, "q8 size");
    CHECK(ce_wire_hidden_bytes(CE_WIRE_Q8_0, 1, 33) == 0, "q8 needs whole blocks");

    /* VERIFY carries hidden states like INFER; TOKENS carries n int32 tokens, and exactly n */
    m.type = CE_MSG_VERIFY;
    CHECK(ce_wire_encode(&m, &frame, &len, err, sizeof err) == CE_OK, "verify encode: %s", err);
    CHECK(ce_wire_decode(frame + 4, len - 4, 1 << 20, &d, err, sizeof err) == CE_OK && d.type == CE_MSG_VERIFY &&
              d.n == 2,
          "verify decode: %s", err);
    ce_msg_clear(&d);
    free(frame);
    int32_t tokens[3] = {5, 49151, 0};
    ce_msg r = {.type = CE_MSG_TOKENS, .fields = CE_F_SEQ | CE_F_POS | CE_F_N | CE_F_DATA | CE_F_US, .seq = 9,
                .pos = 40, .n = 3, .us = 1234, .data = (uint8_t *)tokens, .data_len = sizeof tokens};
    CHECK(ce_wire_encode(&r, &frame, &len, err, sizeof err) == CE_OK, "tokens encode: %s", err);
    CHECK(ce_wire_decode(frame + 4, len - 4, 1 << 20, &d, err, sizeof err) == CE_OK, "tokens decode: %s", err);
    CHECK(d.type == CE_MSG_TOKENS && d.n == 3 && d.pos == 40 && d.data_len == 12 && memcmp(d.data, tokens, 12) == 0,
          "tokens survive");
    ce_msg_clear(&d);
    free(frame);
    r.n = 4; /* 12 bytes cannot hold 4 tokens */
    CHECK(ce_wire_encode(&r, &frame, &len, err, sizeof err) == CE_EINVAL, "token count checked on encode");
}

static void test_wire_hostile(void) {
    char err[CE_ERRLEN];
    ce_msg m;
    /* map32 claiming 4 billion fields in 5 bytes */
    const uint8_t huge_map[] = {0xdf, 0xff, 0xff, 0xff, 0xff};
    CHECK(ce_wire_decode(huge_map, sizeof huge_map, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "huge map");
    /* a bin32 value claiming 4 GB */
    const uint8_t huge_bin[] = {0x81, 0xa4, 'd', 'a', 't', 'a', 0xc6, 0xff, 0xff, 0xff, 0xff, 0x00};
    CHECK(ce_wire_decode(huge_bin, sizeof huge_bin, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "huge bin");
    /* nested containers, unknown keys, missing type, wrong value types, trailing bytes, repeated keys */
    const uint8_t nested[] = {0x81, 0xa4, 't', 'y', 'p', 'e', 0x91, 0x01};
    CHECK(ce_wire_decode(nested, sizeof nested, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "nested");
    const uint8_t unknown[] = {0x82, 0xa4, 't', 'y', 'p', 'e', 0x01, 0xa3, 'z', 'z', 'z', 0x01};
    CHECK(ce_wire_decode(unknown, sizeof unknown, 1 << 20, &m, err, sizeof err) == CE_EINVAL && strstr(err, "unknown"),
          "unknown key: %s", err);
    const uint8_t no_type[] = {0x81, 0xa3, 'v', 'e', 'r', 0x01};
    CHECK(ce_wire_decode(no_type, sizeof no_type, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "no type");
    const uint8_t bad_seq[] = {0x82, 0xa4, 't', 'y', 'p', 'e', 0x03, 0xa3, 's', 'e', 'q', 0xa1, 'x'};
    CHECK(ce_wire_decode(bad_seq, sizeof bad_seq, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "seq as string");
    const uint8_t open_ok[] = {0x82, 0xa4, 't', 'y', 'p', 'e', 0x03, 0xa3, 's', 'e', 'q', 0x01};
    CHECK(ce_wire_decode(open_ok, sizeof open_ok, 1 << 20, &m, err, sizeof err) == CE_OK && m.seq == 1, "open: %s", err);
    const uint8_t trailing[] = {0x82, 0xa4, 't', 'y', 'p', 'e', 0x03, 0xa3, 's', 'e', 'q', 0x01, 0x00};
    CHECK(ce_wire_decode(trailing, sizeof trailing, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "trailing");
    /* the hello names the model, the split and the dtype (version 2); a version-1 hello is refused */
    const uint8_t old_hello[] = {0x82, 0xa4, 't', 'y', 'p', 'e', 0x01, 0xa3, 'v', 'e', 'r', 0x01};
    CHECK(ce_wire_decode(old_hello, sizeof old_hello, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "version-1 hello");
    ce_msg h = {.type = CE_MSG_HELLO, .fields = CE_F_VER | CE_F_MODEL | CE_F_SPLIT | CE_F_DTYPE,
                .ver = CE_WIRE_VERSION, .split = 15, .dtype = CE_WIRE_F16};
    strcpy(h.model, "0123abcd");
    uint8_t *hf = NULL;
    size_t hl = 0;
    CHECK(ce_wire_encode(&h, &hf, &hl, err, sizeof err) == CE_OK, "hello encodes: %s", err);
    CHECK(hf && ce_wire_decode(hf + CE_WIRE_HEADER, hl - CE_WIRE_HEADER, 1 << 20, &m, err, sizeof err) == CE_OK &&
              m.type == CE_MSG_HELLO && m.split == 15 && m.dtype == CE_WIRE_F16 && strcmp(m.model, "0123abcd") == 0,
          "hello round trip: %s", err);
    free(hf);
    memset(h.model, 'x', sizeof h.model); /* no NUL inside: too long */
    CHECK(ce_wire_encode(&h, &hf, &hl, err, sizeof err) == CE_EINVAL, "encoder refuses an overlong model");
    /* sequence numbers stop at 2^63 - 1, the range every side holds (a larger one could not be answered) */
    uint8_t close_frame[] = {0x83, 0xa4, 't', 'y', 'p', 'e', 0x07, 0xa3, 's', 'e', 'q', 0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0,
                             0xa3, 's', 'i', 'd', 0xc4, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK(ce_wire_decode(close_frame, sizeof close_frame, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "seq 2^63");
    close_frame[12] = 0x7f;
    for (int i = 13; i < 20; i++) close_frame[i] = 0xff;
    CHECK(ce_wire_decode(close_frame, sizeof close_frame, 1 << 20, &m, err, sizeof err) == CE_OK &&
              m.seq == CE_WIRE_MAX_SEQ,
          "seq 2^63 - 1: %s", err);
    m.seq = CE_WIRE_MAX_SEQ + 1;
    CHECK(ce_wire_encode(&m, &hf, &hl, err, sizeof err) == CE_EINVAL, "encoder refuses seq 2^63");
    const uint8_t twice[] = {0x83, 0xa4, 't', 'y', 'p', 'e', 0x03, 0xa3, 's', 'e', 'q', 0x01, 0xa3, 's', 'e', 'q', 0x01};
    CHECK(ce_wire_decode(twice, sizeof twice, 1 << 20, &m, err, sizeof err) == CE_EINVAL, "repeated key");
    const uint8_t zero_len[4] = {0, 0, 0, 0}, big_len[4] = {0x7f, 0xff, 0xff, 0xff};
    size_t body;
    CHECK(ce_wire_frame_length(zero_len, 1 << 20, &body, err, sizeof err) == CE_ERANGE, "empty frame");
    CHECK(ce_wire_frame_length(big_len, 1 << 20, &body, err, sizeof err) == CE_ERANGE, "oversized frame");
    /* a payload whose size disagrees with its declared shape */
    uint8_t payload[64 * 2 + 2] = {0};
    ce_msg up = sample_upload(payload, 1, 64);
    up.data_len += 2;
    uint8_t *frame;
    size_t len;
    CHECK(ce_wire_encode(&up, &frame, &len, err, sizeof err) == CE_EINVAL, "encoder refuses a mismatched payload");
    /* random garbage and random mutations of a valid frame: errors, never crashes (ASan watches) */
    up.data_len -= 2;
    CHECK(ce_wire_encode(&up, &frame, &len, err, sizeof err) == CE_OK, "valid frame");
    uint8_t buf[512];
    for (int trial = 0; trial < 20000; trial++) {
        size_t n;
        if (trial % 2) {
            n = rng_u32() % sizeof buf;
            for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)rng_u32();
        } else {
            n = len - 4;
            memcpy(buf, frame + 4, n);
            for (int k = 0; k < 1 + (int)(rng_u32() % 4); k++) buf[rng_u32() % n] = (uint8_t)rng_u32();
        }
        if (ce_wire_decode(buf, n, 1 << 16, &m, err, sizeof err) == CE_OK) {
            CHECK(!(m.fields & CE_F_DATA) || m.data_len == ce_wire_hidden_bytes(m.dtype, m.n, m.dim), "accepted payloads fit");
            ce_msg_clear(&m);
        }
    }
    free(frame);
}

int main(void) {
    char err[CE_ERRLEN];
    test_fp16();
    test_row_bytes();
    test_ops();
    test_matmul_f32(ce_kernels_generic());
    if (ce_kernels_select("avx2", err, sizeof err) == CE_OK) test_matmul_f32(ce_kernels_active());
    if (ce_kernels_select("avx512", err, sizeof err) == CE_OK) test_matmul_f32(ce_kernels_active());
    test_attention_rows(ce_kernels_generic());
    if (ce_kernels_select("avx2", err, sizeof err) == CE_OK) test_attention_rows(ce_kernels_active());
    if (ce_kernels_select("avx512", err, sizeof err) == CE_OK) test_attend_block(ce_kernels_active());
    if (ce_kernels_select("avx512", err, sizeof err) == CE_OK) test_matmul_q8a(ce_kernels_active());
    if (ce_kernels_select("avx2", err, sizeof err) == CE_OK) test_x16(ce_kernels_active());
    if (ce_kernels_select("avx512", err, sizeof err) == CE_OK) test_x16(ce_kernels_active());
    test_silu_mul(ce_kernels_generic());
    if (ce_kernels_select("avx2", err, sizeof err) == CE_OK) test_silu_mul(ce_kernels_active());
    test_exp_shifted(ce_kernels_generic());
    if (ce_kernels_select("avx2", err, sizeof err) == CE_OK) test_exp_shifted(ce_kernels_active());
    test_q8a(ce_kernels_generic());
    if (ce_kernels_select("avx2", err, sizeof err) == CE_OK) test_q8a(ce_kernels_active());
    if (ce_kernels_select("avx512", err, sizeof err) == CE_OK) test_q8a(ce_kernels_active());
    test_vnni_same_bits();
    for (int threads = 1; threads <= 3; threads += 2) { /* the invariants hold with and without the pool */
        CHECK(ce_threads_set(threads, err, sizeof err) == CE_OK, "threads %d", threads);
        test_model_validation();
        for (int act = CE_ACT_F32; act <= CE_ACT_Q8; act++) { /* exactness invariants in every mode */
            for (int kv_f16 = 0; kv_f16 <= 1; kv_f16++) {
                test_kv_type = kv_f16 ? CE_TYPE_F16 : CE_TYPE_F32;
                test_forward_invariants(act);
                test_catch_up_composition(act);
                test_forward_multi(act);
                test_batch_chunks(act);
                test_generate(act);
                test_edge_step(act);
                test_edge_generate(act);
            }
        }
        test_kv_type = CE_TYPE_F32;
        test_kv_f16_matches_f32();
        test_matmul_paths();
    }
    CHECK(ce_threads_set(1, err, sizeof err) == CE_OK, "back to one thread");
    test_wire_round_trip();
    test_wire_hostile();
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures != 0;
}
