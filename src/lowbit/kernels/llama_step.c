/* One decoding step of a Llama-architecture model in one native call: embedding row in,
 * next-token logits out, the KV cache updated at pos.
 *
 * Why: per token, transformers (and even a lean PyTorch loop) issue ~1,500 small tensor
 * ops, which on this 2-core machine cost 9-14 ms a token before any matrix is multiplied
 * (lowbit/generation.py has the measurement); llama.cpp's whole step costs 7 ms. Here the
 * step is one OpenMP parallel region: every matrix-vector product splits its rows over the
 * threads (lowbit_row_dot, the fused kernel of linear.c, so the stored bytes are read as
 * QuantLinear reads them), the small vector work runs on one thread between barriers.
 *
 * The arithmetic is transformers' LlamaDecoderLayer (modeling_llama.py): RMSNorm
 * w * (h * rsqrt(mean(h^2) + eps)), rotate-half RoPE from its own cos/sin tables, softmax
 * attention with grouped KV heads, down(silu(gate(x)) * up(x)), residual adds. Sums run
 * in another order than torch's, so logits agree to float32 rounding (tests/test_generation.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear.h"

typedef struct {
    lowbit_weights q, k, v, o, gate, up, down;
    const float *q_bias, *k_bias, *v_bias, *o_bias, *gate_bias, *up_bias, *down_bias; /* NULL: none */
    const float *attn_norm, *mlp_norm;
    float *k_cache, *v_cache; /* (kv_heads, max_len, head_dim) each */
} lowbit_llama_layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, intermediate, max_len, vocab;
    float eps, attn_scale;
    const lowbit_llama_layer *layers;
    const float *final_norm;
    lowbit_weights head;
    const float *head_bias;
    const float *cos, *sin; /* (max_len, head_dim): the model's rotary tables */
    float *scratch;         /* lowbit_llama_scratch(m) floats */
} lowbit_llama;

int64_t lowbit_llama_scratch(const lowbit_llama *m) {
    return 2 * m->hidden + (2 * m->heads + 2 * m->kv_heads) * m->head_dim + m->heads * m->max_len +
           2 * m->intermediate;
}

static void rms_norm(const float *h, const float *w, int64_t n, float eps, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)h[i] * h[i];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (h[i] * r);
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), for one head */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + (-b) * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* rows [0, w->out_features) of w times x into y (+ bias), split over the team's threads; xp: this
 * thread's buffer for the prepared input of grouped rows (NULL: they read x, same result) */
static void matvec(const lowbit_weights *w, const float *bias, const float *x, float *y, int isa, float *xp) {
    xp = xp && lowbit_grouped(w) ? xp : NULL;
    if (xp) lowbit_prepare_x(x, w->in_features, xp);
#pragma omp for schedule(static)
    for (int64_t o = 0; o < w->out_features; o++) y[o] = lowbit_row_dot(w, o, x, xp, isa) + (bias ? bias[o] : 0.0f);
}

int lowbit_llama_step(const lowbit_llama *m, const float *embedding_row, int64_t pos, float *logits, int isa) {
    if (pos < 0 || pos >= m->max_len) return -1;
    const int64_t D = m->hidden, H = m->heads, KV = m->kv_heads, hd = m->head_dim, I = m->intermediate;
    const int64_t L = m->max_len, group = H / KV, n = pos + 1;
    float *h = m->scratch, *x = h + D, *t = x + D, *q = t + H * hd, *k = q + H * hd, *v = k + KV * hd;
    float *att = v + KV * hd, *g = att + H * L, *u = g + I;
    const float *cos = m->cos + pos * hd, *sin = m->sin + pos * hd;
    memcpy(h, embedding_row, D * sizeof(float));
#pragma omp parallel
    {
        int64_t widest = I > D ? I : D;
        widest = H * hd > widest ? H * hd : widest; /* o_proj reads the H * hd attention output */
        float *xp = malloc((size_t)widest * sizeof(float)); /* per thread; freed below */
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lowbit_llama_layer *ly = m->layers + l;
#pragma omp single
            rms_norm(h, ly->attn_norm, D, m->eps, x);
            matvec(&ly->q, ly->q_bias, x, q, isa, xp);
            matvec(&ly->k, ly->k_bias, x, k, isa, xp);
            matvec(&ly->v, ly->v_bias, x, v, isa, xp);
#pragma omp single
            {
                for (int64_t a = 0; a < H; a++) rope(q + a * hd, cos, sin, hd);
                for (int64_t a = 0; a < KV; a++) {
                    rope(k + a * hd, cos, sin, hd);
                    memcpy(ly->k_cache + (a * L + pos) * hd, k + a * hd, hd * sizeof(float));
                    memcpy(ly->v_cache + (a * L + pos) * hd, v + a * hd, hd * sizeof(float));
                }
            }
#pragma omp for schedule(static)
            for (int64_t a = 0; a < H; a++) { /* head a reads KV head a / group */
                const float *qa = q + a * hd, *kc = ly->k_cache + (a / group) * L * hd;
                const float *vc = ly->v_cache + (a / group) * L * hd;
                float *s = att + a * L, mx = -INFINITY, sum = 0.0f;
                for (int64_t j = 0; j < n; j++) {
                    float dot = 0.0f;
                    for (int64_t i = 0; i < hd; i++) dot += qa[i] * kc[j * hd + i];
                    s[j] = dot * m->attn_scale;
                    mx = s[j] > mx ? s[j] : mx;
                }
                for (int64_t j = 0; j < n; j++) sum += (s[j] = expf(s[j] - mx));
                float *out = t + a * hd; /* t: the attention output, H * hd floats */
                for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
                for (int64_t j = 0; j < n; j++) {
                    float p = s[j] / sum;
                    for (int64_t i = 0; i < hd; i++) out[i] += p * vc[j * hd + i];
                }
            }
            matvec(&ly->o, ly->o_bias, t, x, isa, xp);
#pragma omp single
            {
                for (int64_t i = 0; i < D; i++) h[i] += x[i];
                rms_norm(h, ly->mlp_norm, D, m->eps, x);
            }
            matvec(&ly->gate, ly->gate_bias, x, g, isa, xp);
            matvec(&ly->up, ly->up_bias, x, u, isa, xp);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < I; i++) g[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i]; /* silu(g) * u */
            matvec(&ly->down, ly->down_bias, g, x, isa, xp);
#pragma omp single
            for (int64_t i = 0; i < D; i++) h[i] += x[i];
        }
#pragma omp single
        rms_norm(h, m->final_norm, D, m->eps, x);
        matvec(&m->head, m->head_bias, x, logits, isa, xp);
        free(xp);
    }
    return 0;
}
