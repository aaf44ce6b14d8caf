/* moonshard kernels: exp and erfc for f32 written so that compilers vectorise the loops
 * that call them (libm's expf and erff are scalar calls). Branch-free: range reduction,
 * polynomials and selects only. exp is within 2e-7 relative; the normal CDF within 5e-7
 * above -3 (its argument's own f32 rounding, scaled by z^2, dominates further out).
 * f64 math keeps libm (gradient checks run in f64 against the exact functions). */
#ifndef MS_KERNELS_FASTMATH_H
#define MS_KERNELS_FASTMATH_H

#include "common.h"

/* exp(x): x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two so r is exact), exp(r) by
 * its Taylor series to r^7 (truncation < 6e-9 relative), times 2^k applied as two powers
 * of two built in the exponent bits (so k = 128 and subnormal results work). Gives 0 below
 * -103.98, inf above 88.73, and keeps NaN. */
MS_HD float ms_k_expf(float x)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723e-6f;
    float clamped = x > -103.98f ? x : -103.98f; /* NaN becomes -103.98 here, NaN again below */
    clamped = clamped < 88.73f ? clamped : 88.73f;
    float k = rintf(clamped * log2e);
    float r = fmaf(k, -ln2_hi, clamped);
    r = fmaf(k, -ln2_lo, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int32_t exponent = (int32_t)k, half = exponent / 2;
    float result = p * ms_k_bits_f32((uint32_t)(half + 127) << 23) *
                   ms_k_bits_f32((uint32_t)(exponent - half + 127) << 23);
    result = x < -103.98f ? 0.0f : result;
    result = x > 88.73f ? INFINITY : result;
    return x != x ? x : result;
}

/* erfc(z) e^(z^2) / t for z >= 0, as a function of t = 1 / (1 + z / 2) in (0, 1]: a degree-10
 * polynomial fitted in relative error over all of (0, 1] (1.1e-8; 1.6e-7 evaluated in f32), so
 * erfc(z) = t e^(-z^2) R(t) shares e^(-z^2) with whatever else needs it (the normal pdf). */
MS_HD float ms_k_erfc_scaled_f32(float t)
{
    float p = 0.042352576f;
    p = fmaf(p, t, -0.23085755f);
    p = fmaf(p, t, 0.48617864f);
    p = fmaf(p, t, -0.44697714f);
    p = fmaf(p, t, 0.12708920f);
    p = fmaf(p, t, -0.057232346f);
    p = fmaf(p, t, 0.093000539f);
    p = fmaf(p, t, 0.17537683f);
    p = fmaf(p, t, 0.24688059f);
    p = fmaf(p, t, 0.28209385f);
    return fmaf(p, t, 0.28209481f);
}

/* The standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2, accurate in both tails, given
 * e = exp(-x^2 / 2) (the normal pdf's exponential, which GELU's derivative also needs). */
MS_HD float ms_k_normal_cdf_given_f32(float x, float e)
{
    float t = 1.0f / fmaf(0.5f * (float)MS_K_SQRT1_2, fabsf(x), 1.0f);
    float half_tail = 0.5f * t * e * ms_k_erfc_scaled_f32(t);
    return x >= 0.0f ? 1.0f - half_tail : half_tail;
}

MS_HD float ms_k_normal_cdf_f32(float x)
{
    return ms_k_normal_cdf_given_f32(x, ms_k_expf(-0.5f * x * x));
}

#endif
