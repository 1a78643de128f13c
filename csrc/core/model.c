/* The decoder: validation, KV cache, matrix products and the layer-range forward pass. */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cecollm/cecollm.h"
#include "pool.h"
#include "util.h"

/* ---- validation ---- */

static ce_status check_tensor(const ce_tensor *t, const char *name, int layer, int64_t rows, int64_t cols,
                              int need_f32, char *err, size_t errlen) {
    char where[48];
    if (layer >= 0)
        snprintf(where, sizeof where, "blk.%d.%s", layer, name);
    else
        snprintf(where, sizeof where, "%s", name);
    if (t->data == NULL) return ce_fail(err, errlen, CE_EINVAL, "tensor %s is missing", where);
    if (need_f32 && t->type != CE_TYPE_F32)
        return ce_fail(err, errlen, CE_EINVAL, "tensor %s has type %s, expected F32", where,
                       ce_type_name(t->type));
    if (t->rows != rows || t->cols != cols)
        return ce_fail(err, errlen, CE_EINVAL, "tensor %s has shape (%lld, %lld), expected (%lld, %lld)",
                       where, (long long)t->rows, (long long)t->cols, (long long)rows, (long long)cols);
    if (ce_row_bytes(t->type, t->cols) == 0)
        return ce_fail(err, errlen, CE_EINVAL, "tensor %s: type %s (id %d) with %lld columns is not supported",
                       where, ce_type_name(t->type), t->type, (long long)t->cols);
    return CE_OK;
}

ce_status ce_model_init(ce_model *m, char *err, size_t errlen) {
    const ce_config *c = &m->cfg;
    m->rope_inv_freq = NULL;
    if (c->n_layers <= 0 || c->dim <= 0 || c->ffn_dim <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->head_dim <= 0 || c->vocab <= 0 || c->n_layers > 4096 || c->dim > (1 << 16) ||
        c->ffn_dim > (1 << 18) || c->n_heads > 1024 || c->head_dim > 1024 || c->vocab > (1 << 22))
        return ce_fail(err, errlen, CE_EINVAL, "config out of range: layers %d dim %d ffn %d heads %d/%d head_dim %d vocab %d",
                       c->n_layers, c->dim, c->ffn_dim, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab);
    if (c->n_heads % c->n_kv_heads != 0)
        return ce_fail(err, errlen, CE_EINVAL, "%d query heads do not divide into %d kv heads", c->n_heads,
                       c->n_kv_heads);
    if (c->head_dim % 2 != 0) return ce_fail(err, errlen, CE_EINVAL, "head_dim %d is odd", c->head_dim);
    if (!(c->rope_theta > 0.0f) || !(c->norm_eps > 0.0f) ||
        (c->rope_style != CE_ROPE_ADJACENT && c->rope_style != CE_ROPE_HALF))
        return ce_fail(err, errlen, CE_EINVAL, "bad rope_theta %g, norm_eps %g or rope style %d",
                       (double)c->rope_theta, (double)c->norm_eps, c->rope_style);
    if (m->layers == NULL) return ce_fail(err, errlen, CE_EINVAL, "model has no layers array");
    if (m->activations != CE_ACT_F32 && m->activations != CE_ACT_Q8)
        return ce_fail(err, errlen, CE_EINVAL, "unknown activation mode %d", m->activations);

    const int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    ce_status st;
#define CHECK(t, name, layer, rows, cols, f32)                                                    \
    if ((st = check_tensor(t, name, layer, rows, cols, f32, err, errlen)) != CE_OK) return st
    CHECK(&m->token_embd, "token_embd", -1, c->vocab, c->dim, 0);
    CHECK(&m->output_norm, "output_norm", -1, 1, c->dim, 1);
    CHECK(&m->output, "output", -1, c->vocab, c->dim, 0);
    for (int l = 0; l < c->n_layers; l++) {
        const ce_layer *L = &m->layers[l];
        CHECK(&L->attn_norm, "attn_norm", l, 1, c->dim, 1);
        CHECK(&L->wq, "attn_q", l, qd, c->dim, 0);
        CHECK(&L->wk, "attn_k", l, kvd, c->dim, 0);
        CHECK(&L->wv, "attn_v", l, kvd, c->dim, 0);
        CHECK(&L->wo, "attn_output", l, c->dim, qd, 0);
        CHECK(&L->ffn_norm, "ffn_norm", l, 1, c->dim, 1);
        CHECK(&L->w_gate, "ffn_gate", l, c->ffn_dim, c->dim, 0);
        CHECK(&L->w_up, "ffn_up", l, c->ffn_dim, c->dim, 0);
        CHECK(&L->w_down, "ffn_down", l, c->dim, c->ffn_dim, 0);
        if (L->bq.data != NULL) CHECK(&L->bq, "attn_q.bias", l, 1, qd, 1);
        if (L->bk.data != NULL) CHECK(&L->bk, "attn_k.bias", l, 1, kvd, 1);
        if (L->bv.data != NULL) CHECK(&L->bv, "attn_v.bias", l, 1, kvd, 1);
    }
    const float *freq_factors = m->rope_freqs.data;
    if (freq_factors != NULL) {
        CHECK(&m->rope_freqs, "rope_freqs", -1, 1, c->head_dim / 2, 1);
        for (int i = 0; i < c->head_dim / 2; i++)
            if (!(freq_factors[i] > 0.0f) || !isfinite(freq_factors[i]))
                return ce_fail(err, errlen, CE_EINVAL, "rope_freqs[%d] = %g is not a positive number", i, (double)freq_factors[i]);
    }
#undef CHECK

    m->rope_inv_freq = malloc(sizeof(float) * (size_t)(c->head_dim / 2));
    if (m->rope_inv_freq == NULL) return ce_fail(err, errlen, CE_ENOMEM, "out of memory for rope table");
    for (int i = 0; i < c->head_dim / 2; i++) { /* theta^(-2i/head_dim), computed as Hugging Face does */
        m->rope_inv_freq[i] = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->head_dim);
        if (freq_factors != NULL) m->rope_inv_freq[i] /= freq_factors[i];
    }
    return CE_OK;
}

