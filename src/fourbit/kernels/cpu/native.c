/* CPU: y = x @ dequant(W4)^T for a few rows of x (decoding), reading the 4-bit codes once; the
   dequantization itself (fourbit_dequantize_4bit, after it); and y = x @ W^T for a dense W (or its
   exact 8-bit form) and a few rows of x (fourbit_matmul_dense, at the end of this file).

       W4: [N, K] packed row-major, byte j of row n holds W[n, 2j] (high nibble), W[n, 2j+1] (low)
       scale[n, b] = code8[absmax8[n, b]] * nested[(n K / bs + b) / nested_bs] + offset  (double quant)
                   = absmax[n, b]                                                      (otherwise)
       y[m, n]     = sum_b sum_{k in block b} (code4[W4[n, k]] * scale[n, b]) * x[m, k]

   Each block's 16-entry table is scaled once, so a lookup yields the weight itself,
   float32(code4 * scale) exactly as the reference dequantizes it. Two paths:
   - float32 (x float32, or bf16 widened exactly): the table in one AVX-512 register, or two AVX2
     registers blended on the code's fourth bit; 8 bytes of codes (16 weights) broadcast to every
     64-bit lane and shifted by 4 x lane put a code in each 32-bit lane's low bits (column_of_lane
     says which column), vpermps looks the 16 up, one FMA per row of x follows. Plain C without
     AVX2.
   - bf16 x on AVX512-BF16 (row_range_bf16): the weights rounded to bf16 as dequantizing to bf16
     rounds them, looked up 32 at a time with vpermw, multiplied by vdpbf16ps: the operands of
     the bf16 reference exactly.
   x is permuted once per call into the lanes' column order, so the codes are never reordered.
   Sums are float32 in another order than dequantize-then-matmul: y matches that reference to
   float32 rounding (then bf16 rounding, to nearest even, for a bf16 y), not bit for bit
   (tests/kernels/test_cpu_native.py). Rows of W are split between OpenMP threads; up to 8
   rows of x share each looked-up weight vector. Built at run time with the machine's own
   instruction set (-march=native), or with the one a test names; what the compiler was given
   decides the path (fourbit_isa says which).

   The caller (kernels/cpu/native.py) guarantees: blocksize a multiple of 32 dividing K, the
   nested block size a power of two, x contiguous [M, K] and y contiguous [M, N] of one dtype
   (float32 or bf16), every pointer valid. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_ROWS 8
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define PERMUTED_X 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define DOT_BF16 1 /* bf16 x through vdpbf16ps (row_range_bf16) */
#endif

/* In the float32 vector paths, lane L of a 16-value step holds nibble u = L / 2 + 8 (L % 2) of
   the step's 64-bit word (nibble u = bits 4u..4u+3: the low nibble of byte u / 2 when u is even,
   the high one when odd), i.e. the weight of column column_of_lane(L); x is permuted once per call
   into that order (while converted to float32), so the codes need no reordering at all. */
static inline int64_t column_of_lane(int lane) {
    int u = lane / 2 + 8 * (lane % 2);
    return 2 * (u / 2) + 1 - u % 2; /* byte j holds column 2j in its high nibble, 2j + 1 in its low */
}

/* weight_4bit, block_scale: kernels.h */

static inline int64_t load64(const uint8_t *at) { /* 8 bytes from any address (one unaligned load) */
    int64_t word;
    memcpy(&word, at, sizeof word);
    return word;
}

const char *fourbit_isa(void) {
#if defined(DOT_BF16)
    return "avx512-bf16";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}

