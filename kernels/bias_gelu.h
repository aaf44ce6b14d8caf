/* moonshard kernels: the element math of the fused bias + GELU after a bias-free GEMM, shared
 * by the CPU loops and the CUDA kernels. acc is one element of x W^T, bias its column's bias;
 * z = acc + bias is not stored. tanh_approx selects approximate='tanh'. Same formulas as
 * activation.h's gelu and gelu_tanh and their derivatives. */
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

/* gelu(acc + bias), and *derivative = gelu'(acc + bias), which the backward's d(acc) is dy
 * times (the exact GELU's share Phi). */
MS_HD float ms_k_bias_gelu_and_derivative_f32(float acc, float bias, int tanh_approx,
                                              float *derivative)
{
    float z = acc + bias;
    if (tanh_approx) {
        *derivative = ms_k_gelu_tanh_derivative_f32(z);
        return ms_k_gelu_tanh_f32(z);
    }
    return ms_k_gelu_and_derivative_f32(z, derivative);
}
MS_HD double ms_k_bias_gelu_and_derivative_f64(double acc, double bias, int tanh_approx,
                                               double *derivative)
{
    double z = acc + bias;
    if (tanh_approx) {
        *derivative = ms_k_gelu_tanh_derivative_f64(z);
        return ms_k_gelu_tanh_f64(z);
    }
    return ms_k_gelu_and_derivative_f64(z, derivative);
}

#endif