void ce_model_free(ce_model *m) {
    free(m->rope_inv_freq);
    m->rope_inv_freq = NULL;
}

/* ---- KV cache ---- */

/* bytes for keys or values: from 2 MiB up, 2 MiB-aligned and advised for transparent huge pages.
 * Decode at long context reads every cached key and value once per token, and on 4 KiB pages that
 * stream costs a TLB miss per page, as the weights' did (docs/benchmarks.md, "Weights on huge
 * pages"). A huge page is resident once any of it is written: a cache costs its capacity, not its
 * length. Freed with free(). */
static void *alloc_kv(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    if (bytes < huge) return malloc(bytes);
    const size_t rounded = (bytes + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, rounded);
#ifdef MADV_HUGEPAGE
    if (p != NULL) madvise(p, rounded, MADV_HUGEPAGE); /* advice: without it, 4 KiB pages */
#endif
    return p;
}

ce_status ce_kv_cache_init(ce_kv_cache *kv, const ce_config *cfg, int layer_begin, int layer_end,
                           int capacity, int type, char *err, size_t errlen) {
    memset(kv, 0, sizeof *kv);
    if (type != CE_TYPE_F32 && type != CE_TYPE_F16)
        return ce_fail(err, errlen, CE_EINVAL, "KV cache type %s is not F32 or F16", ce_type_name(type));
    if (layer_begin < 0 || layer_end > cfg->n_layers || layer_begin >= layer_end)
        return ce_fail(err, errlen, CE_EINVAL, "layer range [%d, %d) is not inside [0, %d)", layer_begin,
                       layer_end, cfg->n_layers);
    if (capacity <= 0 || capacity > (1 << 24))
        return ce_fail(err, errlen, CE_EINVAL, "capacity %d out of range", capacity);
    size_t n = (size_t)(layer_end - layer_begin) * cfg->n_kv_heads * (size_t)capacity * cfg->head_dim;
    kv->layer_begin = layer_begin;
    kv->layer_end = layer_end;
    kv->capacity = capacity;
    kv->n_kv_heads = cfg->n_kv_heads;
    kv->head_dim = cfg->head_dim;
    kv->type = type;
    const size_t elem = ce_row_bytes(type, 1);
    kv->len = calloc((size_t)(layer_end - layer_begin), sizeof(int));
    kv->k = alloc_kv(n * elem);
    kv->v = alloc_kv(n * elem);
    if (kv->len == NULL || kv->k == NULL || kv->v == NULL) {
        ce_kv_cache_free(kv);
        return ce_fail(err, errlen, CE_ENOMEM, "out of memory for a KV cache of %zu MiB", 2 * n * elem >> 20);
    }
    return CE_OK;
}

void ce_kv_cache_free(ce_kv_cache *kv) {
    free(kv->len);
    free(kv->k);
    free(kv->v);
    memset(kv, 0, sizeof *kv);
}

void ce_kv_cache_truncate(ce_kv_cache *kv, int n) {
    if (n < 0) n = 0;
    for (int l = 0; l < kv->layer_end - kv->layer_begin; l++) kv->len[l] = kv->len[l] < n ? kv->len[l] : n;
}