/* Rows [n0, n1) of W against rows [0, rows) of x (rows <= MAX_ROWS; x and y already offset).
   Each block's 16 code values are scaled once (the table times the block's scale: float32(code4 *
   scale), the reference's dequantized weight), so a lookup yields the weight itself. ``chains``
   independent accumulators per row of x keep the FMAs from waiting on each other (one row of x
   alone would otherwise wait out the FMA latency every 16 weights). Always inlined with constant
   ``rows`` and ``chains`` (see row_range_of), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_range(const weight_4bit *w, const float *x, int64_t x_stride,
                                                            float *y, int64_t y_stride, const int rows,
                                                            const int chains, int64_t n0, int64_t n1) {
    const int64_t k = w->k, bs = w->blocksize, blocks = k / bs;
#if defined(__AVX512F__)
    const __m512 table = _mm512_loadu_ps(w->code);
    const __m512i shifts = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *codes = w->packed + n * (k / 2);
        __m512 acc[MAX_ROWS][4];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < chains; j++) acc[r][j] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(block_scale(w, n * blocks + b)));
            for (int64_t c = b * bs; c < (b + 1) * bs; c += 16 * chains) {
                for (int j = 0; j < chains; j++) {
                    /* the 8 bytes in every 64-bit lane, lane t shifted right by 4t: 32-bit lane 2t + h
                       then holds nibble t + 8h in its low 4 bits, all vpermps reads (column_of_lane) */
                    __m512i word = _mm512_set1_epi64(load64(codes + ((uint64_t)(c + 16 * j) >> 1)));
                    __m512 wv = _mm512_permutexvar_ps(_mm512_srlv_epi64(word, shifts), scaled);
                    for (int r = 0; r < rows; r++)
                        acc[r][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * x_stride + c + 16 * j), acc[r][j]);
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            for (int j = 1; j < chains; j++) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][j]);
            y[r * y_stride + n] = _mm512_reduce_add_ps(acc[r][0]);
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 table_lo = _mm256_loadu_ps(w->code), table_hi = _mm256_loadu_ps(w->code + 8);
    const __m256i shifts_lo = _mm256_set_epi64x(12, 8, 4, 0), shifts_hi = _mm256_set_epi64x(28, 24, 20, 16);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *codes = w->packed + n * (k / 2);
        __m256 acc[MAX_ROWS][4];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < chains; j++) acc[r][j] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const __m256 s = _mm256_set1_ps(block_scale(w, n * blocks + b));
            const __m256 lo = _mm256_mul_ps(table_lo, s), hi = _mm256_mul_ps(table_hi, s);
            for (int64_t c = b * bs; c < (b + 1) * bs; c += 16 * chains) {
                for (int j = 0; j < chains; j++) {
                    __m256i word = _mm256_set1_epi64x(load64(codes + ((uint64_t)(c + 16 * j) >> 1)));
                    for (int half = 0; half < 2; half++) {
                        /* as AVX-512's, in two halves: lanes 0-7 of column_of_lane, then 8-15 */
                        __m256i idx = _mm256_srlv_epi64(word, half ? shifts_hi : shifts_lo);
                        /* the code's bit 3, moved to the sign bit, picks the upper half of the table */
                        __m256 wv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                                     _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                        for (int r = 0; r < rows; r++)
                            acc[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * x_stride + c + 16 * j + 8 * half),
                                                        acc[r][j]);
                    }
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            for (int j = 1; j < chains; j++) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][j]);
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][0]), _mm256_extractf128_ps(acc[r][0], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            y[r * y_stride + n] = _mm_cvtss_f32(v);
        }
    }
#else
    (void)chains;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *codes = w->packed + n * (k / 2);
        float acc[MAX_ROWS] = {0};
        for (int64_t b = 0; b < blocks; b++) {
            float scaled[16];
            const float s = block_scale(w, n * blocks + b);
            for (int i = 0; i < 16; i++) scaled[i] = w->code[i] * s;
            for (int64_t c = b * bs; c < (b + 1) * bs; c += 2) {
                const uint8_t byte = codes[(uint64_t)c >> 1];
                for (int r = 0; r < rows; r++)
                    acc[r] += scaled[byte >> 4] * x[r * x_stride + c] + scaled[byte & 15] * x[r * x_stride + c + 1];
            }
        }
        for (int r = 0; r < rows; r++) y[r * y_stride + n] = acc[r];
    }
#endif
}

/* One row of x alone gets 4 chains (2 where a block holds only 32 values), 2 or 3 rows get 2,
   more rows are chains enough. */
