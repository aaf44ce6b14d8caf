/* moonshard kernels: exp and erfc for f32 written so that compilers vectorise the loops
 * that call them (libm's expf and erff are scalar calls). Branch-free: range reduction,
 * polynomials and selects only. exp is within 2e-7 relative; the normal CDF within 2e-6
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

/* erfc(z) for z >= 0: t exp(-z^2 + P(t)) with t = 1 / (1 + z / 2) and P the degree-9
 * Chebyshev fit of Press et al. (fractional error below 1.2e-7 for every z >= 0). */
MS_HD float ms_k_erfc_nonnegative_f32(float z)
{
    float t = 1.0f / fmaf(0.5f, z, 1.0f);
    float p = 0.17087277f;
    p = fmaf(p, t, -0.82215223f);
    p = fmaf(p, t, 1.48851587f);
    p = fmaf(p, t, -1.13520398f);
    p = fmaf(p, t, 0.27886807f);
    p = fmaf(p, t, -0.18628806f);
    p = fmaf(p, t, 0.09678418f);
    p = fmaf(p, t, 0.37409196f);
    p = fmaf(p, t, 1.00002368f);
    p = fmaf(p, t, -1.26551223f);
    return t * ms_k_expf(fmaf(-z, z, p));
}

/* The standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2, accurate in both tails. */
MS_HD float ms_k_normal_cdf_f32(float x)
{
    float half_tail = 0.5f * ms_k_erfc_nonnegative_f32(fabsf(x) * (float)MS_K_SQRT1_2);
    return x >= 0.0f ? 1.0f - half_tail : half_tail;
}

#endif