/* Byte offset of (layer, kv_head)'s (capacity, head_dim) block. */
static size_t kv_offset(const ce_kv_cache *kv, int layer, int kv_head) {
    return ((size_t)(layer - kv->layer_begin) * kv->n_kv_heads + kv_head) * (size_t)kv->capacity * kv->head_dim *
           ce_row_bytes(kv->type, 1);
}

void *ce_kv_cache_k(const ce_kv_cache *kv, int layer, int kv_head) { return (uint8_t *)kv->k + kv_offset(kv, layer, kv_head); }
void *ce_kv_cache_v(const ce_kv_cache *kv, int layer, int kv_head) { return (uint8_t *)kv->v + kv_offset(kv, layer, kv_head); }

/* ---- workspace ---- */

/* Scratch of at least need elements, its old contents dropped; 64-byte aligned so that vector loads
 * from it never straddle cache lines. */
static ce_status grow(void **p, size_t *cap, size_t need, size_t elem, char *err, size_t errlen) {
    if (need <= *cap) return CE_OK;
    const size_t bytes = (need * elem + 63) / 64 * 64;
    void *q = aligned_alloc(64, bytes);
    if (q == NULL) return ce_fail(err, errlen, CE_ENOMEM, "out of memory for %zu MiB of scratch", bytes >> 20);
    free(*p);
    *p = q;
    *cap = need;
    return CE_OK;
}

void ce_workspace_free(ce_workspace *ws) {
    free(ws->buf);
    free(ws->panel);
    free(ws->ints);
    free(ws->q8);
    free(ws->x16);
    free(ws->chunk);
    memset(ws, 0, sizeof *ws);
}

/* ---- matrix products ---- */

/* The weights are read once for all n activation rows, a tile of CE_TILE_ROWS rows (a few KB) at a
 * time. y[i, r] depends only on x[i] and weight row r: the result is the same for every n up to
 * CE_SMALL_BATCH (decode-sized batches, through the integer kernels where the set has them) and
 * every split of the rows; larger batches (prompts) take matmul_f32 on dequantized tiles. Products
 * that share x (q, k and v; gate and up) run as one job over their rows laid end to end: one
 * hand-off to the pool, x converted once. */
#define MAX_PRODUCTS 3

typedef struct {
    const ce_tensor *w;
    float *y;                    /* (n, w->rows) */
    ce_matmul_f32_fn matmul_f32; /* fp32 activations x ... */
    ce_matvec_q8a_fn matvec_q8a; /* ... or, when set, quantized activations x_q8 (decode-sized) */
    ce_matmul_q8a_fn matmul_q8a; /* ... or (prompts) */
    ce_matvec_x16_fn matvec_x16; /* ... or, when set, fixed-point activations x_x16 */
} product;

typedef struct {
    int count;
    product parts[MAX_PRODUCTS];
    int64_t first_row[MAX_PRODUCTS + 1]; /* part p owns job rows [first_row[p], first_row[p + 1]) */
    int n;
    const float *x;           /* (n, cols) */
    const ce_block_q8a *x_q8; /* (n, cols / CE_QK) */
    const ce_block_x16 *x_x16; /* (n, cols / CE_QK) */
    float *panels;            /* (threads, CE_TILE_ROWS, cols): each thread's dequantized tile */
} matmul_job;

static void matmul_rows(void *ctx, int64_t begin, int64_t end, int thread) {
    const matmul_job *job = ctx;
    for (int p = 0; p < job->count; p++) {
        const product *part = &job->parts[p];
        const ce_tensor *w = part->w;
        const int64_t r0 = (begin > job->first_row[p] ? begin : job->first_row[p]) - job->first_row[p];
        const int64_t r1 = (end < job->first_row[p + 1] ? end : job->first_row[p + 1]) - job->first_row[p];
        const size_t row_bytes = ce_row_bytes(w->type, w->cols);
        const int64_t blocks = w->cols / CE_QK;
        float *panel = job->panels + (size_t)thread * CE_TILE_ROWS * w->cols;
        for (int64_t t0 = r0; t0 < r1; t0 += CE_TILE_ROWS) {
            const int64_t t1 = r1 - t0 < CE_TILE_ROWS ? r1 : t0 + CE_TILE_ROWS;
            const uint8_t *tile = (const uint8_t *)w->data + (size_t)t0 * row_bytes;
            if (part->matvec_q8a || part->matvec_x16)
                for (int i = 0; i < job->n; i++) {
                    float *y = part->y + (size_t)i * w->rows + t0;
                    if (part->matvec_q8a)
                        part->matvec_q8a(tile, row_bytes, t1 - t0, job->x_q8 + i * blocks, w->cols, y);
                    else
                        part->matvec_x16(tile, row_bytes, t1 - t0, job->x_x16 + i * blocks, w->cols, y);
                }
            else if (part->matmul_q8a)
                part->matmul_q8a(tile, row_bytes, t1 - t0, job->x_q8, w->cols, job->n, part->y + t0, w->rows, panel);
            else
                part->matmul_f32(w->type, tile, row_bytes, t1 - t0, w->cols, job->x, job->n, part->y + t0, w->rows, panel);
        }
    }
}

