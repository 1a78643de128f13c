/* The edge device's token step: layers [0, split) with early exits, the KV cache kept exact by
 * catch-up, and standalone generation's token loop (see ce_edge in cecollm.h). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "cecollm/cecollm.h"
#include "util.h"

static float *row(const ce_edge *e, float *base, int q) { return base + (size_t)q * e->m->cfg.dim; }

static int split_of(const ce_edge *e) { return e->heads[e->n_heads - 1].layer; }

void ce_edge_free(ce_edge *e) {
    free(e->pending);
    free(e->pending_hidden);
    free(e->split_states);
    free(e->rows);
    free(e->scratch);
    memset(e, 0, sizeof *e);
}

ce_status ce_edge_init(ce_edge *e, const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, const ce_exit_head *heads,
                       int n_heads, int metric, int propagate, int precheck_rows, char *err, size_t errlen) {
    memset(e, 0, sizeof *e);
    const int dim = m->cfg.dim;
    if (n_heads < 1) return ce_fail(err, errlen, CE_EINVAL, "an edge needs at least the split's exit");
    if (kv->layer_begin != 0 || kv->layer_end != heads[n_heads - 1].layer)
        return ce_fail(err, errlen, CE_EINVAL, "the edge's cache must hold layers [0, split=%d), not [%d, %d)",
                       heads[n_heads - 1].layer, kv->layer_begin, kv->layer_end);
    if (metric < CE_METRIC_MAX_PROB || metric > CE_METRIC_GATE)
        return ce_fail(err, errlen, CE_EINVAL, "unknown exit metric %d", metric);
    if (precheck_rows != 0 && (precheck_rows < 2 || precheck_rows >= m->cfg.vocab ||
                               (metric != CE_METRIC_MAX_PROB && metric != CE_METRIC_MARGIN)))
        return ce_fail(err, errlen, CE_EINVAL, "precheck_rows %d: 0, or in [2, %d) with max_prob or margin",
                       precheck_rows, m->cfg.vocab);
    int max_rank = 0;
    for (int i = 0; i < n_heads; i++) {
        const ce_exit_head *h = &heads[i];
        if (h->layer < 1 || (i > 0 && h->layer <= heads[i - 1].layer))
            return ce_fail(err, errlen, CE_EINVAL, "exit layers must increase from 1 (exit %d at %d)", i, h->layer);
        if (h->down != NULL && (h->up == NULL || h->rank < 1 || h->rank > dim))
            return ce_fail(err, errlen, CE_EINVAL, "the adapter of the exit at %d needs up and a rank in [1, %d]",
                           h->layer, dim);
        if (metric == CE_METRIC_GATE && i < n_heads - 1 && h->gate_w == NULL)
            return ce_fail(err, errlen, CE_EINVAL, "metric 'gate' needs a gate at the exit at %d", h->layer);
        if (h->down != NULL && h->rank > max_rank) max_rank = h->rank;
    }
    const size_t cap = (size_t)kv->capacity, states = cap * (size_t)dim;
    e->pending = malloc(sizeof(int32_t) * (cap ? cap : 1));
    e->pending_hidden = calloc(states ? states : 1, sizeof(float));
    e->split_states = calloc(states ? states : 1, sizeof(float));
    e->rows = calloc(states ? states : 1, sizeof(float));
    e->scratch = malloc(sizeof(float) * ((size_t)dim + max_rank + precheck_rows));
    if (!e->pending || !e->pending_hidden || !e->split_states || !e->rows || !e->scratch) {
        ce_edge_free(e);
        return ce_fail(err, errlen, CE_ENOMEM, "out of memory for an edge of %d positions", kv->capacity);
    }
    for (size_t q = 0; q < cap; q++) e->pending[q] = -1;
    e->m = m, e->kv = kv, e->ws = ws, e->heads = heads, e->n_heads = n_heads;
    e->metric = metric, e->propagate = propagate, e->precheck_rows = precheck_rows;
    return CE_OK;
}

/* Layers [begin, end) for positions [start, stop), rows of e->rows, at most CE_SMALL_BATCH positions a
 * call: a position's result is then what running it alone computes, bit for bit. */
static ce_status run(ce_edge *e, int start, int stop, int begin, int end, char *err, size_t errlen) {
    if (begin == end) return CE_OK;
    e->layer_positions += (int64_t)(stop - start) * (end - begin);
    for (int q = start; q < stop; q += CE_SMALL_BATCH) {
        const int n = stop - q < CE_SMALL_BATCH ? stop - q : CE_SMALL_BATCH;
        ce_status st = ce_forward(e->m, e->kv, e->ws, begin, end, n, q, row(e, e->rows, q), err, errlen);
        if (st != CE_OK) return st;
    }
    return CE_OK;
}

/* Puts in front of the batch [*start, ...) the waiting positions that exited at `layer`: those in
 * [filled length of layer, *start), whose hidden states entering `layer` were kept. */
