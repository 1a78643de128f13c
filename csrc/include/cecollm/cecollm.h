/* cecollm — C core for cloud–edge collaborative LLM inference.
 *
 * Pure C11: no Python.h. Every fallible function returns a ce_status and writes a message into a
 * caller-owned buffer (err, errlen). Nothing here prints or exits.
 *
 * Shapes follow GGML: a weight matrix has `rows` rows of `cols` contiguous elements (GGUF ne1 × ne0);
 * y = W x means y[r] = dot(W[r, :], x). Hidden states are row-major (n positions × dim).
 */
#ifndef CECOLLM_H
#define CECOLLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CE_OK = 0,
    CE_EINVAL = 1,  /* bad argument, shape or type */
    CE_ENOMEM = 2,  /* allocation failed */
    CE_ERANGE = 3,  /* position or count outside what a buffer holds */
} ce_status;

/* Error buffer length that always holds a full message. */
#define CE_ERRLEN 256

/* Tensor types; values are GGML's type ids so GGUF files map one to one. */
typedef enum {
    CE_TYPE_F32 = 0,
    CE_TYPE_F16 = 1,
    CE_TYPE_Q4_0 = 2,
    CE_TYPE_Q4_1 = 3,
    CE_TYPE_Q5_0 = 6,
    CE_TYPE_Q5_1 = 7,
    CE_TYPE_Q8_0 = 8,
    CE_TYPE_Q4_K = 12,
    CE_TYPE_Q5_K = 13,
    CE_TYPE_Q6_K = 14,
} ce_type;
#define CE_TYPE_COUNT 15 /* one past the largest type id: the size of per-type tables */

#define CE_QK 32   /* elements per quantization block */
#define CE_QK_K 256 /* elements per K-quant super-block */

/* Bytes of one row of `cols` elements, or 0 if the type is unknown or cols does not fit its blocks. */
size_t ce_row_bytes(int type, int64_t cols);
const char *ce_type_name(int type);

/* A read-only view of a weight tensor: rows × cols elements of `type`, rows contiguous. The memory is
 * owned by the caller (for GGUF: the memory-mapped file). */
typedef struct {
    const void *data;
    int type;
    int64_t cols; /* ne0: elements per row */
    int64_t rows; /* ne1 */
} ce_tensor;

/* ---- kernels (quant.c) --------------------------------------------------------------------- */

float ce_fp16_to_fp32(uint16_t h);
uint16_t ce_fp32_to_fp16(float f);

/* Row `row` of w as floats (w->cols of them). */
void ce_dequantize_row(const ce_tensor *w, int64_t row, float *out);

/* Quantizes rows × cols floats into `type` (F32, F16, Q4_0, Q4_1, Q8_0) with ggml's reference rounding;
 * out holds rows * ce_row_bytes(type, cols) bytes. Non-finite input is refused (CE_EINVAL). */
ce_status ce_quantize_rows(int type, const float *x, int64_t rows, int64_t cols, void *out, char *err, size_t errlen);

/* w (rows × cols) += up (rows × rank) · down (rank × cols), in a fixed summation order (reproducible). */
void ce_add_lowrank(float *w, int64_t rows, int64_t cols, const float *up, const float *down, int64_t rank);

/* Weight rows handed to a matmul_f32 kernel at once: its scratch panel holds this many dequantized rows. */
#define CE_TILE_ROWS 32

/* fp32 activations on weights of any `type` (CE_ACT_F32): y[i * ldy + r] = Σ_j w_r[j] x[i * cols + j]
 * for the rows <= CE_TILE_ROWS weight rows w_r at w (row_bytes apart) and i < n, where w_r[j] is
 * ce_dequantize_row's value bit for bit and activations stay fp32. Each (i, r) is summed in an order
 * fixed by the kernel set and by which side of CE_SMALL_BATCH n is on, never by n itself, rows or a
 * row's place among them: a batch of up to CE_SMALL_BATCH rows computes what decode computes, bit for
 * bit, and so does every larger batch among larger ones. panel: CE_TILE_ROWS × cols floats of scratch. */
typedef void (*ce_matmul_f32_fn)(int type, const void *w, size_t row_bytes, int64_t rows, int64_t cols,
                                 const float *x, int n, float *y, int64_t ldy, float *panel);

