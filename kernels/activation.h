/* moonshard kernels: activations and their derivatives, f32 and f64.
 * Backward functions take the forward input x and return dy * f'(x) (PyTorch's formulas). */
#ifndef MS_KERNELS_ACTIVATION_H
#define MS_KERNELS_ACTIVATION_H

#include "common.h"
#include "fastmath.h"

/* relu keeps NaN (PyTorch's clamp_min propagates it). */
MS_HD float ms_k_relu_f32(float x) { return (x > 0.0f || x != x) ? x : 0.0f; }
MS_HD double ms_k_relu_f64(double x) { return (x > 0.0 || x != x) ? x : 0.0; }
MS_HD float ms_k_relu_backward_f32(float x, float dy) { return x > 0.0f ? dy : 0.0f; }
MS_HD double ms_k_relu_backward_f64(double x, double dy) { return x > 0.0 ? dy : 0.0; }

MS_HD float ms_k_sigmoid_f32(float x) { return 1.0f / (1.0f + ms_k_expf(-x)); }
MS_HD double ms_k_sigmoid_f64(double x) { return 1.0 / (1.0 + exp(-x)); }
MS_HD float ms_k_sigmoid_backward_f32(float x, float dy)
{
    float s = ms_k_sigmoid_f32(x);
    return dy * s * (1.0f - s);
}
MS_HD double ms_k_sigmoid_backward_f64(double x, double dy)
{
    double s = ms_k_sigmoid_f64(x);
    return dy * s * (1.0 - s);
}

MS_HD float ms_k_tanh_f32(float x) { return tanhf(x); }
MS_HD double ms_k_tanh_f64(double x) { return tanh(x); }
MS_HD float ms_k_tanh_backward_f32(float x, float dy)
{
    float t = tanhf(x);
    return dy * (1.0f - t * t);
}
MS_HD double ms_k_tanh_backward_f64(double x, double dy)
{
    double t = tanh(x);
    return dy * (1.0 - t * t);
}

/* gelu(x) = x * Phi(x) with the exact normal CDF (f32 through fastmath.h, so the loops
 * vectorise; f64 through libm). */
MS_HD float ms_k_gelu_f32(float x) { return x * ms_k_normal_cdf_f32(x); }
MS_HD double ms_k_gelu_f64(double x) { return 0.5 * x * (1.0 + erf(x * MS_K_SQRT1_2)); }
/* gelu(x), and *derivative = gelu'(x) = Phi(x) + x phi(x), sharing Phi(x). */
MS_HD float ms_k_gelu_and_derivative_f32(float x, float *derivative)
{
    float e = ms_k_expf(-0.5f * x * x);
    float cdf = ms_k_normal_cdf_given_f32(x, e);
    float pdf = e * (float)MS_K_INV_SQRT_2PI;
    *derivative = cdf + x * pdf;
    return x * cdf;
}
MS_HD double ms_k_gelu_and_derivative_f64(double x, double *derivative)
{
    double e = erf(x * MS_K_SQRT1_2);
    double pdf = exp(-0.5 * x * x) * MS_K_INV_SQRT_2PI;
    *derivative = 0.5 * (1.0 + e) + x * pdf;
    return 0.5 * x * (1.0 + e);
}
MS_HD float ms_k_gelu_derivative_f32(float x)
{
    float derivative;
    ms_k_gelu_and_derivative_f32(x, &derivative);
    return derivative;
}
MS_HD double ms_k_gelu_derivative_f64(double x)
{
    double derivative;
    ms_k_gelu_and_derivative_f64(x, &derivative);
    return derivative;
}
MS_HD float ms_k_gelu_backward_f32(float x, float dy) { return dy * ms_k_gelu_derivative_f32(x); }
MS_HD double ms_k_gelu_backward_f64(double x, double dy)
{
    return dy * ms_k_gelu_derivative_f64(x);
}

/* gelu with the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
MS_HD float ms_k_gelu_tanh_f32(float x)
{
    float inner = (float)MS_K_SQRT_2_OVER_PI * (x + (float)MS_K_GELU_KAPPA * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}
MS_HD double ms_k_gelu_tanh_f64(double x)
{
    double inner = MS_K_SQRT_2_OVER_PI * (x + MS_K_GELU_KAPPA * x * x * x);
    return 0.5 * x * (1.0 + tanh(inner));
}
MS_HD float ms_k_gelu_tanh_derivative_f32(float x)
{
    const float beta = (float)MS_K_SQRT_2_OVER_PI, kappa = (float)MS_K_GELU_KAPPA;
    float x_sq = x * x;
    float t = tanhf(beta * (x + kappa * x_sq * x));
    float left_derivative = 0.5f * (1.0f + t);
    float right_derivative = 0.5f * x * (1.0f - t * t) * beta * (1.0f + 3.0f * kappa * x_sq);
    return left_derivative + right_derivative;
}
MS_HD double ms_k_gelu_tanh_derivative_f64(double x)
{
    const double beta = MS_K_SQRT_2_OVER_PI, kappa = MS_K_GELU_KAPPA;
    double x_sq = x * x;
    double t = tanh(beta * (x + kappa * x_sq * x));
    double left_derivative = 0.5 * (1.0 + t);
    double right_derivative = 0.5 * x * (1.0 - t * t) * beta * (1.0 + 3.0 * kappa * x_sq);
    return left_derivative + right_derivative;
}
MS_HD float ms_k_gelu_tanh_backward_f32(float x, float dy)
{
    return dy * ms_k_gelu_tanh_derivative_f32(x);
}
MS_HD double ms_k_gelu_tanh_backward_f64(double x, double dy)
{
    return dy * ms_k_gelu_tanh_derivative_f64(x);
}

#endif
