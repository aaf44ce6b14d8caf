/* moonshard kernels: what every element-math header shares (MS_HD and bit casts).
 * The headers in kernels/ compile as C11 (static inline) and under nvcc (__host__ __device__). */
#ifndef MS_KERNELS_COMMON_H
#define MS_KERNELS_COMMON_H

#include <stdint.h>
#include <math.h>

#ifdef __CUDACC__
#define MS_HD static __host__ __device__ __forceinline__
#else
#define MS_HD static inline
#endif

/* Bit casts without aliasing violations: memcpy-free unions are valid C and nvcc accepts
 * them; CUDA device code gets the intrinsics. */
MS_HD uint32_t ms_k_f32_bits(float value)
{
#ifdef __CUDA_ARCH__
    return __float_as_uint(value);
#else
    union { float f; uint32_t u; } pun;
    pun.f = value;
    return pun.u;
#endif
}

MS_HD float ms_k_bits_f32(uint32_t bits)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    union { float f; uint32_t u; } pun;
    pun.u = bits;
    return pun.f;
#endif
}

MS_HD uint64_t ms_k_f64_bits(double value)
{
#ifdef __CUDA_ARCH__
    return (uint64_t)__double_as_longlong(value);
#else
    union { double f; uint64_t u; } pun;
    pun.f = value;
    return pun.u;
#endif
}

#define MS_K_PI 3.14159265358979323846
#define MS_K_SQRT1_2 0.70710678118654752440
#define MS_K_INV_SQRT_2PI 0.39894228040143267794 /* 1 / sqrt(2 pi) */
#define MS_K_SQRT_2_OVER_PI 0.79788456080286535588
#define MS_K_GELU_KAPPA 0.044715

#endif