/* Activations quantized to 8 bits per element for integer dot products (the llama.cpp scheme):
 * x_j ≈ d * qs[j] with d = max_j |x_j| / 127, q rounded to nearest (ties to even). s = d * Σ_j qs[j]
 * serves the weight formats with an offset (Q4_0's -8, Q4_1's minimum); d and s sit side by side so
 * a kernel scales both with one multiply. */
typedef struct {
    float d;
    float s;
    int8_t qs[CE_QK];
} ce_block_q8a;

/* x (cols floats, cols a multiple of CE_QK) -> cols / CE_QK blocks. */
typedef void (*ce_quantize_q8a_fn)(const float *x, ce_block_q8a *out, int64_t cols);
/* Matrix–vector product with quantized activations: y[r] = w_r · x for the `rows` weight rows at w,
 * row_bytes apart, r in [0, rows). Each block's integer sum is exact, so results differ between kernel
 * sets only in the float sum over blocks. */
typedef void (*ce_matvec_q8a_fn)(const void *w, size_t row_bytes, int64_t rows, const ce_block_q8a *x, int64_t cols,
                                 float *y);

/* Batches above CE_SMALL_BATCH with quantized activations (prompts in CE_ACT_Q8): y[i * ldy + r] =
 * w_r · x_i as ce_matvec_q8a_fn computes it (exact integer sums per block, scaled by the same factors),
 * for the rows <= CE_TILE_ROWS weight rows at w and i < n (x: n rows of cols / CE_QK blocks); the
 * float sum over blocks runs in block order, whatever n. panel: CE_TILE_ROWS × cols floats of
 * scratch, where the kernel repacks the tile's weights once for all n rows. */
typedef void (*ce_matmul_q8a_fn)(const void *w, size_t row_bytes, int64_t rows, const ce_block_q8a *x, int64_t cols,
                                 int n, float *y, int64_t ldy, float *panel);

/* fp32 activations as 30-bit fixed point, for integer dot products that keep fp32 accuracy:
 * x_j = d * (hi[j] + lo[j] / 65534) up to d / 131068 (2^-32 of the block's max |x|), with
 * d = max_j |x_j| / 32767, hi = nearest(x / d), lo = nearest((x - d hi) / d * 65534); sum = Σ_j x_j. */
typedef struct {
    float d;
    float sum;
    int16_t hi[CE_QK];
    int16_t lo[CE_QK];
} ce_block_x16;

typedef void (*ce_quantize_x16_fn)(const float *x, ce_block_x16 *out, int64_t cols);
/* y[r] = w_r · x as ce_matvec_q8a_fn, with fixed-point activations */
typedef void (*ce_matvec_x16_fn)(const void *w, size_t row_bytes, int64_t rows, const ce_block_x16 *x, int64_t cols,
                                 float *y);

/* The kernel table: one entry per weight type. The scalar _generic kernels are the specification;
 * ce_kernels_select() installs the fastest set this CPU supports (the one dispatch point).
 * matvec_q8a and matvec_x16 are NULL for the float types, and matvec_x16 in the generic set (its
 * fp32-accuracy specification is matmul_f32): those take fp32 activations (matmul_f32). */