/* Row-wise steps are split across threads for batches above CE_SMALL_BATCH (below, the hand-off
 * costs more than it saves); a row's result does not depend on the split. */
static void run_rows(int n, ce_task_fn fn, void *ctx) {
    if (n > CE_SMALL_BATCH)
        ce_parallel_for(n, fn, ctx);
    else
        fn(ctx, 0, n, 0);
}

typedef struct {
    ce_quantize_q8a_fn quantize_q8a;
    const float *x;   /* (n, cols) */
    ce_block_q8a *q8; /* (n, cols / CE_QK) */
    int64_t cols;
} quantize_job;

static void quantize_rows(void *ctx, int64_t begin, int64_t end, int thread) {
    const quantize_job *job = ctx;
    for (int64_t i = begin; i < end; i++) job->quantize_q8a(job->x + i * job->cols, job->q8 + i * (job->cols / CE_QK), job->cols);
}

/* y_p (n, w_p->rows) = x (n, cols) · w_pᵀ for count products whose weights all have cols columns. */
static ce_status matmul_shared(int count, const ce_tensor *const *w, float *const *y, ce_workspace *ws,
                               int activations, int n, const float *x, char *err, size_t errlen) {
    ce_status st;
    const ce_kernels *k = ce_kernels_active();
    const int64_t cols = w[0]->cols, blocks = cols / CE_QK;
    matmul_job job = {.count = count, .n = n, .x = x};
    int need_q8 = 0, need_x16 = 0;
    for (int p = 0; p < count; p++) {
        const int type = w[p]->type;
        product *part = &job.parts[p];
        *part = (product){.w = w[p], .y = y[p], .matmul_f32 = k->matmul_f32};
        if (activations == CE_ACT_Q8 && n <= CE_SMALL_BATCH && k->matvec_q8a[type])
            part->matvec_q8a = k->matvec_q8a[type], need_q8 = 1;
        else if (activations == CE_ACT_Q8 && n > CE_SMALL_BATCH && k->matmul_q8a[type])
            part->matmul_q8a = k->matmul_q8a[type], need_q8 = 1;
        else if (activations == CE_ACT_F32 && n <= CE_SMALL_BATCH && k->matvec_x16[type])
            part->matvec_x16 = k->matvec_x16[type], need_x16 = 1;
        job.first_row[p + 1] = job.first_row[p] + w[p]->rows;
    }
    if ((st = grow((void **)&ws->panel, &ws->n_panel, (size_t)ce_threads_get() * CE_TILE_ROWS * cols, sizeof(float), err,
                   errlen)))
        return st;
    job.panels = ws->panel;
    /* activations are converted once per row, then every weight row reuses them */
    if (need_q8) {
        if ((st = grow((void **)&ws->q8, &ws->n_q8, (size_t)n * blocks, sizeof(ce_block_q8a), err, errlen))) return st;
        quantize_job quantize = {k->quantize_q8a, x, ws->q8, cols};
        run_rows(n, quantize_rows, &quantize);
        job.x_q8 = ws->q8;
    }
    if (need_x16) {
        if ((st = grow((void **)&ws->x16, &ws->n_x16, (size_t)n * blocks, sizeof(ce_block_x16), err, errlen))) return st;
        for (int i = 0; i < n; i++) k->quantize_x16(x + (size_t)i * cols, ws->x16 + i * blocks, cols);
        job.x_x16 = ws->x16;
    }
    ce_parallel_for(job.first_row[count], matmul_rows, &job);
    return CE_OK;
}

ce_status ce_matmul(const ce_tensor *w, ce_workspace *ws, int activations, int n, const float *x, float *y,
                    char *err, size_t errlen) {
    return matmul_shared(1, &w, &y, ws, activations, n, x, err, errlen);
}

/* ---- forward ---- */

/* y (n, b->cols) += b in every row, when the bias exists */
static void add_bias(const ce_tensor *b, int n, float *y) {
    if (b->data == NULL) return;
    const float *bias = b->data;
    for (int i = 0; i < n; i++)
        for (int64_t j = 0; j < b->cols; j++) y[(size_t)i * b->cols + j] += bias[j];
}

ce_status ce_embed(const ce_model *m, int n, const int32_t *tokens, float *x, char *err, size_t errlen) {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab)
            return ce_fail(err, errlen, CE_EINVAL, "token id %d at index %d is outside [0, %d)", (int)tokens[i], i,
                           m->cfg.vocab);
    for (int i = 0; i < n; i++) ce_dequantize_row(&m->token_embd, tokens[i], x + (size_t)i * m->cfg.dim);
    return CE_OK;
}

