/* moonshard kernels: loading any dtype as double or int64 and storing back on the device,
 * with the CPU backend's conversion rules (runtime/cast.h): float to integer saturates
 * and sends NaN to 0, integer to narrower integer wraps; typed 16-bit access for templated
 * kernels. Device code only. */
#ifndef MS_KERNELS_VALUE_CUH
#define MS_KERNELS_VALUE_CUH

#include "convert.h"
#include "launch.cuh"

/* ms_dtype values (ms.h), repeated so device code needs no runtime header. */
enum { MS_CU_F32 = 0, MS_CU_F64, MS_CU_BF16, MS_CU_F16, MS_CU_I32, MS_CU_I64, MS_CU_U8 };

typedef struct ms_cu_value {
    int is_int;
    double f;
    int64_t i;
} ms_cu_value;

__device__ __forceinline__ ms_cu_value ms_cu_load(int dtype, const void *p)
{
    ms_cu_value v = {0, 0.0, 0};
    switch (dtype) {
    case MS_CU_F32: v.f = *(const float *)p; break;
    case MS_CU_F64: v.f = *(const double *)p; break;
    case MS_CU_BF16: v.f = ms_k_bf16_to_f32(*(const uint16_t *)p); break;
    case MS_CU_F16: v.f = ms_k_f16_to_f32(*(const uint16_t *)p); break;
    case MS_CU_I32: v.is_int = 1; v.i = *(const int32_t *)p; break;
    case MS_CU_I64: v.is_int = 1; v.i = *(const int64_t *)p; break;
    default: v.is_int = 1; v.i = *(const uint8_t *)p; break;
    }
    return v;
}

__device__ __forceinline__ double ms_cu_as_double(ms_cu_value v)
{
    return v.is_int ? (double)v.i : v.f;
}

__device__ __forceinline__ int64_t ms_cu_saturate(double v, double low, double high,
                                                   int64_t low_int, int64_t high_int)
{
    if (v != v)
        return 0;
    if (v >= high)
        return high_int;
    if (v <= low)
        return low_int;
    return (int64_t)v;
}

__device__ __forceinline__ void ms_cu_store(int dtype, void *p, ms_cu_value v)
{
    double f = ms_cu_as_double(v);
    switch (dtype) {
    case MS_CU_F32: *(float *)p = (float)f; break;
    case MS_CU_F64: *(double *)p = f; break;
    case MS_CU_BF16: *(uint16_t *)p = ms_k_f32_to_bf16((float)f); break;
    case MS_CU_F16: *(uint16_t *)p = ms_k_f32_to_f16((float)f); break;
    case MS_CU_I32:
        *(int32_t *)p = v.is_int ? (int32_t)(uint32_t)v.i
                                 : (int32_t)ms_cu_saturate(f, -2147483648.0, 2147483647.0,
                                                           INT32_MIN, INT32_MAX);
        break;
    case MS_CU_I64:
        *(int64_t *)p = v.is_int ? v.i
                                 : ms_cu_saturate(f, -9223372036854775808.0,
                                                  9223372036854775808.0, INT64_MIN, INT64_MAX);
        break;
    default:
        *(uint8_t *)p = v.is_int ? (uint8_t)v.i
                                 : (uint8_t)ms_cu_saturate(f, 0.0, 255.0, 0, 255);
        break;
    }
}

/* ---- typed access for templated kernels: bf16 and f16 live as 16 bits in memory and as
 * f32 in registers (one rounding, to nearest even, at the store) ---- */
struct ms_cu_bf16 {
    uint16_t bits;
};
struct ms_cu_f16 {
    uint16_t bits;
};

/* The type a kernel computes in for elements stored as S. */
template <typename S> struct ms_cu_math {
    typedef S type;
};
template <> struct ms_cu_math<ms_cu_bf16> {
    typedef float type;
};
template <> struct ms_cu_math<ms_cu_f16> {
    typedef float type;
};

__device__ __forceinline__ float ms_cu_widen(ms_cu_bf16 v) { return ms_k_bf16_to_f32(v.bits); }
__device__ __forceinline__ float ms_cu_widen(ms_cu_f16 v) { return ms_k_f16_to_f32(v.bits); }
template <typename T> __device__ __forceinline__ T ms_cu_widen(T v) { return v; }

__device__ __forceinline__ void ms_cu_narrow(ms_cu_bf16 *p, float v)
{
    p->bits = ms_k_f32_to_bf16(v);
}
__device__ __forceinline__ void ms_cu_narrow(ms_cu_f16 *p, float v)
{
    p->bits = ms_k_f32_to_f16(v);
}
template <typename T> __device__ __forceinline__ void ms_cu_narrow(T *p, T v) { *p = v; }

/* Element index of data, stored as S, in S's compute type; and the store back. */
template <typename S>
__device__ __forceinline__ typename ms_cu_math<S>::type ms_cu_get(const void *data, int64_t index)
{
    return ms_cu_widen(((const S *)data)[index]);
}
template <typename S>
__device__ __forceinline__ void ms_cu_set(void *data, int64_t index, typename ms_cu_math<S>::type v)
{
    ms_cu_narrow(&((S *)data)[index], v);
}

/* One launch of KERNEL<S> (<<<blocks, threads, 0, stream>>>) with S the storage type of the
 * float dtype (f32, f64, bf16, f16). */
#define MS_CU_LAUNCH_FLOAT(dtype, KERNEL, blocks, threads, stream, ...)                         \
    switch (dtype) {                                                                        \
    case MS_CU_F32: KERNEL<float><<<blocks, threads, 0, stream>>>(__VA_ARGS__); break;       \
    case MS_CU_BF16: KERNEL<ms_cu_bf16><<<blocks, threads, 0, stream>>>(__VA_ARGS__); break; \
    case MS_CU_F16: KERNEL<ms_cu_f16><<<blocks, threads, 0, stream>>>(__VA_ARGS__); break;   \
    default: KERNEL<double><<<blocks, threads, 0, stream>>>(__VA_ARGS__); break;             \
    }

__device__ __forceinline__ int ms_cu_dtype_size(int dtype)
{
    return dtype == MS_CU_F64 || dtype == MS_CU_I64 ? 8
           : dtype == MS_CU_U8                      ? 1
           : dtype == MS_CU_BF16 || dtype == MS_CU_F16 ? 2
                                                       : 4;
}

#endif