static void row_range_of(const weight_4bit *w, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                         int rows, int64_t n0, int64_t n1) {
    const int four = w->blocksize % 64 == 0;
    switch (rows) {
    case 1:
        if (four) row_range(w, x, x_stride, y, y_stride, 1, 4, n0, n1);
        else row_range(w, x, x_stride, y, y_stride, 1, 2, n0, n1);
        break;
    case 2: row_range(w, x, x_stride, y, y_stride, 2, 2, n0, n1); break;
    case 3: row_range(w, x, x_stride, y, y_stride, 3, 2, n0, n1); break;
    case 4: row_range(w, x, x_stride, y, y_stride, 4, 1, n0, n1); break;
    case 5: row_range(w, x, x_stride, y, y_stride, 5, 1, n0, n1); break;
    case 6: row_range(w, x, x_stride, y, y_stride, 6, 1, n0, n1); break;
    case 7: row_range(w, x, x_stride, y, y_stride, 7, 1, n0, n1); break;
    default: row_range(w, x, x_stride, y, y_stride, MAX_ROWS, 1, n0, n1); break;
    }
}

#ifdef DOT_BF16
/* bfloat16 x on a CPU with AVX512-BF16: the lookup yields bf16 weights directly. Each block's 16
   scaled weights are rounded to bf16 (to nearest even, as dequantizing to bf16 rounds them) and
   held twice over in the 32 16-bit entries vpermw reads, which looks at 5 bits of each index;
   16 bytes of codes (32 weights) broadcast to the four 128-bit lanes and shifted per 16-bit lane
   by 4 x (lane / 8) put a code in the low 4 bits of each lane (column_of_bf16_lane), and vdpbf16ps
   multiplies the 32 weights with 32 bf16 values of x, adding pairs into 16 float32 sums: 3
   instructions a 32 weights to look up, one per row of x to multiply, the reference's bf16
   operands exactly (the sums float32, in another order). */

/* lane w of a 32-value step holds code t = w / 8 (bits 4t..4t+3) of the step's 16-bit word j = w % 8:
   byte 2j's low nibble (column 4j + 1), its high one (4j), byte 2j + 1's low (4j + 3), high (4j + 2) */
static inline int64_t column_of_bf16_lane(int lane) {
    static const int within[4] = {1, 0, 3, 2};
    return 4 * (lane % 8) + within[lane / 8];
}

static inline __attribute__((always_inline)) void row_range_bf16(const weight_4bit *w, const uint16_t *x,
                                                                 int64_t x_stride, float *y, int64_t y_stride,
                                                                 const int rows, const int chains, int64_t n0,
                                                                 int64_t n1) {
    const int64_t k = w->k, bs = w->blocksize, blocks = k / bs;
    const __m512 table = _mm512_loadu_ps(w->code);
    const __m512i shifts = _mm512_set_epi16(12, 12, 12, 12, 12, 12, 12, 12, 8, 8, 8, 8, 8, 8, 8, 8,
                                            4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *codes = w->packed + n * (k / 2);
        __m512 acc[MAX_ROWS][2];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < chains; j++) acc[r][j] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(table, _mm512_set1_ps(block_scale(w, n * blocks + b))));
            const __m512i scaled = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
            for (int64_t c = b * bs; c < (b + 1) * bs; c += 32 * chains) {
                for (int j = 0; j < chains; j++) {
                    __m512i word = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(codes + ((uint64_t)(c + 32 * j) >> 1))));
                    __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(_mm512_srlv_epi16(word, shifts), scaled);
                    for (int r = 0; r < rows; r++) {
                        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + r * x_stride + c + 32 * j));
                        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv);
                    }
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            if (chains > 1) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][1]);
            y[r * y_stride + n] = _mm512_reduce_add_ps(acc[r][0]);
        }
    }
}