/* Attention of every row × n_heads query heads, split across threads by (row, head), or for prompts
 * (batches above CE_SMALL_BATCH, where the set has attend_block) by (head, block of up to
 * CE_ATTEND_QUERIES rows of one sequence): head-major, so that each thread's share of the keys is
 * even. Each row attends within its own sequence's cache. */
typedef struct {
    const ce_config *c;
    const ce_seq_rows *seqs;
    const int *row_seq; /* (rows) index into seqs */
    const int *row_pos; /* (rows) position of the row in its sequence */
    const int *blocks;  /* (n_blocks, 2): first row and row count of each block, or NULL */
    int n_blocks;
    int layer;
    size_t scratch;     /* floats of scratch per thread */
    const float *q;     /* (rows, n_heads*head_dim) */
    float *att;         /* (rows, n_heads*head_dim) */
    float *scores;      /* (threads, scratch) */
} attention_job;

static void attention_heads(void *ctx, int64_t begin, int64_t end, int thread) {
    const attention_job *job = ctx;
    const int hd = job->c->head_dim, nh = job->c->n_heads, group = nh / job->c->n_kv_heads, qd = nh * hd;
    float *scratch = job->scores + (size_t)thread * job->scratch;
    for (int64_t task = begin; task < end; task++) {
        /* a head's blocks in the order first, last, second, second to last, ...: a block's cost grows
         * with its position, and so any run of tasks (a thread's share) holds early and late alike */
        const int64_t k = job->blocks ? task % job->n_blocks : 0, b = k % 2 == 0 ? k / 2 : job->n_blocks - 1 - k / 2;
        const int i = job->blocks ? job->blocks[2 * b] : (int)(task / nh);
        const int h = job->blocks ? (int)(task / job->n_blocks) : (int)(task % nh);
        const ce_kv_cache *kv = job->seqs[job->row_seq[i]].kv;
        const void *K = ce_kv_cache_k(kv, job->layer, h / group), *V = ce_kv_cache_v(kv, job->layer, h / group);
        const size_t at = (size_t)i * qd + (size_t)h * hd;
        if (job->blocks)
            ce_kernels_active()->attend_block(kv->type, K, V, hd, job->blocks[2 * b + 1], job->q + at,
                                              qd, job->row_pos + i, job->att + at, qd, scratch);
        else
            ce_attend(job->q + at, K, V, kv->type, job->row_pos[i], hd, scratch, job->att + at);
    }
}

/* Rotates the projected keys k (n, n_kv_heads*head_dim) of positions pos0.. with the rope tables
 * cs (n, head_dim) and stores them and the values v in layer l of the cache. */
static void store_kv(const ce_model *m, ce_kv_cache *kv, int l, int n, int pos0, float *k, const float *v,
                     const float *cs) {
    const ce_config *c = &m->cfg;
    const int hd = c->head_dim, kvd = c->n_kv_heads * hd;
    const size_t row_bytes = ce_row_bytes(kv->type, hd);
    for (int i = 0; i < n; i++) {
        for (int g = 0; g < c->n_kv_heads; g++) {
            float *ki = k + (size_t)i * kvd + g * hd;
            const float *vi = v + (size_t)i * kvd + g * hd;
            ce_rope_apply(ki, hd, cs + (size_t)i * hd, c->rope_style);
            uint8_t *kdst = (uint8_t *)ce_kv_cache_k(kv, l, g) + (size_t)(pos0 + i) * row_bytes;
            uint8_t *vdst = (uint8_t *)ce_kv_cache_v(kv, l, g) + (size_t)(pos0 + i) * row_bytes;
            if (kv->type == CE_TYPE_F16) {
                for (int j = 0; j < hd; j++) {
                    ((uint16_t *)kdst)[j] = ce_fp32_to_fp16(ki[j]);
                    ((uint16_t *)vdst)[j] = ce_fp32_to_fp16(vi[j]);
                }
            } else {
                memcpy(kdst, ki, row_bytes);
                memcpy(vdst, vi, row_bytes);
            }
        }
    }
    kv->len[l - kv->layer_begin] = pos0 + n;
}

/* The checks every cache write shares: layers inside the cache, positions inside its capacity, and no
 * gap before pos0 in any layer. */