typedef struct {
    const char *name;
    ce_matmul_f32_fn matmul_f32; /* every weight type (the type is its first argument) */
    ce_quantize_q8a_fn quantize_q8a;
    ce_matvec_q8a_fn matvec_q8a[CE_TYPE_COUNT];
    ce_matmul_q8a_fn matmul_q8a[CE_TYPE_COUNT]; /* prompts in CE_ACT_Q8, where a set has it (else matmul_f32) */
    /* A faster realization of matmul_f32 for decode-sized batches (n <= CE_SMALL_BATCH) on quantized
     * weights, where a set has it (NULL in the generic set). */
    ce_quantize_x16_fn quantize_x16;
    ce_matvec_x16_fn matvec_x16[CE_TYPE_COUNT];
    /* Attention over a KV cache block X (rows, n) of a float type:
     * dot_rows: out[t] = X[t, :] · q (scores);  sum_rows: y = Σ_t a[t] X[t, :] (weighted values). */
    void (*dot_rows[CE_TYPE_F16 + 1])(const void *X, const float *q, int64_t rows, int64_t n, float *out);
    void (*sum_rows[CE_TYPE_F16 + 1])(const void *X, const float *a, int64_t rows, int64_t n, float *y);
    /* Attention of a block of prompt rows (batches above CE_SMALL_BATCH), where a set has it (NULL in
     * the generic set): nq <= CE_ATTEND_QUERIES queries of one head (q: ldq apart) at positions pos[i]
     * against one kv head's K, V (keys, head_dim) of a float type, each out_i (ldo apart) what
     * ce_attend computes, to float rounding, in an order of the set's that does not depend on the
     * other queries. scratch: CE_ATTEND_SCRATCH(max pos_i + 1, head_dim) floats. */
    void (*attend_block)(int type, const void *K, const void *V, int head_dim, int nq, const float *q, int64_t ldq,
                         const int *pos, float *out, int64_t ldo, float *scratch);
    /* x[j] = exp(x[j] - shift) for n elements (x[j] <= shift); returns their sum (softmax's numerator) */
    double (*exp_shifted)(float *x, float shift, int64_t n);
    /* gate[j] = silu(gate[j]) up[j] = gate[j] / (1 + exp(-gate[j])) up[j] for n elements (the SwiGLU) */
    void (*silu_mul)(float *gate, const float *up, int64_t n);
} ce_kernels;

#define CE_ATTEND_QUERIES 32
#define CE_ATTEND_SCRATCH(keys, head_dim) (32 * ((size_t)(keys) + (size_t)(head_dim)) + 16 * (size_t)(head_dim))

const ce_kernels *ce_kernels_generic(void);
const ce_kernels *ce_kernels_active(void);
/* name: NULL or "auto" (best available), or a kernel set name such as "generic". */
ce_status ce_kernels_select(const char *name, char *err, size_t errlen);

/* ---- threads (pool.c) ------------------------------------------------------------------------ */

/* Threads for matrix work and attention, the caller included; n <= 0 means the cores available.
 * Not to be called while other threads are running core functions. */
ce_status ce_threads_set(int n, char *err, size_t errlen);
int ce_threads_get(void);
int ce_threads_available(void);

/* ---- model (model.c) ---------------------------------------------------------------------- */

typedef enum {
    CE_ROPE_ADJACENT = 0, /* rotate (x[2i], x[2i+1]): GGUF/llama.cpp, whose Q/K rows are permuted */
    CE_ROPE_HALF = 1,     /* rotate (x[i], x[i + head_dim/2]): Hugging Face checkpoints */
} ce_rope_style;

typedef struct {
    int n_layers;
    int dim;
    int ffn_dim;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int vocab;
    float rope_theta;
    float norm_eps;
    int rope_style;
} ce_config;

typedef struct {
    ce_tensor attn_norm; /* (dim) F32 */
    ce_tensor wq;        /* (n_heads*head_dim, dim) */
    ce_tensor wk;        /* (n_kv_heads*head_dim, dim) */
    ce_tensor wv;        /* (n_kv_heads*head_dim, dim) */
    ce_tensor wo;        /* (dim, n_heads*head_dim) */
    ce_tensor ffn_norm;  /* (dim) F32 */
    ce_tensor w_gate;    /* (ffn_dim, dim) */
    ce_tensor w_up;      /* (ffn_dim, dim) */
    ce_tensor w_down;    /* (dim, ffn_dim) */
    ce_tensor bq, bk, bv; /* F32 biases of the q, k and v projections (Qwen2); data NULL: none */
} ce_layer;

/* How activations enter the matrix products of quantized weights. */
typedef enum {
    CE_ACT_F32 = 0, /* fp32 accuracy: batches up to CE_SMALL_BATCH rows through matvec_x16 where the
                     * set has it, larger ones (prompts) through matmul_f32 on dequantized weights */
    CE_ACT_Q8 = 1,  /* activations quantized to ce_block_q8a, integer dots (llama.cpp's numerics):
                     * matvec_q8a up to CE_SMALL_BATCH rows, matmul_q8a above where the set has it;
                     * otherwise as CE_ACT_F32 */
} ce_activations;

