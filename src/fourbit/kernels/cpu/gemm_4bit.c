/* CPU, float32, many rows (training): the two products of a frozen 4-bit weight, with its
   dequantization inside the product instead of a dense copy of W written first and read after.

       forward   y[m, n]  = sum_k x[m, k] W[n, k] + b[n]        x [M, K], W [N, K] 4-bit, y [M, N]
       backward  dx[m, k] = sum_n g[m, n] W[n, k]               g [M, N],                 dx [M, K]
       W[n, k]   = float32(code4[W4[n, k]] * scale[n, k / blocksize])   (native.c: the reference's values)

   Both are one register-blocked product, C[MR x NR] = A[MR x depth] B[depth x NR]: MR rows of A
   broadcast one value at a time, NR columns of B as two vectors, 2 MR accumulators (AVX-512:
   12 x 32, 24 of the 32 registers; AVX2: 6 x 16, 12 of the 16). What differs is where A and B
   come from:
   - backward: A = g's rows as they are; B = NR columns of W (a slab W[:, k0 .. k0 + NR), N x NR),
     dequantized once into the thread's buffer (N x 4 NR bytes, in L2) and used by every MR rows of g.
   - forward: A = x's rows as they are; B = W^T for NR rows of W: those rows dequantized (NR x K),
     then transposed in registers (16 x 16 or 8 x 8 at a time) into a K x NR panel, used by every
     MR rows of x.
   So neither x nor g is copied, W is dequantized once per product into a buffer that stays in
   cache, and each slab or panel of W is its own unit of work (OpenMP threads split them; the
   sums do not depend on how many). On the machine of bench/RESULTS.md (issue 20) this ran at
   ~95% of its float32 FMA peak where dequantize + torch's matmul ran at ~80% of it plus the
   dequantization's pass over memory.

   Sums run over depth in order (k for forward, n for backward), one float32 FMA each: the result
   is dequantize-then-matmul's to float32 rounding, not bit for bit (tests/kernels/test_gemm_4bit.py).
   Built where the compiler was given AVX-512 or AVX2 + FMA; in a plain C build
   fourbit_gemm_4bit_built says 0 and the callers take dequantize + matmul (kernels/matmul_4bit.py),
   the plain twin.

   The caller (kernels/cpu/native.py) guarantees: blocksize a multiple of 32 dividing K (so K is a
   multiple of NR and 16 consecutive columns share one scale), x / g / y / dx contiguous float32,
   every pointer valid. Returns 0, or 1 where the buffers could not be allocated. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#include <omp.h>

int fourbit_gemm_4bit_built(void) { return 1; }

/* Per instruction set: MR x NR; the block product; 16 weights looked up from their 16 codes
   (bytes, in column order) in a block's scaled table; a transpose of T x T floats. */
#if defined(__AVX512F__)
#define MR 12 /* rows of A per block: 24 accumulators + 2 B vectors + 1 broadcast of the 32 registers */
#define NR 32 /* columns of B per block: two 16-float vectors */
#define T 16

/* tile[i][j] = sum_{d < depth} A[i * lda + d] * B[d * NR + j]   for i < MR, j < NR */
static inline void block_product(int64_t depth, const float *restrict a, int64_t lda, const float *restrict b,
                                 float *restrict tile) {
    __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < depth; d++) {
        const __m512 b0 = _mm512_loadu_ps(b + d * NR), b1 = _mm512_loadu_ps(b + d * NR + 16);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            const __m512 v = _mm512_set1_ps(a[i * lda + d]);
            c0[i] = _mm512_fmadd_ps(v, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(v, b1, c1[i]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
        _mm512_storeu_ps(tile + i * NR, c0[i]);
        _mm512_storeu_ps(tile + i * NR + 16, c1[i]);
    }
}

static inline void look_up16(__m128i codes, const float *table, float *out) {
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), _mm512_loadu_ps(table)));
}

/* dst[c * ldd + r] = src[r * lds + c] for r, c < 16 */
static inline void transpose(const float *src, int64_t lds, float *dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) { /* 2 x 2 blocks of single values */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* of pairs */
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 4; i++) { /* of 128-bit lanes, twice */
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

#else /* AVX2 + FMA */
#define MR 6  /* 12 accumulators + 2 B vectors + 1 broadcast of the 16 registers */
#define NR 16 /* two 8-float vectors */
#define T 8

static inline void block_product(int64_t depth, const float *restrict a, int64_t lda, const float *restrict b,
                                 float *restrict tile) {
    __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < depth; d++) {
        const __m256 b0 = _mm256_loadu_ps(b + d * NR), b1 = _mm256_loadu_ps(b + d * NR + 8);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const __m256 v = _mm256_broadcast_ss(a + i * lda + d);
            c0[i] = _mm256_fmadd_ps(v, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(v, b1, c1[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(tile + i * NR, c0[i]);
        _mm256_storeu_ps(tile + i * NR + 8, c1[i]);
    }
}

static inline void look_up16(__m128i codes, const float *table, float *out) {
    const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    for (int half = 0; half < 2; half++) { /* the low or the high 8 entries, chosen by the code's bit 3 */
        const __m256i idx = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(codes, 8) : codes);
        const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        _mm256_storeu_ps(out + 8 * half, _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx),
                                                          _mm256_permutevar8x32_ps(high, idx), upper));
    }
}