static ce_status catch_up(ce_edge *e, int layer, int *start, char *err, size_t errlen) {
    const int first = e->kv->len[layer];
    for (int q = first; q < *start; q++)
        if (e->pending[q] != layer)
            return ce_fail(err, errlen, CE_EINVAL, "catch-up out of order: position %d waits at %d, not %d", q,
                           e->pending[q], layer);
    for (int q = first; q < *start; q++) {
        memcpy(row(e, e->rows, q), row(e, e->pending_hidden, q), sizeof(float) * (size_t)e->m->cfg.dim);
        e->pending[q] = -1;
    }
    if (first < *start) *start = first;
    return CE_OK;
}

/* Positions [start, stop) stop at exit_layer: their deeper keys/values come later (catch-up) or now
 * from their own hidden states (propagate). */
static ce_status leave(ce_edge *e, int start, int stop, int exit_layer, char *err, size_t errlen) {
    const int split = split_of(e);
    if (exit_layer == split) return CE_OK;
    if (e->propagate)
        return ce_fill_kv(e->m, e->kv, e->ws, exit_layer, split, stop - start, start, row(e, e->rows, start), err,
                          errlen);
    for (int q = start; q < stop; q++) {
        e->pending[q] = exit_layer;
        memcpy(row(e, e->pending_hidden, q), row(e, e->rows, q), sizeof(float) * (size_t)e->m->cfg.dim);
    }
    return CE_OK;
}

static void at_split(ce_edge *e, int start, int stop) {
    memcpy(row(e, e->split_states, start), row(e, e->rows, start),
           sizeof(float) * (size_t)(stop - start) * e->m->cfg.dim);
    e->split_len = stop;
}

/* Whether a waiting position joins at `layer` (every position below the split layer's length is complete). */
static int joins_at(const ce_edge *e, int layer) {
    for (int q = e->kv->len[split_of(e) - 1]; q < e->n_pos; q++)
        if (e->pending[q] == layer) return 1;
    return 0;
}

ce_status ce_edge_prefill(ce_edge *e, int n, const int32_t *ids, char *err, size_t errlen) {
    if (e->n_pos != 0) return ce_fail(err, errlen, CE_EINVAL, "prefill starts a fresh sequence");
    if (n < 1 || n > e->kv->capacity)
        return ce_fail(err, errlen, CE_ERANGE, "a prompt of %d tokens in a sequence of %d positions", n,
                       e->kv->capacity);
    const int split = split_of(e);
    ce_status st = ce_embed(e->m, n, ids, e->rows, err, errlen);
    if (st == CE_OK) st = ce_forward(e->m, e->kv, e->ws, 0, split, n, 0, e->rows, err, errlen);
    if (st != CE_OK) return st;
    e->layer_positions += (int64_t)n * split;
    e->n_pos = n;
    at_split(e, 0, n);
    return CE_OK;
}