static ce_status check_positions(const ce_kv_cache *kv, int layer_begin, int layer_end, int n, int pos0, char *err,
                                 size_t errlen) {
    if (layer_begin < kv->layer_begin || layer_end > kv->layer_end || layer_begin > layer_end)
        return ce_fail(err, errlen, CE_EINVAL, "layers [%d, %d) are not inside the cache's [%d, %d)", layer_begin,
                       layer_end, kv->layer_begin, kv->layer_end);
    if (n <= 0 || pos0 < 0 || pos0 > kv->capacity - n)
        return ce_fail(err, errlen, CE_ERANGE, "positions [%d, %d) do not fit a cache of capacity %d", pos0,
                       pos0 + n, kv->capacity);
    for (int l = layer_begin; l < layer_end; l++)
        if (pos0 > kv->len[l - kv->layer_begin])
            return ce_fail(err, errlen, CE_ERANGE, "layer %d holds positions [0, %d): cannot start at %d", l,
                           kv->len[l - kv->layer_begin], pos0);
    return CE_OK;
}

ce_status ce_fill_kv(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, int layer_begin, int layer_end, int n,
                     int pos0, const float *x, char *err, size_t errlen) {
    const ce_config *c = &m->cfg;
    const int d = c->dim, kvd = c->n_kv_heads * c->head_dim;
    ce_status st;
    if ((st = check_positions(kv, layer_begin, layer_end, n, pos0, err, errlen))) return st;
    if ((st = grow((void **)&ws->buf, &ws->n_floats, (size_t)n * (d + 2 * kvd + c->head_dim), sizeof(float), err, errlen)))
        return st;
    float *xn = ws->buf, *k = xn + (size_t)n * d, *v = k + (size_t)n * kvd, *cs = v + (size_t)n * kvd;
    for (int i = 0; i < n; i++) ce_rope_table(cs + (size_t)i * c->head_dim, c->head_dim, pos0 + i, m->rope_inv_freq);
    for (int l = layer_begin; l < layer_end; l++) {
        for (int i = 0; i < n; i++)
            ce_rmsnorm(xn + (size_t)i * d, x + (size_t)i * d, m->layers[l].attn_norm.data, d, c->norm_eps);
        const ce_tensor *kv_w[] = {&m->layers[l].wk, &m->layers[l].wv};
        float *const kv_y[] = {k, v};
        if ((st = matmul_shared(2, kv_w, kv_y, ws, m->activations, n, xn, err, errlen))) return st;
        add_bias(&m->layers[l].bk, n, k);
        add_bias(&m->layers[l].bv, n, v);
        store_kv(m, kv, l, n, pos0, k, v, cs);
    }
    return CE_OK;
}

ce_status ce_forward(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, int layer_begin, int layer_end,
                     int n, int pos0, float *x, char *err, size_t errlen) {
    ce_seq_rows one = {kv, pos0, n};
    return ce_forward_multi(m, ws, layer_begin, layer_end, 1, &one, x, err, errlen);
}

/* ---- row-wise steps of a layer (run_rows above) ---- */

typedef struct {
    float *x;        /* (n, d) residual stream */
    const float *o;  /* (n, d) added to x first, or NULL */
    float *xn;       /* (n, d) rmsnorm(x) with weight w, unless w is NULL */
    const float *w;
    int d;
    float eps;
} add_norm_job;

static void add_norm_rows(void *ctx, int64_t begin, int64_t end, int thread) {
    const add_norm_job *job = ctx;
    for (int64_t i = begin; i < end; i++) {
        float *x = job->x + (size_t)i * job->d;
        if (job->o)
            for (int j = 0; j < job->d; j++) x[j] += job->o[(size_t)i * job->d + j];
        if (job->w) ce_rmsnorm(job->xn + (size_t)i * job->d, x, job->w, job->d, job->eps);
    }
}

typedef struct {
    float *q;        /* (n, n_heads * head_dim), rotated in place with the tables cs (n, head_dim) */
    const float *cs;
    int n_heads, head_dim, style;
} rope_job;

static void rope_rows(void *ctx, int64_t begin, int64_t end, int thread) {
    const rope_job *job = ctx;
    for (int64_t i = begin; i < end; i++)
        for (int h = 0; h < job->n_heads; h++)
            ce_rope_apply(job->q + ((size_t)i * job->n_heads + h) * job->head_dim, job->head_dim,
                          job->cs + (size_t)i * job->head_dim, job->style);
}

typedef struct {
    float *gate;     /* (n, f): silu(gate) ⊙ up in place */
    const float *up;
    int f;
} silu_job;

static void silu_rows(void *ctx, int64_t begin, int64_t end, int thread) {
    const silu_job *job = ctx;
    ce_kernels_active()->silu_mul(job->gate + (size_t)begin * job->f, job->up + (size_t)begin * job->f,
                                  (end - begin) * job->f);
}


/* Layers [layer_begin, layer_end) over n rows of already validated sequences; capacity: the largest
 * of their caches. */
