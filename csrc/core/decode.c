/* The token loop of generation: pick (repetition penalty, greedy or temperature / top-k / top-p
 * sampling, log-probabilities), stop at an end token, feed the token back through every layer. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cecollm/cecollm.h"
#include "util.h"

/* ---- xoshiro256** (Blackman & Vigna) ---- */

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(uint64_t *s) {
    const uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static double uniform01(uint64_t *s) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; } /* [0, 1) */

/* ---- picking one token ---- */

typedef struct {
    double z; /* logit / temperature */
    int id;
} candidate;

/* Most likely first; equal values by id (numpy's stable argsort of -z). */
static int by_likelihood(const void *a, const void *b) {
    const candidate *x = a, *y = b;
    if (x->z != y->z) return x->z > y->z ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The first id of the largest value. */
static int argmax(const float *v, int n) {
    int best = 0;
    for (int j = 1; j < n; j++)
        if (v[j] > v[best]) best = j;
    return best;
}

/* Samples from softmax(logits / temperature) restricted to the top_k most likely, then to the
 * smallest most-likely prefix whose probability reaches top_p. cand: vocab entries of scratch. */
static int sample(ce_sampler *s, const float *logits, int vocab, candidate *cand) {
    const double t = s->temperature, zmax = logits[argmax(logits, vocab)] / t;
    int n = 0;
    double total = 0.0; /* the mass the shares are taken of: every token's, or the top_k's */
    if (s->top_k == 0 && s->top_p >= 1.0f) { /* every token, in id order (no ordering changes the law) */
        for (int j = 0; j < vocab; j++) total += exp(logits[j] / t - zmax);
        double u = uniform01(s->rng) * total, acc = 0.0;
        for (int j = 0; j < vocab; j++)
            if ((acc += exp(logits[j] / t - zmax)) > u) return j;
        return argmax(logits, vocab); /* u rounded up to the total */
    }
    if (s->top_k == 0) {
        /* Only tokens with p_j >= (1 - top_p) / (2 vocab) can be in the nucleus: those below hold at
         * most half of the 1 - top_p mass outside it, so the nucleus ends before reaching them. */
        for (int j = 0; j < vocab; j++) total += exp(logits[j] / t - zmax);
        const double floor = total * (1.0 - s->top_p) / (2.0 * vocab);
        for (int j = 0; j < vocab; j++) {
            const double e = exp(logits[j] / t - zmax);
            if (e >= floor) cand[n++] = (candidate){logits[j] / t, j};
        }
        qsort(cand, (size_t)n, sizeof *cand, by_likelihood);
    } else if (s->top_k > 64) { /* the top_k most likely: all sorted ... */
        for (int j = 0; j < vocab; j++) cand[j] = (candidate){logits[j] / t, j};
        qsort(cand, (size_t)vocab, sizeof *cand, by_likelihood);
        n = s->top_k < vocab ? s->top_k : vocab;
        for (int i = 0; i < n; i++) total += exp(cand[i].z - zmax);
    } else { /* ... or, for a few, a bounded insertion into a sorted prefix */
        const int k = s->top_k < vocab ? s->top_k : vocab;
        for (int j = 0; j < vocab; j++) {
            candidate c = {logits[j] / t, j};
            if (n == k && by_likelihood(&c, &cand[n - 1]) >= 0) continue;
            int i = n < k ? n++ : n - 1;
            while (i > 0 && by_likelihood(&c, &cand[i - 1]) < 0) cand[i] = cand[i - 1], i--;
            cand[i] = c;
        }
        for (int i = 0; i < n; i++) total += exp(cand[i].z - zmax);
    }
    int keep = n;
    if (s->top_p < 1.0f) { /* the first prefix whose share reaches top_p */
        double acc = 0.0;
        for (keep = 0; keep < n;) {
            acc += exp(cand[keep++].z - zmax) / total;
            if (acc >= s->top_p) break;
        }
        total = 0.0;
        for (int i = 0; i < keep; i++) total += exp(cand[i].z - zmax);
    }
    double u = uniform01(s->rng) * total, acc = 0.0;
    for (int i = 0; i < keep; i++)
        if ((acc += exp(cand[i].z - zmax)) > u) return cand[i].id;
    return cand[0].id;
}

size_t ce_pick_scratch_bytes(int vocab) { return sizeof(candidate) * (size_t)(vocab > 0 ? vocab : 0); }

static ce_status check_sampler(const ce_sampler *s, char *err, size_t errlen) {
    if (!(s->temperature >= 0.0f) || s->top_k < 0 || !(s->top_p > 0.0f && s->top_p <= 1.0f) ||
        !(s->repetition_penalty > 0.0f))
        return ce_fail(err, errlen, CE_EINVAL, "need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0");
    return CE_OK;
}

/* The pick without the argument checks: ce_generate checks once for all its steps. */
static int pick(ce_sampler *s, float *logits, int vocab, const uint8_t *seen, candidate *cand) {
    if (seen != NULL && s->repetition_penalty != 1.0f)
        for (int j = 0; j < vocab; j++)
            if (seen[j]) logits[j] = logits[j] > 0 ? logits[j] / s->repetition_penalty : logits[j] * s->repetition_penalty;
    return s->temperature == 0.0f ? argmax(logits, vocab) : sample(s, logits, vocab, cand);
}

ce_status ce_pick(ce_sampler *s, float *logits, int vocab, const uint8_t *seen, void *scratch, int *token, char *err,
                  size_t errlen) {
    ce_status st = check_sampler(s, err, errlen);
    if (st != CE_OK) return st;
    if (vocab < 1) return ce_fail(err, errlen, CE_EINVAL, "no logits to pick from");
    candidate *cand = scratch;
    if (cand == NULL && s->temperature != 0.0f && (cand = malloc(ce_pick_scratch_bytes(vocab))) == NULL)
        return ce_fail(err, errlen, CE_ENOMEM, "out of memory for the sampler's scratch");
    *token = pick(s, logits, vocab, seen, cand);
    if (cand != scratch) free(cand);
    return CE_OK;
}

/* log softmax(logits)[id], and the n_top most likely ids with theirs (ties by id). */
static void log_probs(const float *logits, int vocab, int id, int n_top, candidate *cand, float *logprob,
                      int32_t *top_ids, float *top_lp) {
    const double max = logits[argmax(logits, vocab)];
    double total = 0.0;
    for (int j = 0; j < vocab; j++) total += exp(logits[j] - max);
    const double log_total = log(total);
    *logprob = (float)(logits[id] - max - log_total);
    int n = 0;
    for (int j = 0; j < vocab && n_top > 0; j++) {
        candidate c = {logits[j], j};
        if (n == n_top && by_likelihood(&c, &cand[n - 1]) >= 0) continue;
        int i = n < n_top ? n++ : n - 1;
        while (i > 0 && by_likelihood(&c, &cand[i - 1]) < 0) cand[i] = cand[i - 1], i--;
        cand[i] = c;
    }
    for (int i = 0; i < n; i++) top_ids[i] = cand[i].id, top_lp[i] = (float)(cand[i].z - max - log_total);
}

/* ---- the loop ---- */

ce_status ce_generate(const ce_model *m, ce_kv_cache *kv, ce_workspace *ws, ce_sampler *s, float *logits,
                      uint8_t *seen, int32_t pending, int pos, int n_max, const int32_t *end_ids, int n_end, int n_top,
                      int32_t *out, float *logprob, int32_t *top_ids, float *top_lp, int *n_out, int *ended, char *err,
                      size_t errlen) {
    const int vocab = m->cfg.vocab, L = m->cfg.n_layers;
    *n_out = 0;
    *ended = 0;
    ce_status st = check_sampler(s, err, errlen);
    if (st != CE_OK) return st;
    if (n_top < 0 || n_top > vocab) return ce_fail(err, errlen, CE_EINVAL, "n_top %d outside [0, %d]", n_top, vocab);
    if (kv->layer_begin != 0 || kv->layer_end != L)
        return ce_fail(err, errlen, CE_EINVAL, "generation needs a cache of every layer, not [%d, %d)", kv->layer_begin,
                       kv->layer_end);
    if (pending >= vocab) return ce_fail(err, errlen, CE_EINVAL, "token %d outside the vocabulary", pending);
    float *x = malloc(sizeof(float) * m->cfg.dim);
    candidate *cand = malloc(sizeof(candidate) * vocab);
    if (x == NULL || cand == NULL) {
        st = ce_fail(err, errlen, CE_ENOMEM, "out of memory for the sampler's scratch");
        goto done;
    }
    for (int i = 0; i < n_max; i++) {
        if (pending >= 0) { /* the last token through every layer and the head: the next logits */
            if ((st = ce_embed(m, 1, &pending, x, err, errlen)) ||
                (st = ce_forward(m, kv, ws, 0, L, 1, pos++, x, err, errlen)) ||
                (st = ce_head(m, ws, NULL, 1, x, vocab, logits, err, errlen)))
                goto done;
        }
        const int token = pick(s, logits, vocab, seen, cand);
        for (int e = 0; e < n_end; e++)
            if (token == end_ids[e]) {
                *ended = 1;
                goto done;
            }
        if (logprob != NULL) log_probs(logits, vocab, token, n_top, cand, &logprob[i], top_ids + (size_t)i * n_top, top_lp + (size_t)i * n_top);
        out[i] = token;
        seen[token] = 1;
        *n_out = i + 1;
        pending = token;
    }
done:
    free(x);
    free(cand);
    return st;
}