/* dst[c * ldd + r] = src[r * lds + c] for r, c < 8 */
static inline void transpose(const float *src, int64_t lds, float *dst, int64_t ldd) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + i * ldd, t[i]);
}
#endif

/* out[(r - r0) * ld + c - c0] = W[r, c] for r in [r0, r1), c in [c0, c0 + width), width a multiple of 16 */
static void dequantize_rows(const weight_4bit *w, int64_t r0, int64_t r1, int64_t c0, int64_t width, float *out,
                            int64_t ld) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    float table[16];
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c0 + width; c += 16) {
            const int64_t at = r * w->k + c; /* 16 weights of one block (blocks: multiples of 32) */
            const float scale = block_scale(w, at / w->blocksize);
            for (int i = 0; i < 16; i++) table[i] = w->code[i] * scale; /* the reference's float32 products */
            /* byte j: column 2j in its high nibble, 2j + 1 in its low */
            const __m128i bytes = _mm_loadl_epi64((const __m128i *)(w->packed + at / 2));
            const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4), low = _mm_and_si128(bytes, low4);
            look_up16(_mm_unpacklo_epi8(high, low), table, out + (r - r0) * ld + (c - c0));
        }
}

/* A's rows m0 .. m0 + MR: in place, or (the last, short block) copied into pad with zero rows after */
static inline const float *rows_of(const float *a, int64_t m0, int64_t rows, int64_t width, float *pad) {
    if (rows == MR) return a + m0 * width;
    memcpy(pad, a + m0 * width, sizeof(float) * rows * width);
    memset(pad + rows * width, 0, sizeof(float) * (MR - rows) * width);
    return pad;
}

/* ``each`` floats for each of ``threads`` threads, 64-byte aligned (aligned_alloc wants whole multiples) */
static float *scratch_of(int64_t each, int threads) {
    const size_t bytes = sizeof(float) * (size_t)each * (size_t)(threads > 0 ? threads : 1);
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

int fourbit_linear_4bit(const weight_4bit *w, const float *x, const float *bias, float *y, int64_t m, int threads) {
    const int64_t n = w->n, k = w->k, panels = (n + NR - 1) / NR;
    const int64_t each = 2 * NR * k + MR * k; /* per thread: NR rows of W, their K x NR transpose, a short block of x */
    float *scratch = scratch_of(each, threads);
    if (!scratch) return 1;
#pragma omp parallel num_threads(threads)
    {
        float tile[MR * NR] __attribute__((aligned(64)));
        float *rows = scratch + omp_get_thread_num() * each, *panel = rows + NR * k, *pad = panel + NR * k;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t n0 = p * NR, width = n - n0 < NR ? n - n0 : NR;
            dequantize_rows(w, n0, n0 + width, 0, k, rows, k);
            memset(rows + width * k, 0, sizeof(float) * (NR - width) * k);
            for (int64_t r = 0; r < NR; r += T)
                for (int64_t c = 0; c < k; c += T) transpose(rows + r * k + c, k, panel + c * NR + r, NR);
            for (int64_t m0 = 0; m0 < m; m0 += MR) {
                const int64_t count = m - m0 < MR ? m - m0 : MR;
                block_product(k, rows_of(x, m0, count, k, pad), k, panel, tile);
                for (int64_t i = 0; i < count; i++) {
                    float *out = y + (m0 + i) * n + n0;
                    for (int64_t j = 0; j < width; j++)
                        out[j] = bias ? tile[i * NR + j] + bias[n0 + j] : tile[i * NR + j];
                }
            }
        }
    }
    free(scratch);
    return 0;
}

int fourbit_linear_4bit_grad(const weight_4bit *w, const float *g, float *dx, int64_t m, int threads) {
    const int64_t n = w->n, k = w->k, slabs = k / NR;
    const int64_t each = n * NR + MR * n; /* per thread: W[:, k0 .. k0 + NR), a short block of g */
    float *scratch = scratch_of(each, threads);
    if (!scratch) return 1;
#pragma omp parallel num_threads(threads)
    {
        float tile[MR * NR] __attribute__((aligned(64)));
        float *slab = scratch + omp_get_thread_num() * each, *pad = slab + n * NR;
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slabs; s++) {
            dequantize_rows(w, 0, n, s * NR, NR, slab, NR);
            for (int64_t m0 = 0; m0 < m; m0 += MR) {
                const int64_t count = m - m0 < MR ? m - m0 : MR;
                block_product(n, rows_of(g, m0, count, n, pad), n, slab, tile);
                for (int64_t i = 0; i < count; i++)
                    memcpy(dx + (m0 + i) * k + s * NR, tile + i * NR, sizeof(float) * NR);
            }
        }
    }
    free(scratch);
    return 0;
}

#else /* neither AVX-512 nor AVX2: the callers take dequantize + matmul */

int fourbit_gemm_4bit_built(void) { return 0; }

int fourbit_linear_4bit(const weight_4bit *w, const float *x, const float *bias, float *y, int64_t m, int threads) {
    (void)w, (void)x, (void)bias, (void)y, (void)m, (void)threads;
    return -1;
}

int fourbit_linear_4bit_grad(const weight_4bit *w, const float *g, float *dx, int64_t m, int threads) {
    (void)w, (void)g, (void)dx, (void)m, (void)threads;
    return -1;
}

#endif