static ce_status forward_rows(const ce_model *m, ce_workspace *ws, int layer_begin, int layer_end, int n_seqs,
                              const ce_seq_rows *seqs, int n, int capacity, float *x, char *err, size_t errlen) {
    const ce_config *c = &m->cfg;
    const int d = c->dim, hd = c->head_dim, f = c->ffn_dim;
    const int qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    ce_status st;

    /* scratch: xn (n,d) | [q (n,qd) | k (n,kvd) | v (n,kvd) | att (n,qd)] | rope tables (n,hd)
     *          | scores (threads, scratch); ints: row_seq (n) | row_pos (n) | blocks (n, 2).
     * Buffers whose lives do not overlap share memory (it sets prefill's peak): the feed-forward's
     * gate and up (n,f each) reuse the attention block's q..att region, and o (n,d) reuses xn. */
    const size_t attn_floats = (size_t)2 * qd + 2 * kvd, block_floats = attn_floats > 2 * (size_t)f ? attn_floats : 2 * (size_t)f;
    const int blocked = n > CE_SMALL_BATCH && ce_kernels_active()->attend_block != NULL;
    const size_t scratch = blocked ? CE_ATTEND_SCRATCH(capacity, hd) : (size_t)capacity;
    size_t need = (size_t)n * (d + block_floats + hd) + (size_t)ce_threads_get() * scratch;
    if ((st = grow((void **)&ws->buf, &ws->n_floats, need, sizeof(float), err, errlen)) ||
        (st = grow((void **)&ws->ints, &ws->n_ints, 4 * (size_t)n, sizeof(int), err, errlen)))
        return st;
    float *xn = ws->buf, *o = xn, *block = xn + (size_t)n * d;
    float *q = block, *k = q + (size_t)n * qd, *v = k + (size_t)n * kvd, *att = v + (size_t)n * kvd;
    float *gate = block, *up = gate + (size_t)n * f;
    float *cs = block + (size_t)n * block_floats, *scores = cs + (size_t)n * hd;
    int *row_seq = ws->ints, *row_pos = row_seq + n;
    for (int s = 0, i = 0; s < n_seqs; s++)
        for (int j = 0; j < seqs[s].n; j++, i++) row_seq[i] = s, row_pos[i] = seqs[s].pos0 + j;
    int *blocks = row_pos + n, n_blocks = 0;
    for (int s = 0, i0 = 0; blocked && s < n_seqs; i0 += seqs[s].n, s++)
        for (int j = 0; j < seqs[s].n; j += CE_ATTEND_QUERIES, n_blocks++) {
            blocks[2 * n_blocks] = i0 + j;
            blocks[2 * n_blocks + 1] = seqs[s].n - j < CE_ATTEND_QUERIES ? seqs[s].n - j : CE_ATTEND_QUERIES;
        }
    for (int i = 0; i < n; i++) ce_rope_table(cs + (size_t)i * hd, hd, row_pos[i], m->rope_inv_freq);

    for (int l = layer_begin; l < layer_end; l++) {
        const ce_layer *L = &m->layers[l];
        /* attention block: x += Wo · attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x), after the
         * previous layer's feed-forward output o joins x */
        add_norm_job attn_norm = {x, l > layer_begin ? o : NULL, xn, L->attn_norm.data, d, c->norm_eps};
        run_rows(n, add_norm_rows, &attn_norm);
        const ce_tensor *qkv_w[] = {&L->wq, &L->wk, &L->wv};
        float *const qkv_y[] = {q, k, v};
        if ((st = matmul_shared(3, qkv_w, qkv_y, ws, m->activations, n, xn, err, errlen))) return st;
        add_bias(&L->bq, n, q);
        add_bias(&L->bk, n, k);
        add_bias(&L->bv, n, v);
        for (int s = 0, i0 = 0; s < n_seqs; i0 += seqs[s].n, s++)
            store_kv(m, seqs[s].kv, l, seqs[s].n, seqs[s].pos0, k + (size_t)i0 * kvd, v + (size_t)i0 * kvd,
                     cs + (size_t)i0 * hd);
        rope_job rope = {q, cs, c->n_heads, hd, c->rope_style};
        run_rows(n, rope_rows, &rope);
        attention_job job = {c, seqs, row_seq, row_pos, blocked ? blocks : NULL, n_blocks, l, scratch, q, att, scores};
        ce_parallel_for((int64_t)(blocked ? n_blocks : n) * c->n_heads, attention_heads, &job);
        if ((st = ce_matmul(&L->wo, ws, m->activations, n, att, o, err, errlen))) return st;

        /* feed-forward block: x += W_down · (silu(W_gate xn) ⊙ W_up xn), xn = rmsnorm(x + o) */
        add_norm_job ffn_norm = {x, o, xn, L->ffn_norm.data, d, c->norm_eps};
        run_rows(n, add_norm_rows, &ffn_norm);
        const ce_tensor *ffn_w[] = {&L->w_gate, &L->w_up};
        float *const ffn_y[] = {gate, up};
        if ((st = matmul_shared(2, ffn_w, ffn_y, ws, m->activations, n, xn, err, errlen))) return st;
        silu_job silu = {gate, up, f};
        run_rows(n, silu_rows, &silu);
        if ((st = ce_matmul(&L->w_down, ws, m->activations, n, gate, o, err, errlen))) return st;
    }
    add_norm_job last = {x, o, NULL, NULL, d, c->norm_eps}; /* the last feed-forward output joins x */
    if (layer_end > layer_begin) run_rows(n, add_norm_rows, &last);
    return CE_OK;
}