static void row_range_bf16_of(const weight_4bit *w, const uint16_t *x, int64_t x_stride, float *y, int64_t y_stride,
                              int rows, int64_t n0, int64_t n1) {
    switch (rows) {
    case 1:
        if (w->blocksize % 64 == 0) row_range_bf16(w, x, x_stride, y, y_stride, 1, 2, n0, n1);
        else row_range_bf16(w, x, x_stride, y, y_stride, 1, 1, n0, n1);
        break;
    case 2: row_range_bf16(w, x, x_stride, y, y_stride, 2, 1, n0, n1); break;
    case 3: row_range_bf16(w, x, x_stride, y, y_stride, 3, 1, n0, n1); break;
    case 4: row_range_bf16(w, x, x_stride, y, y_stride, 4, 1, n0, n1); break;
    case 5: row_range_bf16(w, x, x_stride, y, y_stride, 5, 1, n0, n1); break;
    case 6: row_range_bf16(w, x, x_stride, y, y_stride, 6, 1, n0, n1); break;
    case 7: row_range_bf16(w, x, x_stride, y, y_stride, 7, 1, n0, n1); break;
    default: row_range_bf16(w, x, x_stride, y, y_stride, MAX_ROWS, 1, n0, n1); break;
    }
}
#endif

/* y = [x @ dequant(W_0)^T, x @ dequant(W_1)^T, ...] for weights that share x and k (a layer's q,
   k and v projections; its gate and up), as fourbit_matmul_4bit below computes each: one call,
   one permutation of x and one thread team instead of one per weight; y holds the products one
   after another, each [m, n_i] contiguous. Returns 0, or 1 when scratch memory could not be had. */
int fourbit_matmul_4bit_many(const weight_4bit *const *weights, int count, const void *x, void *y, int bf16, int64_t m,
                             int threads) {
    const int64_t k = weights[0]->k;
    int64_t total_n = 0, chunks = 0;
    const int64_t chunk = 16; /* a thread's rows of W stay together */
    for (int i = 0; i < count; i++) {
        total_n += weights[i]->n;
        chunks += (weights[i]->n + chunk - 1) / chunk;
    }
#ifdef DOT_BF16
    const int dot = bf16; /* bf16 x stays bf16, through vdpbf16ps */
#else
    const int dot = 0;
#endif
    /* x in the lanes' column order (float32, or bf16 for the dot path), once for every weight;
       y in float32 until the end */
    void *xs = malloc((size_t)(m * k) * (dot ? sizeof(uint16_t) : sizeof(float)));
    float *y32 = bf16 ? malloc((size_t)(m * total_n) * sizeof(float)) : y;
    if (!xs || !y32) {
        free(xs);
        if (bf16) free(y32);
        return 1;
    }
    if (dot) {
#ifdef DOT_BF16
        for (int64_t i = 0; i < m * k; i += 32) /* k is a multiple of the block size, so of 32 */
            for (int lane = 0; lane < 32; lane++)
                ((uint16_t *)xs)[i + lane] = ((const uint16_t *)x)[i + column_of_bf16_lane(lane)];
#endif
    } else {
        for (int64_t i = 0; i < m * k; i += 16)
            for (int lane = 0; lane < 16; lane++) {
#ifdef PERMUTED_X
                int64_t from = i + column_of_lane(lane);
#else
                int64_t from = i + lane;
#endif
                ((float *)xs)[i + lane] = bf16 ? from_bf16(((const uint16_t *)x)[from]) : ((const float *)x)[from];
            }
    }
    for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS) {
        int rows = (int)(m - m0 < MAX_ROWS ? m - m0 : MAX_ROWS);
#pragma omp parallel for schedule(static) num_threads(threads) /* one team for every weight's rows */
        for (int64_t c = 0; c < chunks; c++) {
            int64_t first = c, offset = 0; /* which weight chunk c falls in, and where its y starts */
            int i = 0;
            while (first >= (weights[i]->n + chunk - 1) / chunk) {
                first -= (weights[i]->n + chunk - 1) / chunk;
                offset += m * weights[i]->n;
                i++;
            }
            const weight_4bit *w = weights[i];
            const int64_t n = w->n, n1 = (first + 1) * chunk < n ? (first + 1) * chunk : n;
#ifdef DOT_BF16
            if (dot) {
                row_range_bf16_of(w, (const uint16_t *)xs + m0 * k, k, y32 + offset + m0 * n, n, rows, first * chunk, n1);
                continue;
            }
#endif
            row_range_of(w, (const float *)xs + m0 * k, k, y32 + offset + m0 * n, n, rows, first * chunk, n1);
        }
    }
    if (bf16) {
        for (int64_t i = 0; i < m * total_n; i++) ((uint16_t *)y)[i] = to_bf16(y32[i]);
        free(y32);
    }
    free(xs);
    return 0;
}