ce_status ce_edge_step(ce_edge *e, int32_t token, const double *thresholds, int finish_at_split, float *logits,
                       ce_edge_decision *d, char *err, size_t errlen) {
    const int p = e->n_pos, vocab = e->m->cfg.vocab, dim = e->m->cfg.dim;
    const int decide_metric = e->metric == CE_METRIC_GATE ? CE_METRIC_MAX_PROB : e->metric;
    *d = (ce_edge_decision){.split_start = -1};
    if (p >= e->kv->capacity) return ce_fail(err, errlen, CE_ERANGE, "the sequence is full (%d positions)", p);
    ce_status st = ce_embed(e->m, 1, &token, row(e, e->rows, p), err, errlen);
    if (st != CE_OK) return st;
    int start = p, layer = 0, top1;
    double gate = 0.0; /* the previous gate's probability */
    float conf;
    for (int i = 0; i < e->n_heads; i++) {
        const ce_exit_head *h = &e->heads[i];
        const int last = i == e->n_heads - 1;
        double threshold = thresholds[i];
        /* a stop: the split, an exit that can accept, or a layer where waiting positions join */
        if (!last && threshold > 1.0 && !joins_at(e, h->layer)) continue;
        if ((st = catch_up(e, layer, &start, err, errlen)) || (st = run(e, start, p + 1, layer, h->layer, err, errlen)))
            return st;
        d->layers_run += (p + 1 - start) * (h->layer - layer);
        d->segments++;
        layer = h->layer;
        const float *x = row(e, e->rows, p);
        if (last) {
            at_split(e, start, p + 1);
            d->split_start = start;
            d->exit_layer = layer;
            if (!finish_at_split) { /* collaborative: the split's own exit, else the cloud */
                e->n_pos = p + 1;
                if (threshold > 1.0 || e->metric == CE_METRIC_GATE) return CE_OK;
                if ((st = ce_exit_logits(e->m, e->ws, h, 1, x, vocab, logits, e->scratch, err, errlen)) ||
                    (st = ce_confidence(logits, vocab, decide_metric, &conf, &top1, err, errlen)))
                    return st;
                d->head_checks++;
                d->exited = conf >= (float)threshold;
                d->confidence = d->exited ? conf : 0.0f;
                return CE_OK;
            }
            threshold = 0.0; /* standalone: the split's head decides */
        }
        if (threshold > 1.0) continue; /* stopped only for catch-up */
        if (!last && e->metric == CE_METRIC_GATE) { /* the gate decides; the head only names the token */
            gate = ce_exit_gate(h, dim, x, gate);
            if (gate < threshold) continue;
            conf = (float)gate;
        } else {
            if (!last && e->precheck_rows > 0) {
                /* the leading rows' softmax bounds the full confidence from above whenever the full
                 * top-1 is among them: a bound below the threshold proves the exit fails */
                float *bound_logits = e->scratch + (size_t)dim + (h->down ? h->rank : 0); /* after the adapter's */
                float bound;
                if ((st = ce_exit_logits(e->m, e->ws, h, 1, x, e->precheck_rows, bound_logits, e->scratch, err,
                                         errlen)) ||
                    (st = ce_confidence(bound_logits, e->precheck_rows, CE_METRIC_MAX_PROB, &bound, &top1, err, errlen)))
                    return st;
                if (bound < (float)threshold) {
                    d->prechecks_skipped++;
                    continue;
                }
            }
            if ((st = ce_exit_logits(e->m, e->ws, h, 1, x, vocab, logits, e->scratch, err, errlen)) ||
                (st = ce_confidence(logits, vocab, decide_metric, &conf, &top1, err, errlen)))
                return st;
            d->head_checks++;
            if (!last && conf < (float)threshold) continue;
        }
        if ((st = leave(e, start, p + 1, layer, err, errlen))) return st;
        if (!last && e->metric == CE_METRIC_GATE) {
            d->head_checks++;
            if ((st = ce_exit_logits(e->m, e->ws, h, 1, x, vocab, logits, e->scratch, err, errlen))) return st;
        }
        e->n_pos = p + 1;
        d->exited = 1;
        d->exit_layer = layer;
        d->confidence = conf;
        return CE_OK;
    }
    return ce_fail(err, errlen, CE_EINVAL, "no exit decided the token"); /* unreachable: the split decides */
}

ce_status ce_edge_flush(ce_edge *e, int *first, char *err, size_t errlen) {
    *first = -1;
    int layer = INT_MAX; /* the lowest layer a position waits at */
    for (int q = e->kv->len[split_of(e) - 1]; q < e->n_pos; q++)
        if (e->pending[q] >= 0 && e->pending[q] < layer) layer = e->pending[q];
    if (layer == INT_MAX) return CE_OK;
    int start = e->n_pos;
    for (int i = 0; i < e->n_heads; i++) {
        if (e->heads[i].layer <= layer) continue;
        ce_status st = catch_up(e, layer, &start, err, errlen);
        if (st == CE_OK) st = run(e, start, e->n_pos, layer, e->heads[i].layer, err, errlen);
        if (st != CE_OK) return st;
        layer = e->heads[i].layer;
    }
    at_split(e, start, e->n_pos);
    *first = start;
    return CE_OK;
}

void ce_edge_rollback(ce_edge *e, int n) {
    if (n < 0) n = 0;
    ce_kv_cache_truncate(e->kv, n);
    for (int q = n; q < e->n_pos; q++) e->pending[q] = -1;
    if (e->n_pos > n) e->n_pos = n;
    if (e->split_len > n) e->split_len = n;
}

ce_status ce_edge_generate(ce_edge *e, ce_sampler *s, const double *thresholds, float *logits, int32_t pending,
                           int n_max, const int32_t *end_ids, int n_end, int32_t *out, ce_edge_decision *decisions,
                           int *n_out, int *ended, char *err, size_t errlen) {
    const int vocab = e->m->cfg.vocab;
    *n_out = 0;
    *ended = 0;
    void *scratch = malloc(ce_pick_scratch_bytes(vocab));
    if (scratch == NULL) return ce_fail(err, errlen, CE_ENOMEM, "out of memory for the sampler's scratch");
    ce_status st = CE_OK;
    for (int i = 0; i < n_max; i++) {
        decisions[i] = (ce_edge_decision){.exit_layer = -1, .split_start = -1};
        if (pending >= 0 && (st = ce_edge_step(e, pending, thresholds, 1, logits, &decisions[i], err, errlen))) break;
        int token;
        if ((st = ce_pick(s, logits, vocab, NULL, scratch, &token, err, errlen))) break;
        for (int k = 0; k < n_end && !*ended; k++) *ended = token == end_ids[k];
        if (*ended) break;
        out[i] = token;
        *n_out = i + 1;
        pending = token;
    }
    free(scratch);
    return st;
}
