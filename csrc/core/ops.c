/* Element-wise operations of the decoder: RMSNorm, rotary embedding, softmax. */
#include <math.h>

#include "cecollm/cecollm.h"

void ce_rmsnorm(float *y, const float *x, const float *w, int n, float eps) {
    /* the mean square in double (accuracy is free at these sizes), four partial sums so that the adds
     * do not wait on each other */
    double part[4] = {0.0, 0.0, 0.0, 0.0};
    int j = 0;
    for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; k++) part[k] += (double)x[j + k] * x[j + k];
    double ss = (part[0] + part[1]) + (part[2] + part[3]);
    for (; j < n; j++) ss += (double)x[j] * x[j];
    float scale = (float)(1.0 / sqrt(ss / n + eps));
    for (j = 0; j < n; j++) y[j] = x[j] * scale * w[j];
}

/* cs (head_dim): (cos, sin) of angle pos * inv_freq[i] for each pair i. */
void ce_rope_table(float *cs, int head_dim, int pos, const float *inv_freq) {
    for (int i = 0; i < head_dim / 2; i++) {
        float angle = (float)pos * inv_freq[i];
        cs[2 * i] = cosf(angle);
        cs[2 * i + 1] = sinf(angle);
    }
}

/* Rotation of each pair (a, b) by its angle, the pair chosen by the weights' convention. */
void ce_rope_apply(float *v, int head_dim, const float *cs, int style) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const int ia = style == CE_ROPE_ADJACENT ? 2 * i : i;
        const int ib = style == CE_ROPE_ADJACENT ? 2 * i + 1 : i + half;
        const float a = v[ia], b = v[ib];
        v[ia] = a * c - b * s;
        v[ib] = a * s + b * c;
    }
}

void ce_rope(float *v, int head_dim, int pos, const float *inv_freq, int style) {
    float cs[2048];
    ce_rope_table(cs, head_dim, pos, inv_freq);
    ce_rope_apply(v, head_dim, cs, style);
}

void ce_softmax(float *x, int n) {
    float max = x[0];
    for (int j = 1; j < n; j++) max = x[j] > max ? x[j] : max; /* a compare, not a call to fmaxf */
    const float inv = (float)(1.0 / ce_kernels_active()->exp_shifted(x, max, n));
    for (int j = 0; j < n; j++) x[j] *= inv;
}

void ce_attend(const float *q, const void *K, const void *V, int type, int pos, int head_dim, float *scores, float *out) {
    const ce_kernels *k = ce_kernels_active();
    const float scale = 1.0f / sqrtf((float)head_dim);
    k->dot_rows[type](K, q, pos + 1, head_dim, scores);
    for (int t = 0; t <= pos; t++) scores[t] *= scale;
    ce_softmax(scores, pos + 1);
    k->sum_rows[type](V, scores, pos + 1, head_dim, out);
}