/* y [m, n] = x [m, k] @ dequant(W)^T, x and y both float32 (bf16 = 0) or both bfloat16 (bf16 = 1);
   W as the caller prepared it once (kernels/cpu/native.py's Weight4bit: a decoded token makes
   ~200 of these calls, so the fewer arguments converted per call the better); threads: OpenMP
   threads to use (>= 1). Returns 0, or 1 when scratch memory could not be had. */
int fourbit_matmul_4bit(const weight_4bit *weight, const void *x, void *y, int bf16, int64_t m, int threads) {
    return fourbit_matmul_4bit_many(&weight, 1, x, y, bf16, m, threads);
}

/* Dequantization, for the products that share one dense weight among many rows (prefill,
   training): out[v] = float32(code4[nibble v] * scale[v / bs]), then rounded to bf16 (to nearest
   even) for a bf16 out (bf16 = 1). The same two float32 roundings of the scale and the one of the
   product as the reference (quant/four_bit.py; built with -ffp-contract=off, so no FMA merges
   them): bit-identical to it. W: whole blocks of an even size. Blocks are split between
   OpenMP threads; each 16 values are unpacked in order (high nibble first), looked up in the
   block's scaled table and stored. */
static inline void store_bf16x16(uint16_t *to, const float *from) {
    for (int i = 0; i < 16; i++) to[i] = to_bf16(from[i]);
}

int fourbit_dequantize_4bit(const weight_4bit *weight, void *out, int bf16, int threads) {
    const weight_4bit w = *weight;
    const int64_t blocksize = w.blocksize, blocks = w.n * w.k / blocksize;
    const uint8_t *packed = w.packed;
    const float *code = w.code;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const float s = block_scale(&w, b);
        float scaled[16];
        for (int i = 0; i < 16; i++) scaled[i] = code[i] * s;
        float *out32 = (float *)out + b * blocksize;
        uint16_t *out16 = (uint16_t *)out + b * blocksize;
        const uint8_t *codes = packed + b * blocksize / 2;
#if defined(__AVX512F__)
        const __m512 table = _mm512_loadu_ps(scaled);
        const __m128i low4 = _mm_set1_epi8(0x0F);
        for (int64_t c = 0; c < blocksize; c += 16) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(codes + c / 2));
            __m128i in_order = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
            __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(in_order), table);
            if (!bf16) {
                _mm512_storeu_ps(out32 + c, v);
            } else {
#ifdef DOT_BF16
                _mm256_storeu_si256((__m256i *)(out16 + c), (__m256i)_mm512_cvtneps_pbh(v));
#else
                float tmp[16];
                _mm512_storeu_ps(tmp, v);
                store_bf16x16(out16 + c, tmp);
#endif
            }
        }
#elif defined(__AVX2__) && defined(__FMA__)
        const __m256 lo = _mm256_loadu_ps(scaled), hi = _mm256_loadu_ps(scaled + 8);
        const __m128i low4 = _mm_set1_epi8(0x0F);
        for (int64_t c = 0; c < blocksize; c += 16) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(codes + c / 2));
            __m128i in_order = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
            float tmp[16];
            for (int half = 0; half < 2; half++) {
                __m256i idx = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(in_order, 8) : in_order);
                __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                _mm256_storeu_ps(bf16 ? tmp + 8 * half : out32 + c + 8 * half, v);
            }
            if (bf16) store_bf16x16(out16 + c, tmp);
        }
#else
        for (int64_t c = 0; c < blocksize; c += 2) {
            const uint8_t byte = codes[c / 2];
            if (bf16) {
                out16[c] = to_bf16(scaled[byte >> 4]);
                out16[c + 1] = to_bf16(scaled[byte & 15]);
            } else {
                out32[c] = scaled[byte >> 4];
                out32[c + 1] = scaled[byte & 15];
            }
        }
#endif
    }
    return 0;
}