typedef struct {
    ce_config cfg;
    int activations;       /* ce_activations */
    ce_tensor token_embd;  /* (vocab, dim) */
    ce_tensor output_norm; /* (dim) F32 */
    ce_tensor output;      /* (vocab, dim): the LM head; equals token_embd when tied */
    ce_layer *layers;      /* n_layers, owned by the caller */
    ce_tensor rope_freqs;  /* (head_dim/2) F32 divisors of the inverse frequencies (Llama 3's RoPE
                            * scaling, llama.cpp's rope_freqs.weight); data NULL: none */
    float *rope_inv_freq;  /* (head_dim/2) theta^(-2i/head_dim) / rope_freqs[i], owned by the model */
} ce_model;

/* Validates config, shapes and types of a model whose fields the caller filled, and allocates its
 * derived tables. On success free with ce_model_free (which does not touch caller-owned memory). */
ce_status ce_model_init(ce_model *m, char *err, size_t errlen);
void ce_model_free(ce_model *m);

/* Per-sequence key/value cache for layers [layer_begin, layer_end).
 * k, v: (layer_end-layer_begin, n_kv_heads, capacity, head_dim) elements of `type` (CE_TYPE_F32, or
 * CE_TYPE_F16 for half the memory and memory traffic at long context): each head's keys contiguous. */
typedef struct {
    int layer_begin, layer_end;
    int capacity;
    int n_kv_heads, head_dim;
    int type;
    int *len; /* per local layer: positions [0, len) hold valid keys/values */
    void *k;
    void *v;
} ce_kv_cache;

ce_status ce_kv_cache_init(ce_kv_cache *kv, const ce_config *cfg, int layer_begin, int layer_end,
                           int capacity, int type, char *err, size_t errlen);
void ce_kv_cache_free(ce_kv_cache *kv);
/* Forgets every position from n on, in every layer (a rejected draft's keys and values): lengths
 * become min(len, n). The next forward pass continues from there as if they had never been run. */
void ce_kv_cache_truncate(ce_kv_cache *kv, int n);
/* Keys (or values) of one layer and kv head: (capacity, head_dim) elements of kv->type. */
void *ce_kv_cache_k(const ce_kv_cache *kv, int layer, int kv_head);
void *ce_kv_cache_v(const ce_kv_cache *kv, int layer, int kv_head);

/* Scratch buffers, grown on demand and reused: the token loop does not allocate. */
typedef struct {
    size_t n_floats;
    float *buf;        /* activations of the forward pass */
    size_t n_panel;
    float *panel;      /* dequantized weight rows: CE_TILE_ROWS × cols per thread */
    size_t n_x16;
    ce_block_x16 *x16; /* fixed-point activations (CE_ACT_F32 through matvec_x16) */
    size_t n_ints;
    int *ints;         /* row -> sequence map of multi-sequence batches */
    size_t n_q8;
    ce_block_q8a *q8;  /* quantized activations (CE_ACT_Q8) */
    size_t n_chunk;
    struct ce_seq_rows *chunk; /* the sequences' shares of one chunk of a large batch */
} ce_workspace;

void ce_workspace_free(ce_workspace *ws);

/* Rows of the token embedding: x (n, dim). */
ce_status ce_embed(const ce_model *m, int n, const int32_t *tokens, float *x, char *err, size_t errlen);

/* Runs layers [layer_begin, layer_end) on n consecutive positions pos0..pos0+n-1 of one sequence.
 * x (n, dim) holds the hidden states entering layer_begin and receives those leaving layer_end-1.
 * Keys/values are written at those positions; each layer needs pos0 <= its filled length (so
 * positions can be recomputed, which drops what followed them) and pos0+n <= capacity.
 * A position's result does not depend on n up to CE_SMALL_BATCH: decode, catch-up and small
 * batches are bitwise identical; larger batches run through matmul_f32, CE_BATCH_CHUNK rows at a time. */
ce_status ce_forward(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, int layer_begin,
                     int layer_end, int n, int pos0, float *x, char *err, size_t errlen);

/* One sequence's share of a multi-sequence batch: n positions pos0.. of the sequence cached in kv. */
typedef struct ce_seq_rows {
    ce_kv_cache *kv;
    int pos0;
    int n;
} ce_seq_rows;

