/* C unit tests of ms_reduce and ms_max_dim against naive loops: every dims mask of 3-D and
 * 4-D shapes, strided layouts, 0-dim and empty tensors, NaN, ties and determinism. */
#include "check.h"

/* Reference: for each output position, walk every input element that maps to it. */
static double ref_reduce(const ms_tensor *a, int op, uint32_t mask, int64_t out_pos,
                         const int64_t *out_shape)
{
    int64_t out_index[MS_MAX_DIMS];
    for (int d = a->ndim - 1; d >= 0; d--) {
        out_index[d] = out_pos % out_shape[d];
        out_pos /= out_shape[d];
    }
    long double sum = 0;
    double best = op == MS_MAX ? -INFINITY : INFINITY;
    int saw_nan = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < a->numel; i++) {
        int64_t rest = i, matches = 1;
        for (int d = a->ndim - 1; d >= 0; d--) {
            int64_t index = rest % a->shape[d];
            rest /= a->shape[d];
            if (!((mask >> d) & 1) && index != out_index[d])
                matches = 0;
        }
        if (!matches)
            continue;
        double v = get(a, i);
        count++;
        sum += op == MS_SUMSQ ? (long double)v * v : v;
        saw_nan |= isnan(v);
        if (op == MS_MAX && v > best)
            best = v;
        if (op == MS_MIN && v < best)
            best = v;
    }
    switch (op) {
    case MS_SUM:
    case MS_SUMSQ: return (double)sum;
    case MS_MEAN: return (double)(sum / count);
    default: return saw_nan ? NAN : best;
    }
}

static void check_all_masks(int dtype, int ndim, const int64_t *shape)
{
    ms_tensor *a0 = random_tensor(dtype, ndim, shape, -2, 2);
    double rtol = dtype == MS_F64 ? 1e-13 : 1e-6;
    for (uint32_t mask = 0; mask < (1u << ndim); mask++) {
        int64_t out_shape[MS_MAX_DIMS];
        for (int d = 0; d < ndim; d++)
            out_shape[d] = (mask >> d) & 1 ? 1 : shape[d];
        ms_tensor *out0 = make(dtype, ndim, out_shape);
        ms_tensor *want = make(MS_F64, ndim, out_shape);
        for (int op = MS_SUM; op <= MS_SUMSQ; op++) {
            for (int64_t i = 0; i < want->numel; i++)
                set(want, i, ref_reduce(a0, op, mask, i, out_shape));
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                ms_tensor *a = with_layout(a0, layout);
                ms_tensor *out = with_layout(out0, (layout + 1) % LAYOUT_COUNT);
                CHECK_OK(ms_reduce(out, a, op, mask));
                int ok = 1;
                for (int64_t i = 0; i < out->numel && ok; i++)
                    ok = close_enough(get(out, i), get(want, i), rtol, 1e-12);
                CHECK_MSG(ok && sentinel_intact(out), "reduce op %d mask 0x%x %s %s", op, mask,
                          dtype_label(dtype), layout_names[layout]);
                ms_tensor_free(a);
                ms_tensor_free(out);
            }
        }
        ms_tensor_free(want);
        ms_tensor_free(out0);
    }
    ms_tensor_free(a0);
}

static void test_masks(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        check_all_masks(dtype, 3, SHAPE(3, 5, 7));
        check_all_masks(dtype, 4, SHAPE(2, 3, 1, 70)); /* runs long enough for the lanes */
        check_all_masks(dtype, 2, SHAPE(130, 3));
        check_all_masks(dtype, 1, SHAPE(1000));
    }
}

