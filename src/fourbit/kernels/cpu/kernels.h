/* What the C files of this library call across files: the prepared 4-bit weight (native.c's
   matmul and dequantization and gemm_4bit.c's products take it; kernels/cpu/native.py fills it
   once per layer, field for field), its blocks' scales, and the kernels decode_layer.c strings
   together. Each function's contract is at its
   definition. */
#ifndef FOURBIT_KERNELS_H
#define FOURBIT_KERNELS_H

#include <stdint.h>

typedef struct weight_4bit {
    const uint8_t *packed;      /* N * K / 2 bytes */
    const float *absmax;        /* [N * K / bs] float32, when not double-quantized */
    const uint8_t *absmax8;     /* [N * K / bs] 8-bit codes, when double-quantized */
    const float *nested_code;   /* 256 values */
    const float *nested_absmax; /* one per nested_blocksize blocks */
    float offset;
    int nested_shift; /* log2 of the nested block size (a power of two; 256 in the format) */
    const float *code;          /* the 16 values of the 4-bit data type */
    int64_t n, k, blocksize;
} weight_4bit;

/* The scale of block ``block`` of w (its absmax; double quantization: decoded from 8 bits) */
static inline float block_scale(const weight_4bit *w, int64_t block) {
    if (w->absmax8)
        return w->nested_code[w->absmax8[block]] * w->nested_absmax[(uint64_t)block >> w->nested_shift] + w->offset;
    return w->absmax[block];
}

/* native.c */
int fourbit_matmul_4bit_many(const weight_4bit *const *weights, int count, const void *x, void *y, int bf16, int64_t m,
                             int threads);
/* decode.c */
void fourbit_rms_norm(const void *x, const void *w, void *y, int64_t rows, int64_t n, float eps, int bf16);
void fourbit_rotate(void *q, void *k, const void *cos, const void *sin, int64_t rows, int64_t q_heads,
                    int64_t k_heads, int64_t d, int bf16);
int fourbit_decode_attention(const void *q, const void *keys, const void *values, const int64_t *mask, void *out,
                             int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t length, int64_t d,
                             int64_t k_row, int64_t k_head, int64_t k_pos, int64_t v_row, int64_t v_head,
                             int64_t v_pos, float scale, int bf16, int threads);

#endif
