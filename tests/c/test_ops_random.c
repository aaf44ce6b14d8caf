/* C unit tests of the counter-based random ops: Philox known answers, replay by (seed,
 * offset), ranges and moments, layout independence, dropout masks shared with backward. */
#include "check.h"
#include "rng.h"

static void test_philox_known_answers(void)
{
    /* Random123's kat_vectors for philox4x32-10: counter, key, expected output */
    const uint32_t cases[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0x408f276d,
         0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09,
         0x94fdcceb, 0x5001e420, 0x24126ea1}};
    for (int c = 0; c < 3; c++) {
        uint32_t out[4];
        ms_k_philox4x32_10(cases[c], cases[c] + 4, out);
        CHECK_MSG(memcmp(out, cases[c] + 6, sizeof out) == 0, "philox known answer %d", c);
    }
    /* the block of (seed, index) puts the index in counter words 0-1 and the seed in the key */
    uint32_t block[4], direct[4];
    ms_k_rng_block(0x299f31d0a4093822ull, 0x85a308d3243f6a88ull, block);
    const uint32_t counter[4] = {0x243f6a88, 0x85a308d3, 0, 0}, key[2] = {0xa4093822, 0x299f31d0};
    ms_k_philox4x32_10(counter, key, direct);
    CHECK(memcmp(block, direct, sizeof block) == 0);
}

static void test_rand_uniform(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        int64_t n = 100000;
        ms_tensor *t = make(dtype, 1, &n);
        CHECK_OK(ms_rand_uniform(t, -1, 3, 42, 8));
        double sum = 0, lo = INFINITY, hi = -INFINITY;
        int formula = 1;
        for (int64_t i = 0; i < n; i++) {
            double v = get(t, i);
            sum += v;
            lo = fmin(lo, v);
            hi = fmax(hi, v);
            if (i < 100) { /* element i is the block (seed, offset + i) mapped to [low, high) */
                uint32_t w[4];
                ms_k_rng_block(42, 8 + (uint64_t)i, w);
                double u = dt ? (double)(((uint64_t)w[0] << 32 | w[1]) >> 11) * 0x1p-53
                              : (double)(w[0] >> 8) * 0x1p-24;
                formula &= close_enough(v, -1 + 4 * u, dt ? 1e-15 : 1e-7, 1e-7);
            }
        }
        CHECK_MSG(formula, "uniform %s follows the counter formula", dtype_label(dtype));
        CHECK(lo >= -1 && hi < 3);
        /* mean 1, sd of the mean 4/sqrt(12 n) ~ 0.0037 */
        CHECK_NEAR(sum / (double)n, 1.0, 0, 0.02);
        /* replay: offset 8 + 10 reproduces the tail */
        ms_tensor *tail = make(dtype, 1, SHAPE(50));
        CHECK_OK(ms_rand_uniform(tail, -1, 3, 42, 18));
        int same = 1;
        for (int64_t i = 0; i < 50; i++)
            same &= get(tail, i) == get(t, 10 + i);
        CHECK_MSG(same, "uniform %s replays from an offset", dtype_label(dtype));
        CHECK_OK(ms_rand_uniform(tail, -1, 3, 43, 18));
        CHECK(get(tail, 0) != get(t, 10)); /* another seed, another stream */
        /* strided output: element i is still row-major element i */
        ms_tensor *grid0 = make(dtype, 2, SHAPE(7, 9));
        CHECK_OK(ms_rand_uniform(grid0, 0, 1, 5, 100));
        for (int layout = 1; layout < LAYOUT_COUNT; layout++) {
            ms_tensor *grid = with_layout(grid0, layout);
            CHECK_OK(ms_rand_uniform(grid, 0, 1, 5, 100));
            int equal = 0;
            CHECK_OK(ms_equal(&equal, grid, grid0));
            CHECK_MSG(equal && sentinel_intact(grid), "uniform %s %s", dtype_label(dtype),
                      layout_names[layout]);
            ms_tensor_free(grid);
        }
        /* a degenerate range gives the bound */
        CHECK_OK(ms_rand_uniform(tail, 2, 2, 1, 0));
        CHECK(get(tail, 7) == 2);
        ms_tensor_free(t);
        ms_tensor_free(tail);
        ms_tensor_free(grid0);
    }
}

static void test_normal(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        int64_t n = 200000;
        ms_tensor *t = make(dtype, 1, &n);
        CHECK_OK(ms_rand_normal(t, 2, 3, 7, 0));
        double sum = 0, sq = 0;
        int64_t within_one_sd = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = get(t, i);
            sum += v;
            sq += v * v;
            within_one_sd += fabs(v - 2) < 3;
        }
        double mean = sum / (double)n, var = sq / (double)n - mean * mean;
        CHECK_NEAR(mean, 2.0, 0, 0.04); /* sd of the mean 3/sqrt(n) ~ 0.0067 */
        CHECK_NEAR(var, 9.0, 0.02, 0);
        CHECK_NEAR((double)within_one_sd / (double)n, 0.682689, 0, 0.005);
        /* Box-Muller of the element's block, computed here independently */
        uint32_t w[4];
        ms_k_rng_block(7, 3, w);
        double u1 = 1 - (double)(((uint64_t)w[0] << 32 | w[1]) >> 11) / 9007199254740992.0;
        double u2 = (double)(((uint64_t)w[2] << 32 | w[3]) >> 11) / 9007199254740992.0;
        double z = sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
        CHECK_NEAR(get(t, 3), 2 + 3 * z, dt ? 1e-14 : 1e-6, 1e-6);
        ms_tensor_free(t);
    }
}