/* ce_forward over several sequences at once (the cloud batching requests of different sessions):
 * x holds each sequence's rows in turn (Σ n, dim). The matrix products run over all rows together,
 * attention per sequence against its own cache. Results equal separate ce_forward calls bit for bit
 * while Σ n <= CE_SMALL_BATCH. */
ce_status ce_forward_multi(const ce_model *m, ce_workspace *ws, int layer_begin, int layer_end, int n_seqs,
                           const ce_seq_rows *seqs, float *x, char *err, size_t errlen);

/* Computes only the keys/values of layers [layer_begin, layer_end) at positions pos0.. from the same
 * hidden states x (n, dim), which are not changed: the "propagate" treatment of skipped layers, where
 * an exited token's hidden state stands in for the layers it skipped (approximate, as in CALM). */
ce_status ce_fill_kv(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, int layer_begin, int layer_end,
                     int n, int pos0, const float *x, char *err, size_t errlen);

/* Norm + LM head: logits (n, rows) = output[:rows](rmsnorm(x) * norm), over the first `rows`
 * vocabulary entries (rows = vocab for the whole head; fewer for a cheap candidate check). norm: NULL
 * for the model's final norm, or a (dim) F32 tensor (an exit head's own norm). */
ce_status ce_head(const ce_model *m, ce_workspace *ws, const ce_tensor *norm, int n, const float *x, int rows,
                  float *logits, char *err, size_t errlen);

/* y (n, w->rows) = x (n, w->cols) · wᵀ. The building block of every projection. activations: a
 * ce_activations value. */
ce_status ce_matmul(const ce_tensor *w, ce_workspace *ws, int activations, int n, const float *x, float *y,
                    char *err, size_t errlen);

#define CE_SMALL_BATCH 8
/* Batches above this many rows (long prompts) run through the layers this many rows at a time, which
 * bounds the forward pass's scratch (~8 MB for SmolLM2) whatever the prompt length. */
#define CE_BATCH_CHUNK 512

/* ---- early exits (exits.c) ------------------------------------------------------------------ */

typedef enum {
    CE_METRIC_MAX_PROB = 0, /* max_j p_j */
    CE_METRIC_MARGIN = 1,   /* p_top1 - p_top2 */
    CE_METRIC_ENTROPY = 2,  /* 1 - H(p) / ln(n): 1 for a one-hot, 0 for uniform */
    CE_METRIC_GATE = 3,     /* an exit's trained gate (ce_exit_gate); the edge's decision only */
} ce_metric;

/* Confidence in [0, 1] of p = softmax(logits) over n entries, and its argmax in top1. */
ce_status ce_confidence(const float *logits, int n, int metric, float *conf, int *top1, char *err, size_t errlen);

/* The exit decision: 1 when the confidence reaches threshold (the token leaves here), else 0; conf and
 * top1 are filled either way. A threshold above 1 never accepts. */
ce_status ce_exit_decide(const float *logits, int n, int metric, float threshold, int *accept, float *conf, int *top1,
                         char *err, size_t errlen);

/* What an exit applies to a hidden state h (dim): an optional low-rank adapter h' = h + up (down h),
 * an RMSNorm with its own weights (or the model's final norm), then the model's shared LM head; and
 * optionally a gate predicting from h alone whether this exit's top-1 is the full model's. */
typedef struct {
    int layer;            /* layers run before the exit: it reads the hidden state leaving layer-1 */
    const float *norm;    /* (dim) RMSNorm weights, or NULL: the model's final norm */
    const float *down;    /* (rank, dim), with up (dim, rank); NULL: no adapter */
    const float *up;
    int rank;
    const float *gate_w;  /* (dim + 1), or NULL: no gate */
    float gate_b;
} ce_exit_head;

/* Logits (n, rows) of the exit head over x (n, dim), for the first `rows` vocabulary entries.
 * scratch: n * dim + rank floats when the head has an adapter (else unused; may be NULL). */
ce_status ce_exit_logits(const ce_model *m, ce_workspace *ws, const ce_exit_head *h, int n, const float *x, int rows,
                         float *logits, float *scratch, char *err, size_t errlen);

/* The gate's probability for one hidden state x (dim), in double precision:
 * sigmoid(gate_w[:dim] · x / sqrt(mean(x²) + 1e-6) + gate_w[dim] · prev + gate_b), prev being the
 * previous exit's gate probability (0 at the first exit). */
