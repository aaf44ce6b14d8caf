/* C unit tests of the fused optimizer steps: several steps of SGD (momentum, dampening,
 * nesterov, weight decay, maximize) and Adam/AdamW against loops of PyTorch's formulas. */
#include "check.h"

typedef struct sgd_case {
    double lr, momentum, dampening, weight_decay;
    int nesterov, maximize;
} sgd_case;

static void test_sgd(void)
{
    const sgd_case cases[] = {
        {0.1, 0, 0, 0, 0, 0},   {0.1, 0.9, 0, 0, 0, 0},   {0.05, 0.9, 0.1, 0.01, 0, 0},
        {0.1, 0.9, 0, 0.1, 1, 0}, {0.1, 0.5, 0, 0.2, 0, 1}, {0.1, 0, 0, 0.3, 0, 1},
    };
    const int64_t shape[2] = {3, 11};
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-13 : 1e-5;
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                const sgd_case *k = &cases[c];
                ms_tensor *p0 = random_tensor(dtype, 2, shape, -1, 1);
                ms_tensor *buf0 = make(dtype, 2, shape);
                CHECK_OK(ms_fill(buf0, NAN)); /* the first step must not read it */
                ms_tensor *p = with_layout(p0, layout);
                ms_tensor *buf = with_layout(buf0, (layout + 1) % LAYOUT_COUNT);
                double ref_p[33], ref_buf[33];
                for (int i = 0; i < 33; i++)
                    ref_p[i] = get(p0, i);
                int ok = 1;
                for (int step = 0; step < 4; step++) {
                    ms_tensor *g0 = random_tensor(dtype, 2, shape, -1, 1);
                    ms_tensor *g = with_layout(g0, (layout + 2) % LAYOUT_COUNT);
                    CHECK_OK(ms_sgd_step(p, k->momentum ? buf : NULL, g, k->lr, k->momentum,
                                         k->dampening, k->weight_decay, k->nesterov, step == 0,
                                         k->maximize));
                    for (int i = 0; i < 33; i++) {
                        double d = k->maximize ? -get(g0, i) : get(g0, i);
                        d += k->weight_decay * ref_p[i];
                        if (k->momentum) {
                            ref_buf[i] = step == 0 ? d
                                                   : k->momentum * ref_buf[i] +
                                                         (1 - k->dampening) * d;
                            d = k->nesterov ? d + k->momentum * ref_buf[i] : ref_buf[i];
                        }
                        ref_p[i] -= k->lr * d;
                        ok &= close_enough(get(p, i), ref_p[i], rtol, rtol);
                        if (k->momentum)
                            ok &= close_enough(get(buf, i), ref_buf[i], rtol, rtol);
                    }
                    ms_tensor_free(g0);
                    ms_tensor_free(g);
                }
                CHECK_MSG(ok && sentinel_intact(p), "sgd case %zu %s %s", c, dtype_label(dtype),
                          layout_names[layout]);
                ms_tensor_free(p0);
                ms_tensor_free(buf0);
                ms_tensor_free(p);
                ms_tensor_free(buf);
            }
    }
}

typedef struct adam_case {
    double lr, beta1, beta2, eps, weight_decay;
    int decoupled, maximize;
} adam_case;

