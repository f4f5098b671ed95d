/* CPU: the small per-layer steps of decoding one token per row (serve/decode_step.py), each in one
   call instead of the dozen torch ops transformers' modeling code spends on it.

       rms_norm   y[r, i] = w[i] * cast(x[r, i] / sqrt(sum_j x[r, j]^2 / n + eps))
                  (and its gradient for x, which training takes too: rms_norm_backward)
       rotate     x[r, h, i]        = x[r, h, i] cos[r, i] - x[r, h, i + d/2] sin[r, i]          (i < d/2)
                  x[r, h, i + d/2]  = x[r, h, i + d/2] cos[r, i + d/2] + x[r, h, i] sin[r, i + d/2]
                  (in place, for q and k: transformers' rotate_half pairs the two halves)
       attention  out[r, h] = sum_t p_t v[r, h / g, t],  p = softmax_t(scale q[r, h] . k[r, h / g, t])
                  over the positions t that mask[r, t] keeps; g = query heads per key/value head

   Rounding: in bf16, rms_norm and rotate round where transformers' ops round (the normalized
   row cast back, then its product with w; each product of rotate, then their sum), so they are
   bit-identical to the plain-torch twins except where float32 sums of squares differ in order;
   in float32 each op is one IEEE operation (no FMA contraction: -ffp-contract=off). attention
   computes in float32 throughout (scores, softmax, weighted sum) and rounds the output once,
   where torch's bf16 attention may round more. The twins: kernels/rms_norm.py,
   kernels/rotary.py, kernels/decode_attention.py; tests/kernels/test_decode_kernels.py.

   The caller guarantees: x, y, q, k, cos, sin, out contiguous, of one dtype (float32 or bf16);
   keys and values with contiguous head_dim and the strides given; mask int64 [rows, length] or
   NULL (every position kept), each row keeping at least one position. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline float rounded(float v, int bf16) { return bf16 ? from_bf16(to_bf16(v)) : v; }

#define LANES 16 /* independent partial sums: the loops vectorize without reassociating a sum */

static inline float sum_lanes(float *part) { /* a tree: 4 dependent adds, not 15 */
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) part[l] += part[l + width];
    return part[0];
}

/* a . b over d values, float32 products and sums */
static inline __attribute__((always_inline)) float dot(const void *a, const void *b, int64_t d, const int bf16) {
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 mask = d - i >= 16 ? 0xFFFF : (__mmask16)((1u << (d - i)) - 1);
        __m512 x, y;
        if (bf16) {
            x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)a + i)), 16));
            y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)b + i)), 16));
        } else {
            x = _mm512_maskz_loadu_ps(mask, (const float *)a + i);
            y = _mm512_maskz_loadu_ps(mask, (const float *)b + i);
        }
        sum = _mm512_add_ps(sum, _mm512_mul_ps(x, y));
    }
    return _mm512_reduce_add_ps(sum);
#else
    float part[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) part[l] += load(a, i + l, bf16) * load(b, i + l, bf16);
    for (; i < d; i++) part[0] += load(a, i, bf16) * load(b, i, bf16);
    return sum_lanes(part);
#endif
}

static inline __attribute__((always_inline)) void rms_norm_row(const void *x, const void *w, void *y, int64_t n,
                                                                float eps, const int bf16) {
    const float inv = 1.0f / sqrtf(dot(x, x, n, bf16) / (float)n + eps); /* the sum of squares */
    for (int64_t i = 0; i < n; i++) store(y, i, load(w, i, bf16) * rounded(load(x, i, bf16) * inv, bf16), bf16);
}

void fourbit_rms_norm(const void *x, const void *w, void *y, int64_t rows, int64_t n, float eps, int bf16) {
    const int elem = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * n * elem;
        char *yr = (char *)y + r * n * elem;
        if (bf16) rms_norm_row(xr, w, yr, n, eps, 1); /* the dtype a constant in each copy: vectorized loops */
        else rms_norm_row(xr, w, yr, n, eps, 0);
    }
}

/* The gradient of rms_norm with respect to x, for training (kernels/rms_norm.py; w frozen):
       gh[i] = float32(cast(g[i] * w[i]))            the product's gradient, rounded as y was
       r     = 1 / sqrt(sum_j x[j]^2 / n + eps)
       dx[i] = cast(r gh[i] - x[i] r^3 (sum_j gh[j] x[j]) / n)
   in float32, as autograd derives it from the twin's ops (its order of operations differs:
   the twin's gradient agrees to float32 rounding before the cast, tests/kernels/test_rms_norm_grad.py). */
static inline __attribute__((always_inline)) void rms_norm_grad_row(const void *x, const void *w, const void *g,
                                                                     void *dx, float *gh, int64_t n, float eps,
                                                                     const int bf16) {
    const float inv = 1.0f / sqrtf(dot(x, x, n, bf16) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) gh[i] = rounded(load(g, i, bf16) * load(w, i, bf16), bf16);
    float part[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) part[l] += gh[i + l] * load(x, i + l, bf16);
    for (; i < n; i++) part[0] += gh[i] * load(x, i, bf16);
    const float c = sum_lanes(part) / (float)n * inv * inv * inv;
    for (int64_t j = 0; j < n; j++) store(dx, j, inv * gh[j] - load(x, j, bf16) * c, bf16);
}

