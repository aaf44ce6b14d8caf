/* C unit tests of ms_binary, ms_binary_scalar, ms_unary and ms_unary_backward against naive
 * reference loops: f32/f64 (and i32/i64 where defined), broadcasting, strided layouts. */
#include "check.h"

static double ref_binary(int op, double x, double y)
{
    switch (op) {
    case MS_ADD: return x + y;
    case MS_SUB: return x - y;
    case MS_MUL: return x * y;
    case MS_DIV: return x / y;
    case MS_MAXIMUM: return isnan(x) || isnan(y) ? NAN : (x > y ? x : y);
    case MS_MINIMUM: return isnan(x) || isnan(y) ? NAN : (x < y ? x : y);
    case MS_POW: return pow(x, y);
    case MS_EQ: return x == y;
    case MS_NE: return x != y;
    case MS_LT: return x < y;
    case MS_LE: return x <= y;
    case MS_GT: return x > y;
    default: return x >= y;
    }
}

/* Row-major position in a broadcast operand for a position of out's shape. */
static int64_t broadcast_position(const ms_tensor *operand, const ms_tensor *out, int64_t pos)
{
    int64_t index[MS_MAX_DIMS];
    for (int d = out->ndim - 1; d >= 0; d--) {
        index[d] = pos % out->shape[d];
        pos /= out->shape[d];
    }
    int lead = out->ndim - operand->ndim;
    int64_t result = 0;
    for (int d = 0; d < operand->ndim; d++)
        result = result * operand->shape[d] + (operand->shape[d] == 1 ? 0 : index[lead + d]);
    return result;
}

typedef struct bcase { int out_ndim, a_ndim, b_ndim; int64_t out[3], a[3], b[3]; } bcase;

static const bcase broadcast_cases[] = {
    {3, 3, 3, {3, 4, 5}, {3, 4, 5}, {3, 4, 5}},
    {3, 3, 1, {3, 4, 5}, {3, 4, 5}, {5}},
    {3, 2, 3, {3, 4, 5}, {4, 1}, {3, 1, 5}},
    {3, 0, 3, {3, 4, 5}, {0}, {3, 4, 5}},
    {3, 3, 3, {3, 4, 5}, {1, 4, 1}, {3, 1, 5}},
    {2, 2, 2, {7, 33}, {7, 33}, {1, 33}},
    {2, 2, 2, {40, 70}, {40, 70}, {40, 70}}, /* transposed layouts are walked in tiles */
    {3, 3, 2, {2, 33, 65}, {2, 33, 65}, {33, 65}},
    {1, 1, 1, {0}, {0}, {1}},
};

static void test_binary_float(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-14 : 2e-6;
        for (size_t c = 0; c < sizeof broadcast_cases / sizeof broadcast_cases[0]; c++) {
            const bcase *bc = &broadcast_cases[c];
            ms_tensor *a0 = random_tensor(dtype, bc->a_ndim, bc->a, -2, 2);
            ms_tensor *b0 = random_tensor(dtype, bc->b_ndim, bc->b, 0.5, 2);
            if (b0->numel > 2) /* equal elements exercise eq/le/ge */
                set(b0, 1, get(a0, a0->numel > 1 ? 1 : 0));
            ms_tensor *out0 = make(dtype, bc->out_ndim, bc->out);
            for (int op = MS_ADD; op <= MS_GE; op++)
                for (int layout = 0; layout < LAYOUT_COUNT * LAYOUT_COUNT; layout++) {
                    ms_tensor *a = with_layout(a0, layout % LAYOUT_COUNT);
                    ms_tensor *b = with_layout(b0, layout / LAYOUT_COUNT);
                    ms_tensor *out = with_layout(out0, (layout + 1) % LAYOUT_COUNT);
                    CHECK_OK(ms_binary(out, a, b, op));
                    int ok = 1;
                    for (int64_t i = 0; i < out->numel && ok; i++) {
                        double want = ref_binary(op, get(a0, broadcast_position(a0, out, i)),
                                                 get(b0, broadcast_position(b0, out, i)));
                        ok = close_enough(get(out, i), want, op == MS_POW ? 10 * rtol : rtol, 0);
                    }
                    CHECK_MSG(ok && sentinel_intact(out), "binary op %d %s case %zu layout %d",
                              op, dtype_label(dtype), c, layout);
                    ms_tensor_free(a);
                    ms_tensor_free(b);
                    ms_tensor_free(out);
                }
            ms_tensor_free(a0);
            ms_tensor_free(b0);
            ms_tensor_free(out0);
        }
    }
}

