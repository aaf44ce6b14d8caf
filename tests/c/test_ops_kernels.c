/* C unit tests of the element math in kernels/ shared with CUDA: bf16/f16 conversions
 * against nearest-value references, the vectorisable f32 exp and normal CDF against libm in
 * double, activation values, RNG mappings and reduction steps. */
#include <float.h>

#include "check.h"
#include "activation.h"
#include "fastmath.h"
#include "optim.h"
#include "reduce.h"
#include "rng.h"

static float f32_of(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Nearest of two neighbouring candidates (magnitudes lo < hi), ties to the even pattern. */
static uint16_t nearest(double x, double lo, uint16_t lo_bits, double hi, uint16_t hi_bits)
{
    double dlo = x - lo, dhi = hi - x;
    if (dlo < dhi)
        return lo_bits;
    if (dhi < dlo)
        return hi_bits;
    return (lo_bits & 1) ? hi_bits : lo_bits;
}

/* Reference f32 -> bf16 for finite x: truncation and the next bf16 up are the candidates;
 * past the largest finite bf16 the next candidate is infinity (at 2^128). */
static uint16_t ref_bf16(float x)
{
    uint32_t u = bits_of(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t mag = u & 0x7fffffff;
    uint16_t lo_bits = (uint16_t)(mag >> 16), hi_bits = (uint16_t)(lo_bits + 1);
    double lo = f32_of((uint32_t)lo_bits << 16);
    double hi = hi_bits == 0x7f80 ? ldexp(1.0, 128) : f32_of((uint32_t)hi_bits << 16);
    return sign | nearest(fabs((double)x), lo, lo_bits, hi, hi_bits);
}

/* Reference f32 -> f16 for finite x by searching the sorted positive f16 values. */
static double f16_values[0x7c01]; /* patterns 0..0x7c00 (0x7c00 = inf, placed at 65536) */

static uint16_t ref_f16(float x)
{
    uint16_t sign = (bits_of(x) >> 16) & 0x8000;
    double a = fabs((double)x);
    int lo = 0, hi = 0x7c00;
    if (a >= f16_values[0x7c00])
        return sign | 0x7c00;
    while (hi - lo > 1) { /* f16_values[lo] <= a < f16_values[hi] */
        int mid = (lo + hi) / 2;
        if (f16_values[mid] <= a)
            lo = mid;
        else
            hi = mid;
    }
    return sign | nearest(a, f16_values[lo], (uint16_t)lo, f16_values[hi], (uint16_t)hi);
}

static void test_f16(void)
{
    /* f16 -> f32 for every pattern, computed from the bit fields */
    int ok = 1;
    for (uint32_t h = 0; h < 0x10000; h++) {
        uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
        double want = e == 0 ? ldexp((double)m, -24)
                      : e == 31 ? (m ? NAN : INFINITY)
                                : ldexp(1.0 + m / 1024.0, (int)e - 15);
        if (h & 0x8000)
            want = -want;
        double got = ms_k_f16_to_f32((uint16_t)h);
        ok &= isnan(want) ? isnan(got) : (got == want && signbit(got) == signbit(want));
        if (!(h & 0x8000) && h <= 0x7c00)
            f16_values[h] = h == 0x7c00 ? 65536.0 : want; /* rounding boundary: 65520 */
    }
    CHECK_MSG(ok, "f16 -> f32 for all 65536 patterns");
    /* every f16 survives the round trip (NaNs stay NaN, quieted) */
    ok = 1;
    for (uint32_t h = 0; h < 0x10000; h++) {
        uint16_t back = ms_k_f32_to_f16(ms_k_f16_to_f32((uint16_t)h));
        int is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        int same_sign = (back & 0x8000) == (h & 0x8000);
        ok &= is_nan ? (back & 0x7c00) == 0x7c00 && (back & 0x3ff) && same_sign : back == h;
    }
    CHECK_MSG(ok, "f16 round trip");
    /* f32 -> f16 at every midpoint between neighbours and one f32 ulp either side, plus a
     * sweep of f32 patterns */
    ok = 1;
    for (uint32_t h = 0; h < 0x7c00 && ok; h++) {
        double mid = (f16_values[h] + f16_values[h + 1]) / 2;
        float m = (float)mid; /* exact: midpoints have at most 12 significant bits */
        float probes[3] = {m, nextafterf(m, 0), nextafterf(m, INFINITY)};
        for (int k = 0; k < 3; k++) {
            uint16_t got = ms_k_f32_to_f16(probes[k]), want = ref_f16(probes[k]);
            uint16_t got_neg = ms_k_f32_to_f16(-probes[k]);
            if (got != want || got_neg != (want | 0x8000)) {
                fprintf(stderr, "  f16 of %.9g: got 0x%04x want 0x%04x\n", probes[k], got, want);
                ok = 0;
            }
        }
    }
    for (uint64_t u = 0; u < 0x7f800000u && ok; u += 9973) {
        float x = f32_of((uint32_t)u);
        ok &= ms_k_f32_to_f16(x) == ref_f16(x);
    }
    CHECK_MSG(ok, "f32 -> f16 rounds to nearest even");
#ifdef __FLT16_MAX__
    ok = 1; /* and agrees with the compiler's own conversion */
    for (uint64_t u = 0; u < 0x100000000ull; u += 65521) {
        float x = f32_of((uint32_t)u);
        _Float16 hw = (_Float16)x;
        uint16_t hw_bits;
        memcpy(&hw_bits, &hw, sizeof hw_bits);
        uint16_t got = ms_k_f32_to_f16(x);
        ok &= isnan(x) ? (got & 0x7c00) == 0x7c00 && (got & 0x3ff) : got == hw_bits;
    }
    CHECK_MSG(ok, "f32 -> f16 matches _Float16");
#endif
    CHECK(ms_k_f32_to_f16(INFINITY) == 0x7c00 && ms_k_f32_to_f16(-INFINITY) == 0xfc00);
    CHECK(ms_k_f32_to_f16(65504.0f) == 0x7bff && ms_k_f32_to_f16(65519.996f) == 0x7bff);
    CHECK(ms_k_f32_to_f16(65520.0f) == 0x7c00);
    CHECK(ms_k_f32_to_f16(-0.0f) == 0x8000);
    CHECK(ms_k_f32_to_f16(f32_of(0x7f800001)) != 0x7c00); /* a signalling NaN stays NaN */
}

static void test_bf16(void)
{
    int ok = 1;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = ms_k_bf16_to_f32((uint16_t)h);
        ok &= bits_of(f) == h << 16;
        uint16_t back = ms_k_f32_to_bf16(f);
        int same_sign = (back & 0x8000) == (h & 0x8000);
        ok &= isnan(f) ? (back & 0x7f80) == 0x7f80 && (back & 0x7f) && same_sign : back == h;
    }
    CHECK_MSG(ok, "bf16 -> f32 -> bf16 for all 65536 patterns");
    ok = 1;
    for (uint64_t u = 0; u < 0x100000000ull && ok; u += 7919) {
        float x = f32_of((uint32_t)u);
        if (isnan(x) || isinf(x))
            continue;
        ok &= ms_k_f32_to_bf16(x) == ref_bf16(x);
    }
    /* exact midpoints and their neighbours */
    for (uint32_t h = 0; h < 0x7f80 && ok; h++) {
        float m = f32_of((h << 16) | 0x8000);
        float probes[3] = {m, nextafterf(m, 0), nextafterf(m, INFINITY)};
        for (int k = 0; k < 3; k++)
            if (!isinf(probes[k]))
                ok &= ms_k_f32_to_bf16(probes[k]) == ref_bf16(probes[k]) &&
                      ms_k_f32_to_bf16(-probes[k]) == (ref_bf16(probes[k]) | 0x8000);
    }
    CHECK_MSG(ok, "f32 -> bf16 rounds to nearest even");
    CHECK(ms_k_f32_to_bf16(FLT_MAX) == 0x7f80); /* rounds past the largest bf16 */
    CHECK(ms_k_f32_to_bf16(INFINITY) == 0x7f80 && ms_k_f32_to_bf16(-INFINITY) == 0xff80);
    uint16_t nan = ms_k_f32_to_bf16(f32_of(0x7f800001)); /* payload only in the low bits */
    CHECK((nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0);
    CHECK(ms_k_f32_to_bf16(f32_of(0xffc00000)) == 0xffc0);
}

/* Worst relative errors over a fine sweep, against double-precision libm. */
static void test_fastmath(void)
{
    double worst_exp = 0, worst_cdf = 0, worst_cdf_tail = 0;
    for (float x = -100.0f; x < 100.0f; x += 0.000731f) {
        double want = exp((double)x);
        if (want > 2e-38 && want < 3e38)
            worst_exp = fmax(worst_exp, fabs(ms_k_expf(x) - want) / want);
        double cdf = 0.5 * erfc(-(double)x / sqrt(2.0));
        double err = cdf > 1e-37 ? fabs(ms_k_normal_cdf_f32(x) - cdf) / cdf : 0;
        if (x > -3.0f)
            worst_cdf = fmax(worst_cdf, err);
        else if (x > -12.0f)
            worst_cdf_tail = fmax(worst_cdf_tail, err);
    }
    CHECK_MSG(worst_exp < 2e-7, "ms_k_expf within 2e-7 relative of exp");
    CHECK_MSG(worst_cdf < 6e-7, "ms_k_normal_cdf_f32 within 6e-7 relative above -3");
    /* x * x rounds to 6e-8 relative; exp(-x^2 / 2) scales that by x^2 / 2 <= 72 */
    CHECK_MSG(worst_cdf_tail < 5e-6, "ms_k_normal_cdf_f32 within 5e-6 relative down to -12");
    CHECK(ms_k_expf(88.7f) > 3.3e38f && isfinite(ms_k_expf(88.7f)));
    CHECK(ms_k_expf(-100.0f) > 0.0f && ms_k_expf(-100.0f) < 1e-43f); /* subnormal */
    CHECK(ms_k_expf(0.0f) == 1.0f);
    CHECK(ms_k_expf(-105.0f) == 0.0f && ms_k_expf(-INFINITY) == 0.0f);
    CHECK(isinf(ms_k_expf(100.0f)) && isinf(ms_k_expf(INFINITY)));
    CHECK(isnan(ms_k_expf(NAN)) && isnan(ms_k_normal_cdf_f32(NAN)));
    CHECK(ms_k_normal_cdf_f32(INFINITY) == 1.0f && ms_k_normal_cdf_f32(-INFINITY) == 0.0f);
}

static void test_activations(void)
{
    /* values from the closed forms, computed independently with long double */
    CHECK_NEAR(ms_k_gelu_f64(1.0), 0.8413447460685429, 1e-15, 0);
    CHECK_NEAR(ms_k_gelu_f64(-2.0), -0.04550026389635842, 1e-14, 0);
    CHECK_NEAR(ms_k_gelu_f32(1.0f), 0.8413447460685429, 1e-6, 0);
    CHECK_NEAR(ms_k_gelu_tanh_f64(1.0), 0.8411919906082768, 1e-15, 0);
    CHECK_NEAR(ms_k_gelu_tanh_f32(-2.0f), -0.04540230591222494, 1e-5, 0);
    CHECK(ms_k_sigmoid_f64(0) == 0.5 && ms_k_sigmoid_f32(-200.0f) == 0.0f);
    CHECK(ms_k_sigmoid_f32(200.0f) == 1.0f);
    CHECK(ms_k_relu_backward_f64(0.0, 3.0) == 0.0 && ms_k_relu_backward_f64(1e-300, 3.0) == 3.0);
    CHECK(isnan(ms_k_relu_f32(NAN)));
    CHECK_NEAR(ms_k_gelu_backward_f64(0.0, 1.0), 0.5, 1e-15, 0);
    CHECK_NEAR(ms_k_gelu_tanh_backward_f64(0.0, 2.0), 1.0, 1e-15, 0);
    CHECK_NEAR(ms_k_tanh_backward_f64(0.5, 1.0), 1 - tanh(0.5) * tanh(0.5), 1e-15, 0);
    CHECK_NEAR(ms_k_sigmoid_backward_f32(0.0f, 4.0f), 1.0, 1e-7, 0);
    /* derivative of gelu at 1: Phi(1) + phi(1) */
    CHECK_NEAR(ms_k_gelu_backward_f64(1.0, 1.0), 0.8413447460685429 + 0.24197072451914337,
               1e-14, 0);
}

static void test_rng_mappings(void)
{
    CHECK(ms_k_uniform24(0) == 0.0f);
    CHECK(ms_k_uniform24(0xffffffffu) == 1.0f - 0x1p-24f);
    CHECK(ms_k_uniform53(0, 0) == 0.0);
    CHECK(ms_k_uniform53(0xffffffffu, 0xffffffffu) == 1.0 - 0x1p-53);
    uint32_t zeros[4] = {0, 0, 0, 0}; /* u1 = 1, u2 = 0: the normal is 0 */
    CHECK(ms_k_normal(zeros) == 0.0);
    uint32_t extreme[4] = {0xffffffffu, 0xffffffffu, 0, 0}; /* u1 = 2^-53: finite tail */
    CHECK(isfinite(ms_k_normal(extreme)) && ms_k_normal(extreme) > 8.0);
    CHECK(ms_k_dropout_keep(1, 2, 0.0) == 1 && ms_k_dropout_keep(1, 2, 1.0) == 0);
}

static void test_optim_and_reduce_steps(void)
{
    ms_k_adam_coeffs c = ms_k_adam_coeffs_make(3, 0.1, 0.9, 0.999, 1e-8, 0.01, 1, 0);
    CHECK_NEAR(c.step_size, 0.1 / (1 - 0.9 * 0.9 * 0.9), 1e-15, 0);
    CHECK_NEAR(c.bias_c2_sqrt, sqrt(1 - 0.999 * 0.999 * 0.999), 1e-15, 0);
    CHECK_NEAR(c.decay_factor, 1 - 0.1 * 0.01, 1e-15, 0);
    double p = 1.0, m = 0.0, v = 0.0;
    ms_k_adam_coeffs first = ms_k_adam_coeffs_make(1, 0.1, 0.9, 0.999, 0, 0, 0, 0);
    ms_k_adam_f64(&p, &m, &v, 2.0, &first); /* first Adam step moves by lr * sign(g) */
    CHECK_NEAR(p, 0.9, 1e-15, 0);
    ms_k_sgd_coeffs s = {0.5, 0, 0, 0, 0, 0, 1};
    double q = 1.0;
    ms_k_sgd_f64(&q, NULL, 2.0, &s); /* maximize climbs */
    CHECK(q == 2.0);
    CHECK(isnan(ms_k_max_step(NAN, 1.0)) && isnan(ms_k_max_step(1.0, NAN)));
    CHECK(isnan(ms_k_min_step(NAN, 1.0)) && isnan(ms_k_min_step(1.0, NAN)));
    CHECK(ms_k_max_step(-INFINITY, -INFINITY) == -INFINITY && ms_k_min_step(2, 1) == 1);
    CHECK(ms_k_argmax_better(NAN, 5.0) && !ms_k_argmax_better(NAN, NAN));
    CHECK(!ms_k_argmax_better(5.0, 5.0)); /* ties keep the first */
    CHECK(ms_k_sumsq_step(1.0, 3.0) == 10.0 && ms_k_rstd(3.0, 1.0) == 0.5);
}

int main(void)
{
    test_f16();
    test_bf16();
    test_fastmath();
    test_activations();
    test_rng_mappings();
    test_optim_and_reduce_steps();
    return check_summary("test_ops_kernels");
}