ce_status ce_forward_multi(const ce_model *m, ce_workspace *ws, int layer_begin, int layer_end, int n_seqs,
                           const ce_seq_rows *seqs, float *x, char *err, size_t errlen) {
    ce_status st;
    if (n_seqs <= 0) return ce_fail(err, errlen, CE_EINVAL, "no sequences");
    int n = 0, capacity = 0;
    for (int s = 0; s < n_seqs; s++) {
        if ((st = check_positions(seqs[s].kv, layer_begin, layer_end, seqs[s].n, seqs[s].pos0, err, errlen))) return st;
        for (int t = 0; t < s; t++)
            if (seqs[t].kv == seqs[s].kv)
                return ce_fail(err, errlen, CE_EINVAL, "sequences %d and %d share one cache", t, s);
        if (seqs[s].n > (1 << 20) - n) return ce_fail(err, errlen, CE_ERANGE, "too many rows in one batch");
        n += seqs[s].n;
        if (seqs[s].kv->capacity > capacity) capacity = seqs[s].kv->capacity;
    }
    if (n <= CE_BATCH_CHUNK) return forward_rows(m, ws, layer_begin, layer_end, n_seqs, seqs, n, capacity, x, err, errlen);

    /* Larger batches run CE_BATCH_CHUNK rows at a time through all the layers, in row order: a chunk's
     * keys and values are in the caches before the next chunk's rows attend to them, so this is the
     * one-pass computation (up to the summation order of large batches) with scratch bounded by the chunk, not by
     * the prompt. chunk: the sequences' rows that fall inside [row0, row0 + CE_BATCH_CHUNK). */
    if ((st = grow((void **)&ws->chunk, &ws->n_chunk, (size_t)n_seqs, sizeof *ws->chunk, err, errlen))) return st;
    for (int row0 = 0; row0 < n; row0 += CE_BATCH_CHUNK) {
        const int row1 = n - row0 < CE_BATCH_CHUNK ? n : row0 + CE_BATCH_CHUNK;
        int parts = 0;
        for (int s = 0, first = 0; s < n_seqs; first += seqs[s].n, s++) {
            const int a = first > row0 ? first : row0, b = first + seqs[s].n < row1 ? first + seqs[s].n : row1;
            if (a < b) ws->chunk[parts++] = (ce_seq_rows){seqs[s].kv, seqs[s].pos0 + (a - first), b - a};
        }
        if ((st = forward_rows(m, ws, layer_begin, layer_end, parts, ws->chunk, row1 - row0, capacity,
                               x + (size_t)row0 * m->cfg.dim, err, errlen)))
            return st;
    }
    return CE_OK;
}

ce_status ce_head(const ce_model *m, ce_workspace *ws, const ce_tensor *norm, int n, const float *x, int rows,
                  float *logits, char *err, size_t errlen) {
    const int d = m->cfg.dim;
    if (rows <= 0 || rows > m->cfg.vocab)
        return ce_fail(err, errlen, CE_EINVAL, "head rows %d outside [1, %d]", rows, m->cfg.vocab);
    if (norm == NULL) norm = &m->output_norm;
    if (norm->type != CE_TYPE_F32 || norm->cols != d || norm->data == NULL)
        return ce_fail(err, errlen, CE_EINVAL, "head norm must be F32 of %d elements", d);
    ce_status st;
    if ((st = grow((void **)&ws->buf, &ws->n_floats, (size_t)n * d, sizeof(float), err, errlen))) return st;
    for (int i = 0; i < n; i++) ce_rmsnorm(ws->buf + (size_t)i * d, x + (size_t)i * d, norm->data, d, m->cfg.norm_eps);
    ce_tensor head = m->output; /* the first `rows` rows: contiguous, so a view */
    head.rows = rows;
    return ce_matmul(&head, ws, m->activations, n, ws->buf, logits, err, errlen);
}