static void test_binary_special(void)
{
    ms_tensor *a = make(MS_F32, 1, SHAPE(4));
    ms_tensor *b = make(MS_F32, 1, SHAPE(4));
    ms_tensor *out = make(MS_F32, 1, SHAPE(4));
    const double av[4] = {NAN, 1, 2, -0.0}, bv[4] = {1, NAN, 1, 0.0};
    for (int i = 0; i < 4; i++) {
        set(a, i, av[i]);
        set(b, i, bv[i]);
    }
    CHECK_OK(ms_binary(out, a, b, MS_MAXIMUM));
    CHECK(isnan(get(out, 0)) && isnan(get(out, 1)) && get(out, 2) == 2);
    CHECK_OK(ms_binary(out, a, b, MS_MINIMUM));
    CHECK(isnan(get(out, 0)) && isnan(get(out, 1)) && get(out, 2) == 1);
    CHECK_OK(ms_binary(out, a, b, MS_EQ));
    CHECK(get(out, 0) == 0 && get(out, 3) == 1); /* NaN != NaN, -0 == 0 */
    /* in place: out aliases a */
    CHECK_OK(ms_binary(a, a, b, MS_ADD));
    CHECK(get(a, 2) == 3);
    ms_tensor_free(a);
    ms_tensor_free(b);
    ms_tensor_free(out);
}

static void test_binary_int(void)
{
    const int dtypes[2] = {MS_I32, MS_I64};
    const int ops[] = {MS_ADD, MS_SUB, MS_MUL, MS_MAXIMUM, MS_MINIMUM, MS_EQ,
                       MS_NE,  MS_LT,  MS_LE,  MS_GT,      MS_GE};
    for (int k = 0; k < 2; k++) {
        ms_tensor *a = make(dtypes[k], 2, SHAPE(3, 4));
        ms_tensor *b0 = make(dtypes[k], 1, SHAPE(4));
        for (int64_t i = 0; i < 12; i++)
            set(a, i, (double)(i * 5 % 7) - 3);
        for (int64_t i = 0; i < 4; i++)
            set(b0, i, (double)i - 1);
        ms_tensor *b = with_layout(b0, LAYOUT_PADDED);
        ms_tensor *out = make(dtypes[k], 2, SHAPE(3, 4));
        for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++) {
            CHECK_OK(ms_binary(out, a, b, ops[o]));
            int ok = 1;
            for (int64_t i = 0; i < 12; i++)
                ok &= get(out, i) == ref_binary(ops[o], get(a, i), get(b0, i % 4));
            CHECK_MSG(ok, "int binary op %d %s", ops[o], dtype_label(dtypes[k]));
        }
        CHECK_ERR(ms_binary(out, a, b, MS_DIV), MS_ERR_DTYPE);
        CHECK_ERR(ms_binary(out, a, b, MS_POW), MS_ERR_DTYPE);
        CHECK_OK(ms_binary_scalar(out, a, 2.0, MS_MUL, 0));
        CHECK(get(out, 5) == 2 * get(a, 5));
        /* integer overflow wraps instead of trapping */
        set(a, 0, dtypes[k] == MS_I32 ? 2147483647.0 : 0);
        if (dtypes[k] == MS_I64)
            ((int64_t *)ms_tensor_data(a))[0] = INT64_MAX;
        CHECK_OK(ms_binary_scalar(out, a, 1.0, MS_ADD, 0));
        CHECK(get(out, 0) < 0);
        ms_tensor_free(a);
        ms_tensor_free(b0);
        ms_tensor_free(b);
        ms_tensor_free(out);
    }
}