/* x, g, dx [rows, n], w [n]; returns 0, or 1 when scratch memory (n floats a thread) could not be had */
int fourbit_rms_norm_backward(const void *x, const void *w, const void *g, void *dx, int64_t rows, int64_t n,
                              float eps, int bf16, int threads) {
    const int64_t elem = bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (rows * n >= (1 << 16) && threads > 1) reduction(| : failed)
    {
        float *gh = malloc((size_t)n * sizeof(float));
        if (!gh) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!gh) continue;
            const char *xr = (const char *)x + r * n * elem, *gr = (const char *)g + r * n * elem;
            char *dr = (char *)dx + r * n * elem;
            if (bf16) rms_norm_grad_row(xr, w, gr, dr, gh, n, eps, 1);
            else rms_norm_grad_row(xr, w, gr, dr, gh, n, eps, 0);
        }
        free(gh);
    }
    return failed;
}

/* x [rows, heads, d] rotated in place by cos, sin [rows, d] */
static void rotate_heads(void *x, const void *cos, const void *sin, int64_t rows, int64_t heads, int64_t d, int bf16) {
    const int64_t half = d / 2;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t at = (r * heads + h) * d;
            for (int64_t i = 0; i < half; i++) {
                const float a = load(x, at + i, bf16), b = load(x, at + i + half, bf16);
                const float lo = rounded(a * load(cos, r * d + i, bf16), bf16) +
                                 rounded(-b * load(sin, r * d + i, bf16), bf16);
                const float hi = rounded(b * load(cos, r * d + i + half, bf16), bf16) +
                                 rounded(a * load(sin, r * d + i + half, bf16), bf16);
                store(x, at + i, lo, bf16);
                store(x, at + i + half, hi, bf16);
            }
        }
}

void fourbit_rotate(void *q, void *k, const void *cos, const void *sin, int64_t rows, int64_t q_heads,
                    int64_t k_heads, int64_t d, int bf16) {
    rotate_heads(q, cos, sin, rows, q_heads, d, bf16);
    rotate_heads(k, cos, sin, rows, k_heads, d, bf16);
}

/* the query heads [group, d] that share one key/value head, of one row: scores over the kept
   positions, softmax, the weighted sum of values; the group's heads together, so each key and
   value comes from memory once and from cache for the other heads */
static inline __attribute__((always_inline)) void attend(const void *q, const void *keys, const void *values,
                                                         const int64_t *mask, void *out, int64_t group, int64_t length,
                                                         int64_t d, int64_t k_pos, int64_t v_pos, float scale,
                                                         float *scores, float *acc, const int bf16) {
    for (int64_t t = 0; t < length; t++) {
        for (int64_t g = 0; g < group; g++) {
            if (mask && !mask[t]) {
                scores[g * length + t] = -INFINITY;
                continue;
            }
            const int elem = bf16 ? 2 : 4;
            scores[g * length + t] = dot((const char *)q + g * d * elem, (const char *)keys + t * k_pos * elem, d, bf16) * scale;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * length, top = -INFINITY, total = 0;
        for (int64_t t = 0; t < length; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < length; t++) {
            s[t] = s[t] == -INFINITY ? 0.0f : expf(s[t] - top);
            total += s[t];
        }
        for (int64_t i = 0; i < d; i++) acc[g * d + i] = 0;
        for (int64_t t = 0; t < length; t++) {
            if (s[t] == 0.0f) continue;
            for (int64_t i = 0; i < d; i++) acc[g * d + i] += s[t] * load(values, t * v_pos + i, bf16);
        }
        for (int64_t i = 0; i < d; i++) store(out, g * d + i, acc[g * d + i] / total, bf16);
    }
}

/* q, out [rows, q_heads, d]; keys, values [rows, kv_heads, length, d] at the strides given (in
   elements). Returns 0, or 1 when scratch memory could not be had. */
int fourbit_decode_attention(const void *q, const void *keys, const void *values, const int64_t *mask, void *out,
                             int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t length, int64_t d,
                             int64_t k_row, int64_t k_head, int64_t k_pos, int64_t v_row, int64_t v_head,
                             int64_t v_pos, float scale, int bf16, int threads) {
    const int64_t group = q_heads / kv_heads, elem = bf16 ? 2 : 4;
    int failed = 0;
    const int parallel = rows * q_heads * length * d >= (1 << 18) && threads > 1; /* else a thread team costs more */
#pragma omp parallel num_threads(threads) if (parallel) reduction(| : failed)
    {
        float *scores = malloc((size_t)(group * length) * sizeof(float));
        float *acc = malloc((size_t)(group * d) * sizeof(float));
        if (!scores || !acc) failed = 1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * kv_heads; task++) { /* (row, key/value head) */
            if (!scores || !acc) continue;
            const int64_t r = task / kv_heads, kv = task % kv_heads;
            const char *qt = (const char *)q + task * group * d * elem;
            const char *kt = (const char *)keys + (r * k_row + kv * k_head) * elem;
            const char *vt = (const char *)values + (r * v_row + kv * v_head) * elem;
            const int64_t *mt = mask ? mask + r * length : NULL;
            char *ot = (char *)out + task * group * d * elem;
            if (bf16) attend(qt, kt, vt, mt, ot, group, length, d, k_pos, v_pos, scale, scores, acc, 1);
            else attend(qt, kt, vt, mt, ot, group, length, d, k_pos, v_pos, scale, scores, acc, 0);
        }
        free(scores);
        free(acc);
    }
    return failed;
}