static void test_accuracy_and_determinism(void)
{
    /* 1e6 values of 0.1f: a float accumulator drifts far, a double one does not */
    int64_t n = 1000000;
    ms_tensor *a = make(MS_F32, 1, &n);
    CHECK_OK(ms_fill(a, 0.1));
    ms_tensor *out = make(MS_F32, 1, SHAPE(1));
    CHECK_OK(ms_reduce(out, a, MS_SUM, 1));
    CHECK_NEAR(get(out, 0), 1e6 * (double)0.1f, 1e-7, 0);
    /* the same input reduces to the same bits, every time */
    ms_tensor *r = random_tensor(MS_F64, 2, SHAPE(300, 301), -1, 1);
    ms_tensor *first = make(MS_F64, 2, SHAPE(1, 1)), *again = make(MS_F64, 2, SHAPE(1, 1));
    CHECK_OK(ms_reduce(first, r, MS_SUM, 3));
    for (int k = 0; k < 3; k++) {
        int equal = 0;
        CHECK_OK(ms_reduce(again, r, MS_SUM, 3));
        CHECK_OK(ms_equal(&equal, first, again));
        CHECK(equal == 1);
    }
    ms_tensor *list[] = {a, out, r, first, again};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

static void test_edge_cases(void)
{
    /* 0-dim: mask 0 is the identity */
    ms_tensor *s = make(MS_F64, 0, NULL), *s_out = make(MS_F64, 0, NULL);
    set(s, 0, 4.5);
    for (int op = MS_SUM; op <= MS_SUMSQ; op++) {
        CHECK_OK(ms_reduce(s_out, s, op, 0));
        CHECK(get(s_out, 0) == (op == MS_SUMSQ ? 20.25 : 4.5));
    }
    CHECK_ERR(ms_reduce(s_out, s, MS_SUM, 1), MS_ERR_INVALID);
    /* reducing an empty dim: sum 0, mean NaN, max an error */
    ms_tensor *empty = make(MS_F32, 2, SHAPE(3, 0));
    ms_tensor *e_out = make(MS_F32, 2, SHAPE(3, 1));
    CHECK_OK(ms_reduce(e_out, empty, MS_SUM, 2));
    CHECK(get(e_out, 2) == 0);
    CHECK_OK(ms_reduce(e_out, empty, MS_MEAN, 2));
    CHECK(isnan(get(e_out, 0)));
    CHECK_ERR(ms_reduce(e_out, empty, MS_MAX, 2), MS_ERR_SHAPE);
    /* an empty output has nothing to do */
    ms_tensor *e_keep = make(MS_F32, 2, SHAPE(1, 0));
    CHECK_OK(ms_reduce(e_keep, empty, MS_MAX, 1));
    /* NaN propagates through max and min */
    ms_tensor *n = make(MS_F32, 1, SHAPE(5)), *n_out = make(MS_F32, 1, SHAPE(1));
    CHECK_OK(ms_arange(n, 0, 1));
    set(n, 2, NAN);
    CHECK_OK(ms_reduce(n_out, n, MS_MAX, 1));
    CHECK(isnan(get(n_out, 0)));
    CHECK_OK(ms_reduce(n_out, n, MS_MIN, 1));
    CHECK(isnan(get(n_out, 0)));
    /* and through the vectorised lanes of a long run */
    ms_tensor *long_run = make(MS_F64, 1, SHAPE(1000)), *l_out = make(MS_F64, 1, SHAPE(1));
    CHECK_OK(ms_arange(long_run, 0, 1));
    CHECK_OK(ms_reduce(l_out, long_run, MS_MAX, 1));
    CHECK(get(l_out, 0) == 999);
    CHECK_OK(ms_reduce(l_out, long_run, MS_MIN, 1));
    CHECK(get(l_out, 0) == 0);
    set(long_run, 517, NAN);
    CHECK_OK(ms_reduce(l_out, long_run, MS_MAX, 1));
    CHECK(isnan(get(l_out, 0)));
    CHECK_OK(ms_reduce(l_out, long_run, MS_MIN, 1));
    CHECK(isnan(get(l_out, 0)));
    ms_tensor_free(long_run);
    ms_tensor_free(l_out);
    ms_tensor *list[] = {s, s_out, empty, e_out, e_keep, n, n_out};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

static void test_max_dim(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        const int64_t shape[3] = {4, 5, 6};
        ms_tensor *a0 = make(dtype, 3, shape);
        /* few distinct values: many ties, where the first maximum must win */
        for (int64_t i = 0; i < a0->numel; i++)
            set(a0, i, (double)((i * 7) % 5));
        for (int dim = 0; dim < 3; dim++) {
            int64_t kept[3] = {4, 5, 6};
            kept[dim] = 1;
            ms_tensor *v0 = make(dtype, 3, kept), *i0 = make(MS_I64, 3, kept);
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                ms_tensor *a = with_layout(a0, layout);
                ms_tensor *v = with_layout(v0, (layout + 1) % LAYOUT_COUNT);
                ms_tensor *idx = with_layout(i0, (layout + 2) % LAYOUT_COUNT);
                CHECK_OK(ms_max_dim(v, idx, a, dim));
                int ok = 1;
                for (int64_t p = 0; p < v->numel; p++) {
                    int64_t index[3] = {p / (kept[1] * kept[2]), (p / kept[2]) % kept[1],
                                        p % kept[2]};
                    double best = -INFINITY;
                    int64_t best_k = -1;
                    for (int64_t k = 0; k < shape[dim]; k++) {
                        index[dim] = k;
                        double x = get(a0, (index[0] * shape[1] + index[1]) * shape[2] + index[2]);
                        if (x > best) {
                            best = x;
                            best_k = k;
                        }
                    }
                    ok &= get(v, p) == best && get(idx, p) == (double)best_k;
                }
                CHECK_MSG(ok && sentinel_intact(v) && sentinel_intact(idx),
                          "max_dim dim %d %s %s", dim, dtype_label(dtype), layout_names[layout]);
                ms_tensor_free(a);
                ms_tensor_free(v);
                ms_tensor_free(idx);
            }
            ms_tensor_free(v0);
            ms_tensor_free(i0);
        }
        /* the first NaN is the maximum */
        ms_tensor *row = make(dtype, 1, SHAPE(5)), *v = make(dtype, 1, SHAPE(1));
        ms_tensor *idx = make(MS_I64, 1, SHAPE(1));
        CHECK_OK(ms_arange(row, 0, 1));
        set(row, 3, NAN);
        set(row, 4, NAN);
        CHECK_OK(ms_max_dim(v, idx, row, 0));
        CHECK(isnan(get(v, 0)) && get(idx, 0) == 3);
        /* errors */
        ms_tensor *i32 = make(MS_I32, 1, SHAPE(1));
        CHECK_ERR(ms_max_dim(v, i32, row, 0), MS_ERR_DTYPE);
        CHECK_ERR(ms_max_dim(v, idx, row, 1), MS_ERR_INVALID);
        CHECK_ERR(ms_max_dim(v, idx, row, -1), MS_ERR_INVALID);
        CHECK_ERR(ms_max_dim(v, idx, a0, 0), MS_ERR_SHAPE);
        ms_tensor *empty = make(dtype, 2, SHAPE(2, 0)), *ev = make(dtype, 2, SHAPE(2, 1));
        ms_tensor *ei = make(MS_I64, 2, SHAPE(2, 1));
        CHECK_ERR(ms_max_dim(ev, ei, empty, 1), MS_ERR_SHAPE);
        ms_tensor *list[] = {a0, row, v, idx, i32, empty, ev, ei};
        for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
            ms_tensor_free(list[i]);
    }
}