static void test_binary_scalar(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-14 : 2e-6;
        ms_tensor *a0 = random_tensor(dtype, 2, SHAPE(5, 6), 0.25, 3);
        ms_tensor *out0 = make(dtype, 2, SHAPE(5, 6));
        const double s = 1.75;
        for (int op = MS_ADD; op <= MS_GE; op++)
            for (int reverse = 0; reverse < 2; reverse++)
                for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                    ms_tensor *a = with_layout(a0, layout);
                    ms_tensor *out = with_layout(out0, (layout + 2) % LAYOUT_COUNT);
                    CHECK_OK(ms_binary_scalar(out, a, s, op, reverse));
                    int ok = 1;
                    for (int64_t i = 0; i < a->numel && ok; i++) {
                        double x = get(a0, i);
                        double want = reverse ? ref_binary(op, s, x) : ref_binary(op, x, s);
                        ok = close_enough(get(out, i), want, 10 * rtol, 0);
                    }
                    CHECK_MSG(ok && sentinel_intact(out), "binary_scalar op %d reverse %d %s %s",
                              op, reverse, dtype_label(dtype), layout_names[layout]);
                    ms_tensor_free(a);
                    ms_tensor_free(out);
                }
        ms_tensor_free(a0);
        ms_tensor_free(out0);
    }
}

static double ref_unary(int op, double x)
{
    switch (op) {
    case MS_NEG: return -x;
    case MS_EXP: return exp(x);
    case MS_LOG: return log(x);
    case MS_SQRT: return sqrt(x);
    case MS_RSQRT: return 1 / sqrt(x);
    case MS_ABS: return fabs(x);
    case MS_TANH: return (exp(2 * x) - 1) / (exp(2 * x) + 1);
    case MS_SIGMOID: return exp(x) / (1 + exp(x));
    case MS_RELU: return x > 0 ? x : 0;
    case MS_GELU: return x * 0.5 * erfc(-x / sqrt(2.0));
    case MS_GELU_TANH:
        return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case MS_SIN: return sin(x);
    case MS_COS: return cos(x);
    case MS_SIGN: return x > 0 ? 1 : x < 0 ? -1 : 0;
    case MS_RECIPROCAL: return 1 / x;
    default: return x * x;
    }
}

static void test_unary(void)
{
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-13 : 4e-6;
        ms_tensor *a0 = random_tensor(dtype, 3, SHAPE(2, 3, 7), -3, 3);
        ms_tensor *positive0 = random_tensor(dtype, 3, SHAPE(2, 3, 7), 0.1, 4);
        ms_tensor *out0 = make(dtype, 3, SHAPE(2, 3, 7));
        for (int op = MS_NEG; op <= MS_SQUARE; op++) {
            int needs_positive = op == MS_LOG || op == MS_SQRT || op == MS_RSQRT;
            const ms_tensor *src0 = needs_positive ? positive0 : a0;
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                ms_tensor *a = with_layout(src0, layout);
                ms_tensor *out = with_layout(out0, (layout + 1) % LAYOUT_COUNT);
                CHECK_OK(ms_unary(out, a, op));
                int ok = 1;
                for (int64_t i = 0; i < a->numel && ok; i++)
                    ok = close_enough(get(out, i), ref_unary(op, get(src0, i)), rtol, 1e-7);
                CHECK_MSG(ok && sentinel_intact(out), "unary op %d %s %s", op,
                          dtype_label(dtype), layout_names[layout]);
                ms_tensor_free(a);
                ms_tensor_free(out);
            }
        }
        /* edge values */
        ms_tensor *edge = make(dtype, 1, SHAPE(4));
        ms_tensor *edge_out = make(dtype, 1, SHAPE(4));
        set(edge, 0, NAN);
        set(edge, 1, -1000);
        set(edge, 2, 1000);
        set(edge, 3, 0);
        CHECK_OK(ms_unary(edge_out, edge, MS_RELU));
        CHECK(isnan(get(edge_out, 0)) && get(edge_out, 1) == 0 && get(edge_out, 2) == 1000);
        CHECK_OK(ms_unary(edge_out, edge, MS_SIGMOID));
        CHECK(isnan(get(edge_out, 0)) && get(edge_out, 1) == 0 && get(edge_out, 2) == 1);
        CHECK_OK(ms_unary(edge_out, edge, MS_SIGN));
        CHECK(get(edge_out, 0) == 0 && get(edge_out, 1) == -1 && get(edge_out, 3) == 0);
        CHECK_OK(ms_unary(edge_out, edge, MS_GELU));
        CHECK(get(edge_out, 1) == 0 && get(edge_out, 2) == 1000);
        CHECK_OK(ms_unary(edge, edge, MS_NEG)); /* in place */
        CHECK(get(edge, 1) == 1000);
        ms_tensor_free(edge);
        ms_tensor_free(edge_out);
        ms_tensor_free(a0);
        ms_tensor_free(positive0);
        ms_tensor_free(out0);
    }
}

