/* CPU: one decoder layer of a Llama-family model for one new token per row, every product 4-bit,
   in two calls on either side of the cache's append (which stays the caller's: transformers'
   DynamicCache.update):

       layer_in    h = rms_norm(x) * w_in                       x [rows, hidden]
                   q, k, v = h W_q^T + b_q, h W_k^T + b_k, h W_v^T + b_v    (one 4-bit call)
                   (Qwen3: q and k RMS-normalized per head)
                   q, k rotated by cos, sin                       -> qkv [rows, (H + 2 G) d]
       (the caller appends k and v to the layer's cache)
       layer_out   a = attention(q, keys, values)                (one query per row, GQA, mask)
                   x = x + (a W_o^T + b_o)
                   h = rms_norm(x) * w_post
                   g, u = h W_gate^T + b_gate, h W_up^T + b_up   (one 4-bit call)
                   x = x + (silu(g) * u) W_down^T + b_down       (x updated in place)

   Each step is the kernel serve/decode_step.py calls one by one (native.c's 4-bit matmul, decode.c's
   norm, rotation and attention), with the same arguments and the same roundings: in bf16 every
   intermediate is rounded to bf16 where the step's torch ops round it (a product's output, then
   its bias added; each residual sum; silu(g), then its product with u). So the layer is that
   step's sequence without a return to Python between the steps (a dozen calls and tensors a
   layer): bit-identical to it in float32 and bf16 but for silu's exponential (expf here,
   torch's own vectorized exp there: an ulp apart at times). Its twin is that step
   (tests/serve/test_decode_step.py compares them, and both with transformers' forward).

   The caller guarantees: x, cos, sin, qkv contiguous, of one dtype (float32 or bf16), as every
   parameter pointed to; keys and values as decode_attention takes them; products whose weights
   the 4-bit matmul takes (kernels/cpu/native.py ``Weight4bit.fits``) for ``rows`` rows. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

typedef struct {
    const weight_4bit *q, *k, *v, *o, *gate, *up, *down;
    const void *q_bias, *k_bias, *v_bias, *o_bias, *gate_bias, *up_bias, *down_bias; /* or NULL */
    const void *in_norm, *post_norm; /* [hidden] */
    const void *q_norm, *k_norm;     /* [head_dim], or NULL (all but Qwen3) */
    float in_eps, post_eps, q_eps, k_eps, scaling;
    int64_t heads, kv_heads, head_dim, hidden, intermediate;
} decode_layer;

static inline float get(const void *p, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(v);
    else ((float *)p)[i] = v;
}

/* y [rows, n] += bias [n] (rounded to y's dtype), as ``out += bias`` after a product */
static void add_bias(void *y, const void *bias, int64_t rows, int64_t n, int bf16) {
    if (!bias) return;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) put(y, r * n + i, get(y, r * n + i, bf16) + get(bias, i, bf16), bf16);
}

/* x += y, both [count] */
static void add_into(void *x, const void *y, int64_t count, int bf16) {
    for (int64_t i = 0; i < count; i++) put(x, i, get(x, i, bf16) + get(y, i, bf16), bf16);
}

int fourbit_layer_in(const decode_layer *L, const void *x, const void *cos, const void *sin, void *qkv, int64_t rows,
                     int bf16, int threads) {
    const int elem = bf16 ? 2 : 4;
    const int64_t d = L->head_dim, nq = L->heads * d, nk = L->kv_heads * d;
    void *h = malloc((size_t)(rows * L->hidden) * elem);
    if (!h) return 1;
    fourbit_rms_norm(x, L->in_norm, h, rows, L->hidden, L->in_eps, bf16);
    const weight_4bit *const weights[3] = {L->q, L->k, L->v};
    int failed = fourbit_matmul_4bit_many(weights, 3, h, qkv, bf16, rows, threads);
    free(h);
    if (failed) return 1;
    char *q = qkv, *k = q + rows * nq * elem, *v = k + rows * nk * elem; /* each [rows, n_i], one after another */
    add_bias(q, L->q_bias, rows, nq, bf16);
    add_bias(k, L->k_bias, rows, nk, bf16);
    add_bias(v, L->v_bias, rows, nk, bf16);
    if (L->q_norm) { /* in place: each row's sum of squares is taken before it is written */
        fourbit_rms_norm(q, L->q_norm, q, rows * L->heads, d, L->q_eps, bf16);
        fourbit_rms_norm(k, L->k_norm, k, rows * L->kv_heads, d, L->k_eps, bf16);
    }
    fourbit_rotate(q, k, cos, sin, rows, L->heads, L->kv_heads, d, bf16);
    return 0;
}

int fourbit_layer_out(const decode_layer *L, void *x, const void *q, const void *keys, const void *values,
                      const int64_t *mask, int64_t length, int64_t k_row, int64_t k_head, int64_t k_pos, int64_t v_row,
                      int64_t v_head, int64_t v_pos, int64_t rows, int bf16, int threads) {
    const int elem = bf16 ? 2 : 4;
    const int64_t hidden = L->hidden, inter = L->intermediate;
    const int64_t widest = 2 * inter > L->heads * L->head_dim ? 2 * inter : L->heads * L->head_dim;
    char *a = malloc((size_t)(rows * widest) * elem), *y = malloc((size_t)(rows * hidden) * elem);
    if (!a || !y) {
        free(a);
        free(y);
        return 1;
    }
    int failed = fourbit_decode_attention(q, keys, values, mask, a, rows, L->heads, L->kv_heads, length, L->head_dim,
                                          k_row, k_head, k_pos, v_row, v_head, v_pos, L->scaling, bf16, threads);
    failed = failed || fourbit_matmul_4bit_many(&L->o, 1, a, y, bf16, rows, threads);
    if (!failed) {
        add_bias(y, L->o_bias, rows, hidden, bf16);
        add_into(x, y, rows * hidden, bf16);
        fourbit_rms_norm(x, L->post_norm, y, rows, hidden, L->post_eps, bf16);
        const weight_4bit *const weights[2] = {L->gate, L->up};
        failed = fourbit_matmul_4bit_many(weights, 2, y, a, bf16, rows, threads); /* a: gate [rows, inter], up after */
    }
    if (!failed) {
        char *g = a, *u = a + rows * inter * elem;
        add_bias(g, L->gate_bias, rows, inter, bf16);
        add_bias(u, L->up_bias, rows, inter, bf16);
        for (int64_t i = 0; i < rows * inter; i++) { /* silu(g), rounded, times u, rounded: into g */
            const float gi = get(g, i, bf16);
            const float s = bf16 ? from_bf16(to_bf16(gi / (1.0f + expf(-gi)))) : gi / (1.0f + expf(-gi));
            put(g, i, s * get(u, i, bf16), bf16);
        }
        failed = fourbit_matmul_4bit_many(&L->down, 1, g, y, bf16, rows, threads);
    }
    if (!failed) {
        add_bias(y, L->down_bias, rows, hidden, bf16);
        add_into(x, y, rows * hidden, bf16);
    }
    free(a);
    free(y);
    return failed;
}
