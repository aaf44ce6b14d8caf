/* moonshard runtime: loading any dtype as double or int64 and storing back (one element), for
 * the backends' copy conversions, fill and arange (not exported). */
#ifndef MS_CAST_H
#define MS_CAST_H

#include <stdint.h>

#include "convert.h"

/* Float to integer conversions saturate and send NaN to 0: C leaves out-of-range
 * conversions undefined, and a copy must not trap on odd data. */
static inline int64_t ms_sat_i64(double v)
{
    if (v != v)
        return 0;
    if (v >= 9223372036854775808.0)
        return INT64_MAX;
    if (v <= -9223372036854775808.0)
        return INT64_MIN;
    return (int64_t)v;
}

static inline int32_t ms_sat_i32(double v)
{
    if (v != v)
        return 0;
    if (v >= 2147483647.0)
        return INT32_MAX;
    if (v <= -2147483648.0)
        return INT32_MIN;
    return (int32_t)v;
}

static inline uint8_t ms_sat_u8(double v)
{
    if (v != v || v <= 0.0)
        return 0;
    if (v >= 255.0)
        return 255;
    return (uint8_t)v;
}

/* Integer to narrower integer wraps (two's complement), as C casts and PyTorch do. */
#define MS_CAST_LOAD_F32(x) ((double)(x))
#define MS_CAST_LOAD_F64(x) ((double)(x))
#define MS_CAST_LOAD_BF16(x) ((double)ms_k_bf16_to_f32(x))
#define MS_CAST_LOAD_F16(x) ((double)ms_k_f16_to_f32(x))
#define MS_CAST_LOAD_I32(x) ((int64_t)(x))
#define MS_CAST_LOAD_I64(x) ((int64_t)(x))
#define MS_CAST_LOAD_U8(x) ((int64_t)(x))

/* Stores take a loaded double or int64_t; _Generic picks the rule for each. */
#define MS_CAST_STORE_F32(v) ((float)(v))
#define MS_CAST_STORE_F64(v) ((double)(v))
#define MS_CAST_STORE_BF16(v) ms_k_f32_to_bf16((float)(v))
#define MS_CAST_STORE_F16(v) ms_k_f32_to_f16((float)(v))
#define MS_CAST_STORE_I32(v) \
    _Generic((v), double: ms_sat_i32((double)(v)), default: (int32_t)(uint32_t)(v))
#define MS_CAST_STORE_I64(v) \
    _Generic((v), double: ms_sat_i64((double)(v)), default: (int64_t)(v))
#define MS_CAST_STORE_U8(v) \
    _Generic((v), double: ms_sat_u8((double)(v)), default: (uint8_t)(v))

/* Write value converted to dtype into dst (one element). */
static inline void ms_store_double(int dtype, void *dst, double value)
{
    switch (dtype) {
    case MS_F32: *(float *)dst = MS_CAST_STORE_F32(value); break;
    case MS_F64: *(double *)dst = MS_CAST_STORE_F64(value); break;
    case MS_BF16: *(uint16_t *)dst = MS_CAST_STORE_BF16(value); break;
    case MS_F16: *(uint16_t *)dst = MS_CAST_STORE_F16(value); break;
    case MS_I32: *(int32_t *)dst = MS_CAST_STORE_I32(value); break;
    case MS_I64: *(int64_t *)dst = MS_CAST_STORE_I64(value); break;
    default: *(uint8_t *)dst = MS_CAST_STORE_U8(value); break;
    }
}

static inline void ms_store_int(int dtype, void *dst, int64_t value)
{
    switch (dtype) {
    case MS_F32: *(float *)dst = MS_CAST_STORE_F32(value); break;
    case MS_F64: *(double *)dst = MS_CAST_STORE_F64(value); break;
    case MS_BF16: *(uint16_t *)dst = MS_CAST_STORE_BF16(value); break;
    case MS_F16: *(uint16_t *)dst = MS_CAST_STORE_F16(value); break;
    case MS_I32: *(int32_t *)dst = MS_CAST_STORE_I32(value); break;
    case MS_I64: *(int64_t *)dst = MS_CAST_STORE_I64(value); break;
    default: *(uint8_t *)dst = MS_CAST_STORE_U8(value); break;
    }
}

/* Element as double (exact for every dtype but i64 beyond 2^53). */
static inline double ms_load_double(int dtype, const void *src)
{
    switch (dtype) {
    case MS_F32: return *(const float *)src;
    case MS_F64: return *(const double *)src;
    case MS_BF16: return ms_k_bf16_to_f32(*(const uint16_t *)src);
    case MS_F16: return ms_k_f16_to_f32(*(const uint16_t *)src);
    case MS_I32: return *(const int32_t *)src;
    case MS_I64: return (double)*(const int64_t *)src;
    default: return *(const uint8_t *)src;
    }
}

#endif