/* dx = dy * f'(x), checked against central differences of the f64 forward. */
static void test_unary_backward(void)
{
    const int ops[] = {MS_RELU, MS_GELU, MS_GELU_TANH, MS_TANH, MS_SIGMOID};
    const int64_t shape[2] = {4, 9};
    ms_tensor *x0 = random_tensor(MS_F64, 2, shape, -3, 3);
    ms_tensor *dy0 = random_tensor(MS_F64, 2, shape, -1, 1);
    ms_tensor *dx64 = make(MS_F64, 2, shape);
    ms_tensor *x32 = make(MS_F32, 2, shape), *dy32 = make(MS_F32, 2, shape);
    ms_tensor *dx32 = make(MS_F32, 2, shape);
    CHECK_OK(ms_copy(x32, x0));
    CHECK_OK(ms_copy(dy32, dy0));
    ms_tensor *probe = make(MS_F64, 0, NULL), *probe_out = make(MS_F64, 0, NULL);
    for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++) {
        for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
            ms_tensor *x = with_layout(x0, layout);
            ms_tensor *dy = with_layout(dy0, (layout + 1) % LAYOUT_COUNT);
            ms_tensor *dx = with_layout(dx64, (layout + 2) % LAYOUT_COUNT);
            CHECK_OK(ms_unary_backward(dx, x, dy, ops[o]));
            int ok = 1;
            for (int64_t i = 0; i < x0->numel && ok; i++) {
                const double h = 1e-6;
                double xi = get(x0, i), f_plus, f_minus;
                set(probe, 0, xi + h);
                ms_unary(probe_out, probe, ops[o]);
                f_plus = get(probe_out, 0);
                set(probe, 0, xi - h);
                ms_unary(probe_out, probe, ops[o]);
                f_minus = get(probe_out, 0);
                ok = close_enough(get(dx, i), get(dy0, i) * (f_plus - f_minus) / (2 * h), 1e-6,
                                  1e-8);
            }
            CHECK_MSG(ok && sentinel_intact(dx), "unary_backward op %d %s", ops[o],
                      layout_names[layout]);
            ms_tensor_free(x);
            ms_tensor_free(dy);
            ms_tensor_free(dx);
        }
        CHECK_OK(ms_unary_backward(dx64, x0, dy0, ops[o]));
        CHECK_OK(ms_unary_backward(dx32, x32, dy32, ops[o]));
        int ok = 1;
        for (int64_t i = 0; i < dx32->numel; i++)
            ok &= close_enough(get(dx32, i), get(dx64, i), 1e-5, 1e-6);
        CHECK_MSG(ok, "unary_backward op %d f32 against f64", ops[o]);
    }
    CHECK_OK(ms_unary_backward(dy0, x0, dy0, MS_TANH)); /* dx may alias dy */
    ms_tensor *list[] = {x0, dy0, dx64, x32, dy32, dx32, probe, probe_out};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

/* bf16 and f16 compute in f32 and round once at the store: each result is the f32 result of
 * the same (exactly widened) inputs, rounded by the kernels' conversion. */
