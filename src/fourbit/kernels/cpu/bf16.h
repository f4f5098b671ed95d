/* bfloat16 <-> float32, as torch converts: widening is exact; narrowing rounds to nearest, ties
   to even, and keeps NaN a NaN. Shared by native.c and decode.c. */
#ifndef FOURBIT_BF16_H
#define FOURBIT_BF16_H

#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

#endif