static void test_errors(void)
{
    ms_tensor *a = make(MS_F32, 2, SHAPE(3, 4));
    ms_tensor *out = make(MS_F32, 2, SHAPE(3, 1));
    ms_tensor *out_wrong = make(MS_F32, 1, SHAPE(3));
    ms_tensor *out64 = make(MS_F64, 2, SHAPE(3, 1));
    ms_tensor *ints = make(MS_I32, 2, SHAPE(3, 4));
    ms_tensor *ints_out = make(MS_I32, 2, SHAPE(3, 1));
    CHECK_OK(ms_reduce(out, a, MS_SUM, 2));
    CHECK_ERR(ms_reduce(out, a, MS_SUM, 1), MS_ERR_SHAPE);
    CHECK_ERR(ms_reduce(out_wrong, a, MS_SUM, 2), MS_ERR_SHAPE);
    CHECK_ERR(ms_reduce(out, a, MS_SUM, 4), MS_ERR_INVALID); /* dim 2 of a 2-D tensor */
    CHECK_ERR(ms_reduce(out, a, MS_SUM, 0x80000000u), MS_ERR_INVALID);
    CHECK_ERR(ms_reduce(out, a, 5, 2), MS_ERR_INVALID);
    CHECK_ERR(ms_reduce(out64, a, MS_SUM, 2), MS_ERR_DTYPE);
    CHECK_ERR(ms_reduce(ints_out, ints, MS_SUM, 2), MS_ERR_DTYPE);
    CHECK_ERR(ms_reduce(NULL, a, MS_SUM, 2), MS_ERR_INVALID);
    ms_tensor *list[] = {a, out, out_wrong, out64, ints, ints_out};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

int main(void)
{
    test_seed(3);
    test_masks();
    test_accuracy_and_determinism();
    test_edge_cases();
    test_max_dim();
    test_errors();
    return check_summary("test_ops_reduce");
}