static void test_half(void)
{
    const int halves[2] = {MS_BF16, MS_F16};
    for (int k = 0; k < 2; k++) {
        ms_tensor *a = make(halves[k], 2, SHAPE(3, 5)), *b = make(halves[k], 1, SHAPE(5));
        ms_tensor *out = make(halves[k], 2, SHAPE(3, 5)), *exp_out = make(halves[k], 2, SHAPE(3, 5));
        ms_tensor *a32 = make(MS_F32, 2, SHAPE(3, 5)), *b32 = make(MS_F32, 1, SHAPE(5));
        ms_tensor *out32 = make(MS_F32, 2, SHAPE(3, 5)), *exp32 = make(MS_F32, 2, SHAPE(3, 5));
        for (int64_t i = 0; i < 15; i++)
            set(a, i, sin((double)i + 0.3) * 3);
        for (int64_t i = 0; i < 5; i++)
            set(b, i, cos((double)i) + 0.1);
        CHECK_OK(ms_copy(a32, a));
        CHECK_OK(ms_copy(b32, b));
        CHECK_OK(ms_binary(out, a, b, MS_DIV));
        CHECK_OK(ms_binary(out32, a32, b32, MS_DIV));
        CHECK_OK(ms_unary(exp_out, a, MS_EXP));
        CHECK_OK(ms_unary(exp32, a32, MS_EXP));
        int same = 1;
        for (int64_t i = 0; i < 15; i++) {
            float q = (float)get(out32, i), e = (float)get(exp32, i);
            uint16_t want_q = halves[k] == MS_BF16 ? ms_k_f32_to_bf16(q) : ms_k_f32_to_f16(q);
            uint16_t want_e = halves[k] == MS_BF16 ? ms_k_f32_to_bf16(e) : ms_k_f32_to_f16(e);
            same &= *(uint16_t *)elem_ptr(out, i) == want_q;
            same &= *(uint16_t *)elem_ptr(exp_out, i) == want_e;
        }
        CHECK(same);
        ms_tensor *list[] = {a, b, out, exp_out, a32, b32, out32, exp32};
        for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
            ms_tensor_free(list[i]);
    }
}

static void test_errors(void)
{
    ms_tensor *a = make(MS_F32, 2, SHAPE(2, 3));
    ms_tensor *b = make(MS_F32, 2, SHAPE(4, 5));
    ms_tensor *d = make(MS_F64, 2, SHAPE(2, 3));
    ms_tensor *u = make(MS_U8, 2, SHAPE(2, 3));
    CHECK_ERR(ms_binary(a, a, b, MS_ADD), MS_ERR_SHAPE);
    CHECK(strstr(ms_last_error(), "[4, 5]") && strstr(ms_last_error(), "[2, 3]"));
    CHECK_ERR(ms_binary(a, a, d, MS_ADD), MS_ERR_DTYPE);
    CHECK_ERR(ms_binary(d, a, a, MS_ADD), MS_ERR_DTYPE);
    CHECK_ERR(ms_binary(u, u, u, MS_ADD), MS_ERR_DTYPE);
    CHECK_ERR(ms_binary(a, a, a, 13), MS_ERR_INVALID);
    CHECK_ERR(ms_binary(a, a, a, -1), MS_ERR_INVALID);
    CHECK_ERR(ms_binary(NULL, a, a, MS_ADD), MS_ERR_INVALID);
    CHECK_ERR(ms_binary(a, NULL, a, MS_ADD), MS_ERR_INVALID);
    CHECK_ERR(ms_binary_scalar(b, a, 1, MS_ADD, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_binary_scalar(u, u, 1, MS_DIV, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_unary(a, b, MS_EXP), MS_ERR_SHAPE);
    CHECK_ERR(ms_unary(u, u, MS_EXP), MS_ERR_DTYPE);
    CHECK_ERR(ms_unary(a, d, MS_EXP), MS_ERR_DTYPE);
    CHECK_ERR(ms_unary(a, a, 16), MS_ERR_INVALID);
    CHECK_ERR(ms_unary_backward(a, a, a, MS_EXP), MS_ERR_INVALID);
    CHECK_ERR(ms_unary_backward(a, a, b, MS_RELU), MS_ERR_SHAPE);
    CHECK_ERR(ms_unary_backward(a, a, d, MS_RELU), MS_ERR_DTYPE);
    CHECK_ERR(ms_unary_backward(u, u, u, MS_RELU), MS_ERR_DTYPE);
    ms_tensor *list[] = {a, b, d, u};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

int main(void)
{
    test_seed(2);
    test_half();
    test_binary_float();
    test_binary_special();
    test_binary_int();
    test_binary_scalar();
    test_unary();
    test_unary_backward();
    test_errors();
    return check_summary("test_ops_elementwise");
}