/* Dense products for a few rows (decoding through a 16-bit layer: the tied output head, 49152 x 576
   in SmolLM2): y [m, n] = x [m, k] @ W^T, W [n, k] row-major, float32 sums rounded to y's dtype at
   the end. oneDNN reorders W at every call (F.linear), which at one row costs as much as reading
   it; this reads W once, in place, MAX_ROWS rows of x sharing each load. W comes in one of three
   forms (``format``):
     DENSE_F32   float32, x float32: float32 FMAs
     DENSE_BF16  bf16, x bf16: vdpbf16ps on AVX512-BF16, else float32 FMAs (both widened exactly)
     DENSE_Q8    W[n, c] = code[n, c] * scale[n, c / 32], int8 codes and float32 scales, x float32,
                 k a multiple of 32: a float32 weight whose values are exactly such products (the
                 head of a model read from a Q8_0 GGUF tensor) read at a quarter of the bytes.
                 Each weight is formed in a register as float32(code) * scale (one float32
                 multiply), then the same FMAs in the same order as DENSE_F32: y is bit-identical
                 to DENSE_F32's on the weight whose values are those products (the caller checks
                 that they are its weight's values: quant/q8_blocks.py).
   Plain C without AVX2. */
enum { DENSE_F32 = 0, DENSE_BF16 = 1, DENSE_Q8 = 2 };

static inline __attribute__((always_inline)) void dense_rows(const void *wt, const float *scales, const void *x,
                                                             float *y, const int format, const int rows, int64_t n,
                                                             int64_t k, int64_t row) {
    const int bf16 = format == DENSE_BF16;
    const int8_t *codes = (const int8_t *)wt + row * k;
    const float *row_scales = scales ? scales + row * (k / 32) : NULL;
    float acc[MAX_ROWS] = {0};
    int64_t c = 0;
#if defined(DOT_BF16)
    if (bf16) { /* two chains of vdpbf16ps per row of x, so one row does not wait out their latency */
        const uint16_t *w = (const uint16_t *)wt + row * k, *xs = x;
        __m512 sum[MAX_ROWS][2];
        for (int r = 0; r < rows; r++) sum[r][0] = sum[r][1] = _mm512_setzero_ps();
        for (; c + 64 <= k; c += 64)
            for (int j = 0; j < 2; j++) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + c + 32 * j));
                for (int r = 0; r < rows; r++)
                    sum[r][j] = _mm512_dpbf16_ps(sum[r][j], wv, (__m512bh)_mm512_loadu_si512((const void *)(xs + r * k + c + 32 * j)));
            }
        for (; c < k; c += 32) {
            const __mmask32 mask = k - c >= 32 ? 0xFFFFFFFFu : (1u << (k - c)) - 1;
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c);
            for (int r = 0; r < rows; r++)
                sum[r][0] = _mm512_dpbf16_ps(sum[r][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, xs + r * k + c));
        }
        for (int r = 0; r < rows; r++) y[r * n + row] = _mm512_reduce_add_ps(_mm512_add_ps(sum[r][0], sum[r][1]));
        return;
    }
#endif
#if defined(__AVX512F__)
    __m512 sum[MAX_ROWS];
    for (int r = 0; r < rows; r++) sum[r] = _mm512_setzero_ps();
    for (; c < k; c += 16) {
        const __mmask16 mask = k - c >= 16 ? 0xFFFF : (__mmask16)((1u << (k - c)) - 1);
        __m512 wv;
        if (format == DENSE_Q8) /* k % 32 == 0: never a partial step */
            wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + c)))),
                               _mm512_set1_ps(row_scales[c / 32]));
        else
            wv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                            _mm256_maskz_loadu_epi16(mask, (const uint16_t *)wt + row * k + c)), 16))
                      : _mm512_maskz_loadu_ps(mask, (const float *)wt + row * k + c);
        for (int r = 0; r < rows; r++) {
            __m512 xv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                   _mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + r * k + c)), 16))
                             : _mm512_maskz_loadu_ps(mask, (const float *)x + r * k + c);
            sum[r] = _mm512_fmadd_ps(wv, xv, sum[r]);
        }
    }
    for (int r = 0; r < rows; r++) acc[r] = _mm512_reduce_add_ps(sum[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 sum[MAX_ROWS];
    for (int r = 0; r < rows; r++) sum[r] = _mm256_setzero_ps();
    for (; c + 8 <= k; c += 8) {
        __m256 wv;
        if (format == DENSE_Q8)
            wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(codes + c)))),
                               _mm256_set1_ps(row_scales[c / 32]));
        else
            wv = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                            _mm_loadu_si128((const __m128i *)((const uint16_t *)wt + row * k + c))), 16))
                      : _mm256_loadu_ps((const float *)wt + row * k + c);
        for (int r = 0; r < rows; r++) {
            __m256 xv = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                                   _mm_loadu_si128((const __m128i *)((const uint16_t *)x + r * k + c))), 16))
                             : _mm256_loadu_ps((const float *)x + r * k + c);
            sum[r] = _mm256_fmadd_ps(wv, xv, sum[r]);
        }
    }
    for (int r = 0; r < rows; r++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, sum[r]);
        for (int i = 0; i < 8; i++) acc[r] += lanes[i];
    }
