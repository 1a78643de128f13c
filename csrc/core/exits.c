/* Early-exit confidence: how sure a distribution softmax(logits) is, as a number in [0, 1]. */
#include <math.h>
#include <string.h>

#include "cecollm/cecollm.h"
#include "util.h"

ce_status ce_confidence(const float *logits, int n, int metric, float *conf, int *top1, char *err, size_t errlen) {
    if (n < 2) return ce_fail(err, errlen, CE_EINVAL, "confidence needs at least 2 logits, got %d", n);
    if (metric != CE_METRIC_MAX_PROB && metric != CE_METRIC_MARGIN && metric != CE_METRIC_ENTROPY)
        return ce_fail(err, errlen, CE_EINVAL, "unknown confidence metric %d", metric);
    int best = 0, second = -1;
    for (int j = 1; j < n; j++) {
        if (logits[j] > logits[best]) {
            second = best;
            best = j;
        } else if (second < 0 || logits[j] > logits[second]) {
            second = j;
        }
    }
    if (!isfinite(logits[best])) return ce_fail(err, errlen, CE_EINVAL, "logits are not finite");
    /* Z = Σ exp(l_j - l_max); p_j = exp(l_j - l_max) / Z. The exponentials go through the kernel
     * set's exp_shifted (vectorized; a vocabulary of 49k costs ~0.5 ms through libm's exp), a chunk
     * of logits at a time copied to the stack. */
    enum { CHUNK = 1024 };
    float e[CHUNK];
    const ce_kernels *k = ce_kernels_active();
    const double max = logits[best];
    double z = 0.0, weighted = 0.0; /* weighted = Σ exp(l_j - max) (l_j - max) */
    for (int j0 = 0; j0 < n; j0 += CHUNK) {
        const int len = n - j0 < CHUNK ? n - j0 : CHUNK;
        memcpy(e, logits + j0, sizeof(float) * (size_t)len);
        z += k->exp_shifted(e, logits[best], len);
        if (metric == CE_METRIC_ENTROPY)
            for (int j = 0; j < len; j++) weighted += (double)e[j] * (logits[j0 + j] - max);
    }
    double p1 = 1.0 / z, p2 = exp(logits[second] - max) / z;
    switch (metric) {
    case CE_METRIC_MAX_PROB: *conf = (float)p1; break;
    case CE_METRIC_MARGIN: *conf = (float)(p1 - p2); break;
    default: { /* H = log Z - Σ p_j (l_j - max); confidence 1 - H / log n */
        double h = log(z) - weighted / z;
        *conf = (float)(1.0 - h / log((double)n));
        break;
    }
    }
    *top1 = best;
    return CE_OK;
}

ce_status ce_exit_decide(const float *logits, int n, int metric, float threshold, int *accept, float *conf, int *top1,
                         char *err, size_t errlen) {
    ce_status st = ce_confidence(logits, n, metric, conf, top1, err, errlen);
    *accept = st == CE_OK && threshold <= 1.0f && *conf >= threshold;
    return st;
}

/* h' = h + up (down h) for each row: t = down h in double, rounded to float as the adapter's own
 * output; the up projection in double, rounded, then added (the roundings of a float32 reference). */
static void adapt(const ce_exit_head *h, int dim, int n, const float *x, float *out, float *t) {
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * dim;
        float *oi = out + (size_t)i * dim;
        for (int r = 0; r < h->rank; r++) {
            double acc = 0.0;
            for (int j = 0; j < dim; j++) acc += (double)h->down[(size_t)r * dim + j] * xi[j];
            t[r] = (float)acc;
        }
        for (int j = 0; j < dim; j++) {
            double acc = 0.0;
            for (int r = 0; r < h->rank; r++) acc += (double)h->up[(size_t)j * h->rank + r] * t[r];
            oi[j] = xi[j] + (float)acc;
        }
    }
}

ce_status ce_exit_logits(const ce_model *m, ce_workspace *ws, const ce_exit_head *h, int n, const float *x, int rows,
                         float *logits, float *scratch, char *err, size_t errlen) {
    const int dim = m->cfg.dim;
    if (h->down != NULL) {
        if (h->up == NULL || h->rank < 1 || scratch == NULL)
            return ce_fail(err, errlen, CE_EINVAL, "an exit adapter needs down, up, rank >= 1 and scratch");
        adapt(h, dim, n, x, scratch, scratch + (size_t)n * dim);
        x = scratch;
    }
    const ce_tensor norm = {h->norm, CE_TYPE_F32, dim, 1};
    return ce_head(m, ws, h->norm != NULL ? &norm : NULL, n, x, rows, logits, err, errlen);
}

double ce_exit_gate(const ce_exit_head *h, int dim, const float *x, double prev) {
    double squares = 0.0;
    for (int j = 0; j < dim; j++) squares += (double)x[j] * x[j];
    const double rms = sqrt(squares / dim + 1e-6);
    double z = 0.0;
    for (int j = 0; j < dim; j++) z += x[j] / rms * h->gate_w[j];
    z += prev * h->gate_w[dim] + h->gate_b;
    return 1.0 / (1.0 + exp(-z));
}
