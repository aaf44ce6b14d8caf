/* moonshard kernels: the element math of the shared kernels/ headers under one name for
 * float and double, so templated kernels pick the precision by overloading. Device only. */
#ifndef MS_KERNELS_MATH_CUH
#define MS_KERNELS_MATH_CUH

#include "activation.h"

#define MS_CU_OVERLOAD1(NAME)                                                       \
    __device__ __forceinline__ float NAME(float x) { return ms_k_##NAME##_f32(x); } \
    __device__ __forceinline__ double NAME(double x) { return ms_k_##NAME##_f64(x); }
#define MS_CU_OVERLOAD2(NAME)                                                       \
    __device__ __forceinline__ float NAME(float x, float dy)                        \
    {                                                                               \
        return ms_k_##NAME##_f32(x, dy);                                            \
    }                                                                               \
    __device__ __forceinline__ double NAME(double x, double dy)                     \
    {                                                                               \
        return ms_k_##NAME##_f64(x, dy);                                            \
    }

namespace ms_cu {
MS_CU_OVERLOAD1(relu)
MS_CU_OVERLOAD1(sigmoid)
MS_CU_OVERLOAD1(tanh)
MS_CU_OVERLOAD1(gelu)
MS_CU_OVERLOAD1(gelu_tanh)
MS_CU_OVERLOAD2(relu_backward)
MS_CU_OVERLOAD2(sigmoid_backward)
MS_CU_OVERLOAD2(tanh_backward)
MS_CU_OVERLOAD2(gelu_backward)
MS_CU_OVERLOAD2(gelu_tanh_backward)
} // namespace ms_cu

#endif