double ce_exit_gate(const ce_exit_head *h, int dim, const float *x, double prev);

/* ---- generation (decode.c) ------------------------------------------------------------------ */

/* How the next token is picked from the logits. */
typedef struct {
    float temperature;        /* 0: greedy, the first largest logit; else softmax(logits / temperature) */
    int top_k;                /* sample among the top_k most likely (0: all) */
    float top_p;              /* ... then among the smallest most-likely set whose mass reaches top_p (1: all) */
    float repetition_penalty; /* > 0; ids already in the sequence have their logit divided by it when
                               * positive, multiplied when negative (transformers' and llama.cpp's rule) */
    uint64_t rng[4];          /* xoshiro256** state, advanced by every draw */
} ce_sampler;

/* Applies the repetition penalty to logits (vocab, in place) for the ids marked in seen (vocab bytes;
 * NULL: none) and picks the next token into *token. scratch: ce_pick_scratch_bytes(vocab) bytes, or
 * NULL to allocate them when sampling needs them. */
ce_status ce_pick(ce_sampler *s, float *logits, int vocab, const uint8_t *seen, void *scratch, int *token, char *err,
                  size_t errlen);
size_t ce_pick_scratch_bytes(int vocab);

/* The token loop of generation over a cache of every layer. Up to n_max steps; each step first feeds
 * `pending` (when >= 0) at position pos, pos + 1, ... through every layer and the head into logits
 * (vocab floats, in/out: on entry the logits after the last position fed), then applies the
 * repetition penalty to the ids marked in seen (vocab bytes, in/out), picks a token, and stops
 * without storing it when it is one of end_ids (*ended = 1); otherwise stores it in out and marks it
 * seen, and it becomes the pending token of the next step. The last token stored is not fed: the
 * caller passes it as `pending` to continue. logprob (NULL: none): each stored token's log-softmax of
 * the penalized logits, with the n_top most likely ids and theirs in top_ids / top_lp (n_max × n_top;
 * ties by id). *n_out: tokens stored. */
ce_status ce_generate(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, ce_sampler *s, float *logits,
                      uint8_t *seen, int32_t pending, int pos, int n_max, const int32_t *end_ids, int n_end, int n_top,
                      int32_t *out, float *logprob, int32_t *top_ids, float *top_lp, int *n_out, int *ended, char *err,
                      size_t errlen);

/* ---- the edge device (edge.c) --------------------------------------------------------------- */

/* One sequence on an edge device: layers [0, split) of kv with early exits. A token that exits at
 * layer e has no keys/values yet in layers [e, split); they are computed with a later token's pass
 * ("catch-up": the waiting positions ride along in its batch, at most CE_SMALL_BATCH positions per
 * forward call, so the cache ends up bit for bit as a plain pass leaves it) or at once from the
 * exit's hidden state ("propagate", approximate, as CALM). The state lives in buffers indexed by
 * position. Set the configuration with ce_edge_init; the rest is the state. */
typedef struct {
    const ce_model *m;
    ce_kv_cache *kv;            /* layers [0, split) */
    ce_workspace *ws;
    const ce_exit_head *heads;  /* n_heads exits by layer; the last is the split's own head */
    int n_heads;
    int metric;                 /* CE_METRIC_*, or CE_METRIC_GATE: the gates decide, max_prob reports */
    int propagate;              /* 0: catch-up, 1: propagate */
    int precheck_rows;          /* > 0: an exit first bounds its confidence on this many leading rows */
    int n_pos;                  /* positions fed */
    int split_len;              /* split_states rows [0, split_len) are final */
    int64_t layer_positions;    /* position-layers computed: prompt, catch-up and rolled-back drafts included */
    int32_t *pending;           /* (capacity) the exit layer a position waits at for catch-up, or -1 */
    float *pending_hidden;      /* (capacity, dim) its hidden state entering that layer */
    float *split_states;        /* (capacity, dim) hidden states leaving layer split-1 (for the cloud) */
    float *rows;                /* (capacity, dim) a step's batch: row q holds position q */
    float *scratch;             /* dim + largest rank + precheck_rows floats */
} ce_edge;

