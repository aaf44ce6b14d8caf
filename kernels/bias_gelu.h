/* moonshard kernels: the element math of the fused bias + GELU after a bias-free GEMM, shared
 * by the CPU loops and the CUDA kernels. acc is one element of x W^T, bias its column's bias;
 * z = acc + bias is not stored (backward recomputes it from acc). tanh_approx selects
 * approximate='tanh'. Same formulas as activation.h's gelu and gelu_tanh. */
#ifndef MS_KERNELS_BIAS_GELU_H
#define MS_KERNELS_BIAS_GELU_H

#include "activation.h"

/* gelu(acc + bias) */
MS_HD float ms_k_bias_gelu_f32(float acc, float bias, int tanh_approx)
{
    float z = acc + bias;
    return tanh_approx ? ms_k_gelu_tanh_f32(z) : ms_k_gelu_f32(z);
}
MS_HD double ms_k_bias_gelu_f64(double acc, double bias, int tanh_approx)
{
    double z = acc + bias;
    return tanh_approx ? ms_k_gelu_tanh_f64(z) : ms_k_gelu_f64(z);
}

/* dy * gelu'(acc + bias): the gradient of acc, and this element's share of bias's. */
MS_HD float ms_k_bias_gelu_backward_f32(float acc, float bias, float dy, int tanh_approx)
{
    float z = acc + bias;
    return tanh_approx ? ms_k_gelu_tanh_backward_f32(z, dy) : ms_k_gelu_backward_f32(z, dy);
}
MS_HD double ms_k_bias_gelu_backward_f64(double acc, double bias, double dy, int tanh_approx)
{
    double z = acc + bias;
    return tanh_approx ? ms_k_gelu_tanh_backward_f64(z, dy) : ms_k_gelu_backward_f64(z, dy);
}

#endif