static void test_dropout(void)
{
    const double p = 0.3;
    const int64_t shape[2] = {50, 41};
    ms_tensor *x64 = random_tensor(MS_F64, 2, shape, 1, 2); /* never 0, so drops are visible */
    ms_tensor *x32 = make(MS_F32, 2, shape);
    CHECK_OK(ms_copy(x32, x64));
    ms_tensor *out64 = make(MS_F64, 2, shape), *out32 = make(MS_F32, 2, shape);
    CHECK_OK(ms_dropout(out64, x64, p, 11, 40));
    CHECK_OK(ms_dropout(out32, x32, p, 11, 40));
    int64_t kept = 0;
    int scaled = 1, same_mask = 1;
    for (int64_t i = 0; i < x64->numel; i++) {
        double v = get(out64, i);
        kept += v != 0;
        if (v != 0)
            scaled &= close_enough(v, get(x64, i) / (1 - p), 1e-15, 0);
        same_mask &= (v != 0) == (get(out32, i) != 0);
    }
    CHECK(scaled);
    CHECK(same_mask); /* f32 and f64 draw the same mask */
    CHECK_NEAR((double)kept / (double)x64->numel, 1 - p, 0, 0.035);
    /* backward regenerates the mask: dx = dy * mask / (1 - p), also through strided views */
    for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
        ms_tensor *dy = with_layout(x64, layout);
        ms_tensor *dx = with_layout(out64, (layout + 1) % LAYOUT_COUNT);
        CHECK_OK(ms_dropout_backward(dx, dy, p, 11, 40));
        int equal = 0;
        CHECK_OK(ms_equal(&equal, dx, out64));
        CHECK_MSG(equal && sentinel_intact(dx), "dropout backward %s", layout_names[layout]);
        ms_tensor_free(dy);
        ms_tensor_free(dx);
    }
    /* a shifted offset is a different mask */
    ms_tensor *other = make(MS_F64, 2, shape);
    CHECK_OK(ms_dropout(other, x64, p, 11, 44));
    int equal = 1;
    CHECK_OK(ms_equal(&equal, other, out64));
    CHECK(equal == 0);
    /* p = 0 is the identity, p = 1 drops everything */
    CHECK_OK(ms_dropout(other, x64, 0, 1, 0));
    CHECK_OK(ms_equal(&equal, other, x64));
    CHECK(equal == 1);
    CHECK_OK(ms_dropout(other, x64, 1, 1, 0));
    int zero = 1;
    for (int64_t i = 0; i < other->numel; i++)
        zero &= get(other, i) == 0;
    CHECK(zero);
    ms_tensor *list[] = {x64, x32, out64, out32, other};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

/* 16-bit draws are the f32 draws of the same counters, rounded once. */
static void test_half_draws(void)
{
    const int halves[2] = {MS_BF16, MS_F16};
    ms_tensor *ref = make(MS_F32, 1, SHAPE(257)), *ref_drop = make(MS_F32, 1, SHAPE(257));
    ms_tensor *ones = make(MS_F32, 1, SHAPE(257));
    CHECK_OK(ms_fill(ones, 1.5));
    CHECK_OK(ms_rand_normal(ref, 0.5, 2.0, 7, 11));
    CHECK_OK(ms_dropout(ref_drop, ones, 0.3, 7, 11));
    for (int k = 0; k < 2; k++) {
        ms_tensor *h = make(halves[k], 1, SHAPE(257)), *drop = make(halves[k], 1, SHAPE(257));
        ms_tensor *x = make(halves[k], 1, SHAPE(257));
        CHECK_OK(ms_fill(x, 1.5));
        CHECK_OK(ms_rand_normal(h, 0.5, 2.0, 7, 11));
        CHECK_OK(ms_dropout(drop, x, 0.3, 7, 11));
        int same = 1;
        for (int64_t i = 0; i < 257; i++) {
            float r = (float)get(ref, i), d = (float)get(ref_drop, i);
            uint16_t want = halves[k] == MS_BF16 ? ms_k_f32_to_bf16(r) : ms_k_f32_to_f16(r);
            uint16_t want_d = halves[k] == MS_BF16 ? ms_k_f32_to_bf16(d) : ms_k_f32_to_f16(d);
            same &= *(uint16_t *)elem_ptr(h, i) == want && *(uint16_t *)elem_ptr(drop, i) == want_d;
        }
        CHECK(same);
        ms_tensor_free(h);
        ms_tensor_free(drop);
        ms_tensor_free(x);
    }
    ms_tensor_free(ref);
    ms_tensor_free(ref_drop);
    ms_tensor_free(ones);
}

static void test_errors(void)
{
    ms_tensor *t = make(MS_F32, 1, SHAPE(4)), *u = make(MS_F32, 1, SHAPE(5));
    ms_tensor *i = make(MS_I64, 1, SHAPE(4)), *h = make(MS_U8, 1, SHAPE(4));
    CHECK_ERR(ms_rand_uniform(i, 0, 1, 0, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_rand_uniform(t, 1, 0, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_rand_uniform(t, 0, INFINITY, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_rand_uniform(NULL, 0, 1, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_rand_normal(t, 0, -1, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_rand_normal(i, 0, 1, 0, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_rand_uniform(h, 0, 1, 0, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_dropout(t, t, 1.5, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_dropout(t, t, NAN, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_dropout(t, u, 0.5, 0, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_dropout(i, i, 0.5, 0, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_dropout_backward(t, u, 0.5, 0, 0), MS_ERR_SHAPE);
    ms_tensor *list[] = {t, u, i, h};
    for (size_t k = 0; k < sizeof list / sizeof list[0]; k++)
        ms_tensor_free(list[k]);
}

int main(void)
{
    test_seed(6);
    test_philox_known_answers();
    test_rand_uniform();
    test_normal();
    test_dropout();
    test_half_draws();
    test_errors();
    return check_summary("test_ops_random");
}