static void test_adam(void)
{
    const adam_case cases[] = {
        {1e-2, 0.9, 0.999, 1e-8, 0, 0, 0},    {1e-2, 0.9, 0.999, 1e-8, 0.1, 0, 0},
        {1e-2, 0.9, 0.999, 1e-8, 0.1, 1, 0},  {5e-3, 0.5, 0.9, 1e-6, 0.05, 1, 1},
        {1e-1, 0.0, 0.99, 1e-3, 0, 0, 1},
    };
    const int64_t shape[3] = {2, 3, 7};
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-12 : 2e-5;
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                const adam_case *k = &cases[c];
                ms_tensor *p0 = random_tensor(dtype, 3, shape, -1, 1);
                ms_tensor *m0 = make(dtype, 3, shape), *v0 = make(dtype, 3, shape);
                CHECK_OK(ms_fill(m0, 0));
                CHECK_OK(ms_fill(v0, 0));
                ms_tensor *p = with_layout(p0, layout);
                ms_tensor *m = with_layout(m0, (layout + 1) % LAYOUT_COUNT);
                ms_tensor *v = with_layout(v0, (layout + 2) % LAYOUT_COUNT);
                double rp[42], rm[42] = {0}, rv[42] = {0};
                for (int i = 0; i < 42; i++)
                    rp[i] = get(p0, i);
                int ok = 1;
                for (int step = 1; step <= 5; step++) {
                    ms_tensor *g = random_tensor(dtype, 3, shape, -1, 1);
                    CHECK_OK(ms_adam_step(p, m, v, g, step, k->lr, k->beta1, k->beta2, k->eps,
                                          k->weight_decay, k->decoupled, k->maximize));
                    double bc1 = 1 - pow(k->beta1, step), bc2 = 1 - pow(k->beta2, step);
                    for (int i = 0; i < 42; i++) {
                        double gi = k->maximize ? -get(g, i) : get(g, i);
                        if (k->decoupled)
                            rp[i] *= 1 - k->lr * k->weight_decay;
                        else
                            gi += k->weight_decay * rp[i];
                        rm[i] = k->beta1 * rm[i] + (1 - k->beta1) * gi;
                        rv[i] = k->beta2 * rv[i] + (1 - k->beta2) * gi * gi;
                        double denom = sqrt(rv[i]) / sqrt(bc2) + k->eps;
                        rp[i] -= k->lr / bc1 * rm[i] / denom;
                        ok &= close_enough(get(p, i), rp[i], rtol, rtol) &&
                              close_enough(get(m, i), rm[i], rtol, rtol) &&
                              close_enough(get(v, i), rv[i], rtol, rtol);
                    }
                    ms_tensor_free(g);
                }
                CHECK_MSG(ok && sentinel_intact(p) && sentinel_intact(m) && sentinel_intact(v),
                          "adam case %zu %s %s", c, dtype_label(dtype), layout_names[layout]);
                ms_tensor *list[] = {p0, m0, v0, p, m, v};
                for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
                    ms_tensor_free(list[i]);
            }
    }
}

static void test_errors(void)
{
    ms_tensor *p = make(MS_F32, 1, SHAPE(4)), *g = make(MS_F32, 1, SHAPE(4));
    ms_tensor *g5 = make(MS_F32, 1, SHAPE(5)), *g64 = make(MS_F64, 1, SHAPE(4));
    ms_tensor *pi = make(MS_I32, 1, SHAPE(4)), *m = make(MS_F32, 1, SHAPE(4));
    ms_tensor *v = make(MS_F32, 1, SHAPE(4));
    CHECK_ERR(ms_sgd_step(p, NULL, g5, 0.1, 0, 0, 0, 0, 1, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_sgd_step(p, NULL, g64, 0.1, 0, 0, 0, 0, 1, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_sgd_step(pi, NULL, pi, 0.1, 0, 0, 0, 0, 1, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_sgd_step(p, NULL, g, 0.1, 0.9, 0, 0, 0, 1, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_sgd_step(p, m, g, 0.1, 0.9, 0.5, 0, 1, 1, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_sgd_step(p, g5, g, 0.1, 0.9, 0, 0, 0, 1, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_sgd_step(p, NULL, g, NAN, 0, 0, 0, 0, 1, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_sgd_step(NULL, NULL, g, 0.1, 0, 0, 0, 0, 1, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_adam_step(p, m, v, g, 0, 0.1, 0.9, 0.999, 1e-8, 0, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_adam_step(p, m, v, g, 1, 0.1, 1.0, 0.999, 1e-8, 0, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_adam_step(p, m, v, g, 1, 0.1, 0.9, 0.999, -1, 0, 0, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_adam_step(p, m, g5, g, 1, 0.1, 0.9, 0.999, 1e-8, 0, 0, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_adam_step(p, m, v, g64, 1, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0), MS_ERR_DTYPE);
    CHECK(strstr(ms_last_error(), "adamw") != NULL);
    CHECK_ERR(ms_adam_step(p, NULL, v, g, 1, 0.1, 0.9, 0.999, 1e-8, 0, 0, 0), MS_ERR_INVALID);
    ms_tensor *list[] = {p, g, g5, g64, pi, m, v};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

int main(void)
{
    test_seed(7);
    test_sgd();
    test_adam();
    test_errors();
    return check_summary("test_ops_optim");
}