#endif
    for (; c < k; c++) { /* what the vector loops left (all of it in plain C) */
        float wv = format == DENSE_Q8 ? (float)codes[c] * row_scales[c / 32]
                   : bf16            ? from_bf16(((const uint16_t *)wt)[row * k + c])
                                     : ((const float *)wt)[row * k + c];
        for (int r = 0; r < rows; r++)
            acc[r] += wv * (bf16 ? from_bf16(((const uint16_t *)x)[r * k + c]) : ((const float *)x)[r * k + c]);
    }
    for (int r = 0; r < rows; r++) y[r * n + row] = acc[r];
}

/* rows and format constants in each call, so the sums stay in registers and the format's branch
   leaves the loop */
#define DENSE_ROWS_OF(format)                                                                                   \
    switch (rows) {                                                                                             \
    case 1: dense_rows(w, scales, x, y, format, 1, n, k, row); break;                                          \
    case 2: dense_rows(w, scales, x, y, format, 2, n, k, row); break;                                          \
    case 3: dense_rows(w, scales, x, y, format, 3, n, k, row); break;                                          \
    case 4: dense_rows(w, scales, x, y, format, 4, n, k, row); break;                                          \
    case 5: dense_rows(w, scales, x, y, format, 5, n, k, row); break;                                          \
    case 6: dense_rows(w, scales, x, y, format, 6, n, k, row); break;                                          \
    case 7: dense_rows(w, scales, x, y, format, 7, n, k, row); break;                                          \
    default: dense_rows(w, scales, x, y, format, MAX_ROWS, n, k, row); break;                                  \
    }

static void dense_rows_of(const void *w, const float *scales, const void *x, float *y, int format, int rows,
                          int64_t n, int64_t k, int64_t row) {
    switch (format) {
    case DENSE_BF16: DENSE_ROWS_OF(DENSE_BF16) break;
    case DENSE_Q8: DENSE_ROWS_OF(DENSE_Q8) break;
    default: DENSE_ROWS_OF(DENSE_F32) break;
    }
}

/* y [m, n] = x [m, k] @ W^T, W [n, k] in ``format`` (above): x and y float32, W float32 or codes and
   scales (DENSE_F32, DENSE_Q8; ``scales`` NULL but for DENSE_Q8), or all bfloat16 (DENSE_BF16).
   Returns 0, or 1 when scratch memory could not be had. */
int fourbit_matmul_dense(const void *w, const float *scales, const void *x, void *y, int format, int64_t m,
                         int64_t n, int64_t k, int threads) {
    const int bf16 = format == DENSE_BF16;
    float *y32 = bf16 ? malloc((size_t)(m * n) * sizeof(float)) : y;
    if (!y32) return 1;
    const int elem = bf16 ? 2 : 4;
    for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS) {
        const int rows = (int)(m - m0 < MAX_ROWS ? m - m0 : MAX_ROWS);
        const char *xs = (const char *)x + m0 * k * elem;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t row = 0; row < n; row++) dense_rows_of(w, scales, xs, y32 + m0 * n, format, rows, n, k, row);
    }
    if (bf16) {
        for (int64_t i = 0; i < m * n; i++) ((uint16_t *)y)[i] = to_bf16(y32[i]);
        free(y32);
    }
    return 0;
}