/* What one step decided. */
typedef struct {
    int exited;            /* 1: logits are the exit's; 0: no exit accepted up to the split (the cloud decides) */
    int exit_layer;        /* where the token was decided, or the split when it was not */
    float confidence;      /* at that exit, in the metric (the gate's probability for gates) */
    int layers_run;        /* position-layers computed in the step, catch-up included */
    int head_checks;       /* full LM-head evaluations */
    int prechecks_skipped; /* exits skipped by the candidate pre-check */
    int segments;          /* forward calls (one per stop: exits that can accept, catch-up joins, the split) */
    int split_start;       /* positions [split_start, n_pos) reached the split in this step, or -1 */
} ce_edge_decision;

/* heads: n_heads >= 1 exits by increasing layer in [1, split], the last at kv->layer_end (the split);
 * kv must start at layer 0. The edge keeps pointers to m, kv, ws and heads. */
ce_status ce_edge_init(ce_edge *e, const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, const ce_exit_head *heads,
                       int n_heads, int metric, int propagate, int precheck_rows, char *err, size_t errlen);
void ce_edge_free(ce_edge *e);

/* The prompt (n tokens) through every edge layer in one batch; its split states become rows [0, n). */
ce_status ce_edge_prefill(ce_edge *e, int n, const int32_t *ids, char *err, size_t errlen);

/* Runs `token` at position n_pos up the edge layers until an exit accepts it. It stops at the exits
 * whose threshold (thresholds[i] for heads[i]; above 1: cannot accept) allows, at the layers where
 * waiting positions join, and at the split. At the split the token is finished there when
 * finish_at_split (standalone: its head always accepts); otherwise the split's exit accepts at its
 * threshold (never with gates) or the decision says not exited, for the cloud. logits: vocab floats,
 * the exit's when d->exited. */
ce_status ce_edge_step(ce_edge *e, int32_t token, const double *thresholds, int finish_at_split, float *logits,
                       ce_edge_decision *d, char *err, size_t errlen);

/* Completes every waiting catch-up now, without a new token. *first: the first position whose split
 * state it finished (rows [*first, n_pos)), or -1 when nothing was waiting. */
ce_status ce_edge_flush(ce_edge *e, int *first, char *err, size_t errlen);

/* Forgets positions n.. (rejected drafts): their keys/values, waiting catch-up and split states. */
void ce_edge_rollback(ce_edge *e, int n);

/* Standalone generation's token loop (ce_generate's shape): up to n_max steps; each first feeds
 * `pending` (when >= 0) through ce_edge_step into logits and decisions[i] (decisions[i].exit_layer is
 * -1 when nothing was fed), then picks a token (no repetition penalty) and stops without storing it
 * at an end id (*ended = 1); else stores it in out, and it is the next pending token. */
ce_status ce_edge_generate(ce_edge *e, ce_sampler *s, const double *thresholds, float *logits, int32_t pending,
                           int n_max, const int32_t *end_ids, int n_end, int32_t *out, ce_edge_decision *decisions,
                           int *n_out, int *ended, char *err, size_t errlen);

/* ---- element-wise operations (ops.c) -------------------------------------------------------- */

/* y = x / sqrt(mean(x²) + eps) * w, over n elements. y may alias x. */
void ce_rmsnorm(float *y, const float *x, const float *w, int n, float eps);
/* In-place rotary embedding of one head vector at position pos (head_dim <= 2048). */
void ce_rope(float *v, int head_dim, int pos, const float *inv_freq, int style);
/* The same in two steps, so a position's table serves every head and layer: cs (head_dim) holds
 * (cos, sin) per pair. */
void ce_rope_table(float *cs, int head_dim, int pos, const float *inv_freq);
void ce_rope_apply(float *v, int head_dim, const float *cs, int style);
/* In-place softmax over n values. */
void ce_softmax(float *x, int n);
/* Causal attention for one query head at position pos: out = Σ_t softmax(q·k_t / √hd) v_t over t ≤ pos.
 * K, V: (keys, head_dim) elements of `type` (F32 or F16) of the matching kv head; scores: pos + 1 floats. */
void ce_attend(const float *q, const void *K, const void *V, int type, int pos, int head_dim, float *scores, float *out);

#ifdef __cplusplus
}
#endif
#endif
