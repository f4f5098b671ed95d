/* CPU: the rank-r products of a LoRA adapter in training (kernels/lora.py), float32 sums that read
   16-bit activations in place, so no float32 copy of x or of dL/dy is made:

       project   u[m, j] = s * sum_c x[m, c] b[c, j]         x [m, k] bf16 or float32, b [k, r] float32
       grad      w[j, c] = sum_t u[t, j] x[t, c]             u [m, r] float32: w = u^T x, [r, k]
       add       y[m, c] = y[m, c] + cast(sum_j u[m, j] v[j, c])      y [m, n] bf16 or float32, in place

   For an adapter (A [r, in], B [out, r], scale s), x the layer's input and g = dL/dy:
       xa = s x A^T = project(x, A^T)         the output y += xa B^T = add(y, xa, B^T)
       g_xa = s g B = project(g, B)           dL/dA = grad(g_xa, x)      dL/dB = grad(xa, g)^T
       dL/dx = g W + cast(g_xa A)             = add(g W, g_xa, A)

   Why: torch's float32 GEMMs with r = 16 as one dimension run far below the machine's rate, each
   is preceded by a float32 copy of a 16-bit x or g, and the update's float32 [m, out] is written
   and read again for the cast and the add; here each product is one pass over its big operand.

   Rounding: every sum in float32 and in one order, whatever the thread count: project sums over
   c in order (one lane per j), grad over t in order, add over j in order. Multiplies and adds
   contract to FMAs where the instruction set has them (this file asks the compiler to), so
   builds for different instruction sets may differ in the last bit. project multiplies the
   finished sum by s, as the twin's `(x @ b) * s` does; add rounds the sum to y's dtype, then adds
   in float32 and rounds again, as the twin's `y + (u @ v).to(y.dtype)` does. torch's GEMMs may
   sum in other orders, so the twins (kernels/lora.py's torch path) agree to float32 rounding,
   not bit for bit; tests/kernels/test_low_rank.py bounds both against float64 math. The vectors
   are GCC's generic vectors: one AVX-512 register, two AVX2 ones or four SSE ones, as the
   build's instruction set has.

   The caller (kernels/cpu/native.py) guarantees: every tensor contiguous, b, u, v float32, b's
   rows padded with zeros to rp columns (a multiple of 16), x and y float32 or bf16 as the flag
   says, r >= 1. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#pragma GCC optimize("fp-contract=fast")

#define LANES 16
#if defined(__AVX512F__) /* 32 registers of 16 lanes: up to 16 sums held in registers */
#define ROWS 8   /* project: rows of x that share each load of b */
#define GROUP 4  /* grad: 4 x GROUP rows of w summed at once */
#define CHUNKS 4 /* add: vectors of columns per row of y, ROWS_ADD rows sharing each load of v */
#define ROWS_ADD 4
#else /* AVX2: 16 registers of 8 lanes, 8 vectors of 16 */
#define ROWS 4
#define GROUP 2
#define CHUNKS 1
#define ROWS_ADD 4
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x16 load_f32(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x16 load_x(const void *x, int64_t i, int bf16) { /* 16 values of x from element i, widened */
    if (!bf16) return load_f32((const float *)x + i);
    u16x16 h;
    memcpy(&h, (const uint16_t *)x + i, sizeof h);
    const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline float load_one(const void *x, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline f32x16 splat(float s) { return (f32x16){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

/* to_bf16 on 16 lanes, as bits: round to nearest even, NaN kept a NaN */
static inline u32x16 bf16_bits(f32x16 f) {
    u32x16 b;
    memcpy(&b, &f, sizeof b);
    const u32x16 rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const u32x16 nan = (u32x16)((i32x16)(b & 0x7fffffffu) > 0x7f800000);
    return (((b >> 16) | 0x40u) & nan) | (rounded & ~nan);
}

static inline f32x16 bf16_round(f32x16 f) { /* float32(bf16(f)) */
    const u32x16 bits = bf16_bits(f) << 16;
    f32x16 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* ------------------------------------------------------------------------------------ project */
/* u[t + i, j0 : j0 + LANES] for the rows i < ROWS of x widened into xs [ROWS][k] (rows past m
   are zeros), b [k, rp] with rp a multiple of LANES (columns past r are zeros) */
static inline __attribute__((always_inline)) void project_rows(const float *xs, const float *b, float *u, int64_t rows,
                                                               int64_t k, int64_t r, int64_t rp, float s) {
    for (int64_t j0 = 0; j0 < r; j0 += LANES) {
        f32x16 sums[ROWS] = {{0}};
        for (int64_t c = 0; c < k; c++) {
            const f32x16 bc = load_f32(b + c * rp + j0);
            for (int i = 0; i < ROWS; i++) sums[i] += splat(xs[i * k + c]) * bc;
        }
        const int64_t width = r - j0 < LANES ? r - j0 : LANES;
        for (int64_t i = 0; i < rows; i++) {
            const f32x16 scaled = sums[i] * s;
            memcpy(u + i * r + j0, &scaled, (size_t)width * sizeof(float));
        }
    }
}

/* Returns 0, or 1 when scratch memory (ROWS rows of x in float32 a thread) could not be had. */
int fourbit_low_rank_project(const void *x, const float *b, float *u, int64_t m, int64_t k, int64_t r, int64_t rp,
                             float s, int bf16, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *xs = calloc((size_t)(ROWS * k), sizeof(float));
        if (!xs) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < m; t += ROWS) {
            if (!xs) continue;
            const int64_t rows = m - t < ROWS ? m - t : ROWS;
            for (int64_t i = 0; i < rows; i++)
                if (bf16)
                    for (int64_t c = 0; c < k; c++) xs[i * k + c] = load_one(x, (t + i) * k + c, 1);
                else
                    memcpy(xs + i * k, (const float *)x + (t + i) * k, (size_t)k * sizeof(float));
            if (rows < ROWS) memset(xs + rows * k, 0, (size_t)((ROWS - rows) * k) * sizeof(float));
            project_rows(xs, b, u + t * r, rows, k, r, rp, s);
        }
        free(xs);
    }
    return failed;
}

/* --------------------------------------------------------------------------------------- grad */
/* w[j0 : j0 + 4 GROUP, c : c + LANES] summed over all m rows in order; x's columns past k read as zeros */
static inline __attribute__((always_inline)) void grad_columns(const float *u, const void *x, float *w, int64_t m,
                                                               int64_t k, int64_t r, int64_t j0, int64_t c,
                                                               const int bf16) {
    const int64_t width = k - c < LANES ? k - c : LANES, group = r - j0 < 4 * GROUP ? r - j0 : 4 * GROUP;
    f32x16 sums[4 * GROUP] = {{0}};
    for (int64_t t = 0; t < m; t++) {
        f32x16 xv;
        if (width == LANES) {
            xv = load_x(x, t * k + c, bf16);
        } else {
            float p[LANES] = {0};
            for (int64_t l = 0; l < width; l++) p[l] = load_one(x, t * k + c + l, bf16);
            xv = load_f32(p);
        }
        const float *ut = u + t * r + j0;
        for (int g = 0; g < 4 * GROUP; g++) sums[g] += splat(g < group ? ut[g] : 0.0f) * xv;
    }
    for (int64_t g = 0; g < group; g++) {
        float p[LANES];
        for (int l = 0; l < LANES; l++) p[l] = sums[g][l];
        memcpy(w + (j0 + g) * k + c, p, (size_t)width * sizeof(float));
    }
}

void fourbit_low_rank_grad(const float *u, const void *x, float *w, int64_t m, int64_t k, int64_t r, int bf16,
                           int threads) {
    const int64_t columns = (k + LANES - 1) / LANES, groups = (r + 4 * GROUP - 1) / (4 * GROUP);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < columns * groups; task++) {
        const int64_t c = task / groups * LANES, j0 = task % groups * 4 * GROUP;
        if (bf16) grad_columns(u, x, w, m, k, r, j0, c, 1);
        else grad_columns(u, x, w, m, k, r, j0, c, 0);
    }
}

/* ---------------------------------------------------------------------------------------- add */
static inline f32x16 load_part(const float *p, int64_t width) { /* min(width, LANES) values, zeros after */
    if (width >= LANES) return load_f32(p);
    float part[LANES] = {0};
    memcpy(part, p, (size_t)width * sizeof(float));
    return load_f32(part);
}

static inline __attribute__((always_inline)) void add_vector(void *y, int64_t at, f32x16 sum, const int bf16) {
    if (bf16) {
        const u16x16 out = __builtin_convertvector(bf16_bits(load_x(y, at, 1) + bf16_round(sum)), u16x16);
        memcpy((uint16_t *)y + at, &out, sizeof out);
    } else {
        const f32x16 total = load_f32((const float *)y + at) + sum;
        memcpy((float *)y + at, &total, sizeof total);
    }
}

/* rows [t, t + rows) of y (rows <= ROWS_ADD), columns [c, c + CHUNKS LANES) all inside y */
static inline __attribute__((always_inline)) void add_block(void *y, const float *const *ui, const float *v, int64_t t,
                                                            int64_t rows, int64_t c, int64_t n, int64_t r,
                                                            const int bf16) {
    f32x16 sums[ROWS_ADD][CHUNKS] = {{{0}}};
    for (int64_t j = 0; j < r; j++) {
        f32x16 vj[CHUNKS];
        for (int h = 0; h < CHUNKS; h++) vj[h] = load_f32(v + j * n + c + h * LANES);
        for (int i = 0; i < ROWS_ADD; i++) {
            const f32x16 uij = splat(ui[i][j]);
            for (int h = 0; h < CHUNKS; h++) sums[i][h] += uij * vj[h];
        }
    }
    for (int64_t i = 0; i < rows; i++)
        for (int h = 0; h < CHUNKS; h++) add_vector(y, (t + i) * n + c + h * LANES, sums[i][h], bf16);
}

/* the same for the columns [c, n) past the last whole block, one vector (or part of one) at a time */
static void add_rest(void *y, const float *const *ui, const float *v, int64_t t, int64_t rows, int64_t c, int64_t n,
                     int64_t r, const int bf16) {
    for (; c < n; c += LANES) {
        const int64_t width = n - c < LANES ? n - c : LANES;
        for (int64_t i = 0; i < rows; i++) {
            f32x16 sum = {0};
            for (int64_t j = 0; j < r; j++) sum += splat(ui[i][j]) * load_part(v + j * n + c, width);
            if (width == LANES) {
                add_vector(y, (t + i) * n + c, sum, bf16);
                continue;
            }
            float p[LANES];
            memcpy(p, &sum, sizeof p);
            for (int64_t l = 0; l < width; l++) {
                if (bf16) {
                    uint16_t *yl = (uint16_t *)y + (t + i) * n + c + l;
                    *yl = to_bf16(from_bf16(*yl) + from_bf16(to_bf16(p[l])));
                } else {
                    ((float *)y)[(t + i) * n + c + l] += p[l];
                }
            }
        }
    }
}

/* rows [t, t + rows) of y, rows <= ROWS_ADD */
static inline __attribute__((always_inline)) void add_rows(void *y, const float *u, const float *v, int64_t t,
                                                           int64_t rows, int64_t n, int64_t r, const int bf16) {
    const float *ui[ROWS_ADD];
    for (int i = 0; i < ROWS_ADD; i++) ui[i] = u + (t + (i < rows ? i : 0)) * r; /* past m: a row again, unused */
    const int64_t whole = n - n % (CHUNKS * LANES);
    for (int64_t c = 0; c < whole; c += CHUNKS * LANES) add_block(y, ui, v, t, rows, c, n, r, bf16);
    add_rest(y, ui, v, t, rows, whole, n, r, bf16);
}

void fourbit_low_rank_add(void *y, const float *u, const float *v, int64_t m, int64_t n, int64_t r, int bf16,
                          int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < m; t += ROWS_ADD) {
        const int64_t rows = m - t < ROWS_ADD ? m - t : ROWS_ADD;
        if (bf16) add_rows(y, u, v, t, rows, n, r, 1);
        else add_rows(y, u, v, t, rows, n, r, 0);
    }
}
