/* moonshard CPU backend: ms_binary, ms_binary_scalar, ms_unary and ms_unary_backward.
 * Outputs are assigned (dx of ms_unary_backward is an activation gradient: = not +=). */
#include <math.h>

#include "cpu.h"
#include "activation.h"
#include "cast.h"

/* Each loop has a unit-stride fast path (vectorised), scalar-broadcast fast paths and a
 * strided fallback; the iterator has already merged every dim it could into the run. */

#define BINARY_FN(NAME, T, EXPR)                                                         \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)             \
    {                                                                                    \
        (void)ctx;                                                                       \
        T *out = (T *)p[0];                                                              \
        const T *pa = (const T *)p[1], *pb = (const T *)p[2];                            \
        int64_t so = s[0], sa = s[1], sb = s[2];                                         \
        if (so == 1 && sa == 1 && sb == 1) {                                             \
            for (int64_t i = 0; i < n; i++) {                                            \
                T x = pa[i], y = pb[i];                                                  \
                out[i] = (EXPR);                                                         \
            }                                                                            \
        } else if (so == 1 && sa == 1 && sb == 0) {                                      \
            T y = pb[0];                                                                 \
            for (int64_t i = 0; i < n; i++) {                                            \
                T x = pa[i];                                                             \
                out[i] = (EXPR);                                                         \
            }                                                                            \
        } else if (so == 1 && sa == 0 && sb == 1) {                                      \
            T x = pa[0];                                                                 \
            for (int64_t i = 0; i < n; i++) {                                            \
                T y = pb[i];                                                             \
                out[i] = (EXPR);                                                         \
            }                                                                            \
        } else {                                                                         \
            for (int64_t i = 0; i < n; i++) {                                            \
                T x = pa[i * sa], y = pb[i * sb];                                        \
                out[i * so] = (EXPR);                                                    \
            }                                                                            \
        }                                                                                \
    }

/* maximum and minimum propagate NaN from either side, like torch.maximum. */
#define MAXIMUM(x, y) (((x) > (y) || (x) != (x)) ? (x) : (y))
#define MINIMUM(x, y) (((x) < (y) || (x) != (x)) ? (x) : (y))

#define FLOAT_BINARY(SUF, T, POW)                                \
    BINARY_FN(add_##SUF, T, x + y)                               \
    BINARY_FN(sub_##SUF, T, x - y)                               \
    BINARY_FN(mul_##SUF, T, x * y)                               \
    BINARY_FN(div_##SUF, T, x / y)                               \
    BINARY_FN(maximum_##SUF, T, MAXIMUM(x, y))                   \
    BINARY_FN(minimum_##SUF, T, MINIMUM(x, y))                   \
    BINARY_FN(pow_##SUF, T, POW(x, y))                           \
    BINARY_FN(eq_##SUF, T, (T)(x == y))                          \
    BINARY_FN(ne_##SUF, T, (T)(x != y))                          \
    BINARY_FN(lt_##SUF, T, (T)(x < y))                           \
    BINARY_FN(le_##SUF, T, (T)(x <= y))                          \
    BINARY_FN(gt_##SUF, T, (T)(x > y))                           \
    BINARY_FN(ge_##SUF, T, (T)(x >= y))

FLOAT_BINARY(f32, float, powf)
FLOAT_BINARY(f64, double, pow)

/* Integer arithmetic runs in unsigned so overflow wraps instead of being undefined. */
#define INT_BINARY(SUF, T, U)                                    \
    BINARY_FN(add_##SUF, T, (T)((U)x + (U)y))                    \
    BINARY_FN(sub_##SUF, T, (T)((U)x - (U)y))                    \
    BINARY_FN(mul_##SUF, T, (T)((U)x * (U)y))                    \
    BINARY_FN(maximum_##SUF, T, (x > y ? x : y))                 \
    BINARY_FN(minimum_##SUF, T, (x < y ? x : y))                 \
    BINARY_FN(eq_##SUF, T, (T)(x == y))                          \
    BINARY_FN(ne_##SUF, T, (T)(x != y))                          \
    BINARY_FN(lt_##SUF, T, (T)(x < y))                           \
    BINARY_FN(le_##SUF, T, (T)(x <= y))                          \
    BINARY_FN(gt_##SUF, T, (T)(x > y))                           \
    BINARY_FN(ge_##SUF, T, (T)(x >= y))

INT_BINARY(i32, int32_t, uint32_t)
INT_BINARY(i64, int64_t, uint64_t)

enum { BINARY_OPS = MS_GE + 1, UNARY_OPS = MS_SQUARE + 1 };

#define FLOAT_BINARY_TABLE(SUF)                                                   \
    {add_##SUF, sub_##SUF, mul_##SUF, div_##SUF, maximum_##SUF, minimum_##SUF,    \
     pow_##SUF, eq_##SUF, ne_##SUF, lt_##SUF, le_##SUF, gt_##SUF, ge_##SUF}
/* Integer division and pow are left out: division by zero traps. */
#define INT_BINARY_TABLE(SUF)                                                     \
    {add_##SUF, sub_##SUF, mul_##SUF, NULL, maximum_##SUF, minimum_##SUF,         \
     NULL, eq_##SUF, ne_##SUF, lt_##SUF, le_##SUF, gt_##SUF, ge_##SUF}

static const ms_iter_fn binary_f32[BINARY_OPS] = FLOAT_BINARY_TABLE(f32);
static const ms_iter_fn binary_f64[BINARY_OPS] = FLOAT_BINARY_TABLE(f64);
static const ms_iter_fn binary_i32[BINARY_OPS] = INT_BINARY_TABLE(i32);
static const ms_iter_fn binary_i64[BINARY_OPS] = INT_BINARY_TABLE(i64);

static int is_half(int dtype) { return dtype == MS_BF16 || dtype == MS_F16; }

/* The loop for a (dtype, op) that ms_binary accepted (bf16 and f16: the f32 loop, run
 * through ms_cpu_half_run). */
static ms_iter_fn binary_fn(int dtype, int op)
{
    switch (dtype) {
    case MS_F32:
    case MS_BF16:
    case MS_F16: return binary_f32[op];
    case MS_F64: return binary_f64[op];
    case MS_I32: return binary_i32[op];
    default: return binary_i64[op];
    }
}

/* Element operations per element, as the worker pool weighs them: a transcendental
 * function costs about as much as a handful of loads, stores and adds. */
enum { CHEAP = 1, TRANSCENDENTAL = 8 };

/* Run fn (the f32 loop for 16-bit operands) over the iterator's operands, in any order,
 * each element weighing cost operations for the worker pool. */
static void run_any_order(ms_iter *it, ms_iter_fn fn, int dtype, unsigned f32_operands, int cost)
{
    it->any_order = 1;
    it->cost = cost;
    ms_half_run half = {fn, NULL, dtype, it->nops, f32_operands};
    if (is_half(dtype))
        ms_iter_run(it, ms_cpu_half_run, &half);
    else
        ms_iter_run(it, fn, NULL);
}

static int unary_cost(int op)
{
    switch (op) {
    case MS_EXP: case MS_LOG: case MS_TANH: case MS_SIGMOID: case MS_GELU: case MS_GELU_TANH:
    case MS_SIN: case MS_COS:
        return TRANSCENDENTAL;
    default:
        return CHEAP;
    }
}

/* Run fn over out and its inputs (tensors[0] is out; all have its shape) in any order. */
static int run_pointwise(const char *op, ms_iter_fn fn, int cost, int count,
                         const char *const names[], const ms_tensor *const tensors[])
{
    ms_iter it;
    ms_iter_begin(&it, tensors[0]->ndim, tensors[0]->shape);
    for (int i = 0; i < count; i++)
        MS_CHECK(ms_iter_tensor(&it, op, names[i], tensors[i]));
    run_any_order(&it, fn, tensors[0]->dtype, 0, cost);
    return MS_OK;
}

int ms_cpu_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op)
{
    static const char *const names[] = {"out", "a", "b"};
    return run_pointwise("binary", binary_fn(out->dtype, op),
                         op == MS_POW ? TRANSCENDENTAL : CHEAP, 3, names,
                         (const ms_tensor *const[]){out, a, b});
}

int ms_cpu_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse)
{
    ms_iter_fn fn = binary_fn(out->dtype, op);
    union { float f32; double f64; int32_t i32; int64_t i64; } scalar;
    switch (out->dtype) {
    case MS_F32:
    case MS_BF16:
    case MS_F16: scalar.f32 = (float)s; break;
    case MS_F64: scalar.f64 = s; break;
    case MS_I32: scalar.i32 = ms_sat_i32(s); break;
    default: scalar.i64 = ms_sat_i64(s); break;
    }
    size_t scalar_size = is_half(out->dtype) ? sizeof(float) : ms_dtype_size(out->dtype);
    ms_iter it;
    ms_iter_begin(&it, out->ndim, out->shape);
    MS_CHECK(ms_iter_tensor(&it, "binary_scalar", "out", out));
    if (reverse) {
        ms_iter_raw(&it, &scalar, scalar_size, NULL);
        MS_CHECK(ms_iter_tensor(&it, "binary_scalar", "a", a));
    } else {
        MS_CHECK(ms_iter_tensor(&it, "binary_scalar", "a", a));
        ms_iter_raw(&it, &scalar, scalar_size, NULL);
    }
    run_any_order(&it, fn, out->dtype, reverse ? 1u << 1 : 1u << 2,
                  op == MS_POW ? TRANSCENDENTAL : CHEAP);
    return MS_OK;
}

/* ---- unary ---- */

#define UNARY_FN(NAME, T, EXPR)                                                          \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)             \
    {                                                                                    \
        (void)ctx;                                                                       \
        T *out = (T *)p[0];                                                              \
        const T *pa = (const T *)p[1];                                                   \
        int64_t so = s[0], sa = s[1];                                                    \
        if (so == 1 && sa == 1) {                                                        \
            for (int64_t i = 0; i < n; i++) {                                            \
                T x = pa[i];                                                             \
                out[i] = (EXPR);                                                         \
            }                                                                            \
        } else {                                                                         \
            for (int64_t i = 0; i < n; i++) {                                            \
                T x = pa[i * sa];                                                        \
                out[i * so] = (EXPR);                                                    \
            }                                                                            \
        }                                                                                \
    }

/* sign is (0 < x) - (x < 0) as in PyTorch: 0 for zeros and NaN. */
#define FLOAT_UNARY(SUF, T, EXP, LOG, SQRT, FABS, SIN, COS)                         \
    UNARY_FN(neg_##SUF, T, -x)                                                      \
    UNARY_FN(exp_##SUF, T, EXP(x))                                                  \
    UNARY_FN(log_##SUF, T, LOG(x))                                                  \
    UNARY_FN(sqrt_##SUF, T, SQRT(x))                                                \
    UNARY_FN(rsqrt_##SUF, T, (T)1 / SQRT(x))                                        \
    UNARY_FN(abs_##SUF, T, FABS(x))                                                 \
    UNARY_FN(tanh_##SUF, T, ms_k_tanh_##SUF(x))                                     \
    UNARY_FN(sigmoid_##SUF, T, ms_k_sigmoid_##SUF(x))                               \
    UNARY_FN(relu_##SUF, T, ms_k_relu_##SUF(x))                                     \
    UNARY_FN(gelu_##SUF, T, ms_k_gelu_##SUF(x))                                     \
    UNARY_FN(gelu_tanh_##SUF, T, ms_k_gelu_tanh_##SUF(x))                           \
    UNARY_FN(sin_##SUF, T, SIN(x))                                                  \
    UNARY_FN(cos_##SUF, T, COS(x))                                                  \
    UNARY_FN(sign_##SUF, T, (T)((x > 0) - (x < 0)))                                 \
    UNARY_FN(reciprocal_##SUF, T, (T)1 / x)                                         \
    UNARY_FN(square_##SUF, T, x * x)

FLOAT_UNARY(f32, float, ms_k_expf, logf, sqrtf, fabsf, sinf, cosf)
FLOAT_UNARY(f64, double, exp, log, sqrt, fabs, sin, cos)

#define UNARY_TABLE(SUF)                                                                 \
    {neg_##SUF, exp_##SUF, log_##SUF, sqrt_##SUF, rsqrt_##SUF, abs_##SUF, tanh_##SUF,     \
     sigmoid_##SUF, relu_##SUF, gelu_##SUF, gelu_tanh_##SUF, sin_##SUF, cos_##SUF,        \
     sign_##SUF, reciprocal_##SUF, square_##SUF}

static const ms_iter_fn unary_f32[UNARY_OPS] = UNARY_TABLE(f32);
static const ms_iter_fn unary_f64[UNARY_OPS] = UNARY_TABLE(f64);

int ms_cpu_unary(ms_tensor *out, const ms_tensor *a, int op)
{
    static const char *const names[] = {"out", "a"};
    return run_pointwise("unary", out->dtype == MS_F64 ? unary_f64[op] : unary_f32[op],
                         unary_cost(op), 2, names,
                         (const ms_tensor *const[]){out, a});
}

/* ---- unary backward: dx = dy * f'(x) ---- */

#define BACKWARD_FN(NAME, T, FN)                                                         \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)             \
    {                                                                                    \
        (void)ctx;                                                                       \
        T *dx = (T *)p[0];                                                               \
        const T *px = (const T *)p[1], *pdy = (const T *)p[2];                           \
        int64_t sdx = s[0], sx = s[1], sdy = s[2];                                       \
        if (sdx == 1 && sx == 1 && sdy == 1) {                                           \
            for (int64_t i = 0; i < n; i++)                                              \
                dx[i] = FN(px[i], pdy[i]);                                               \
        } else {                                                                         \
            for (int64_t i = 0; i < n; i++)                                              \
                dx[i * sdx] = FN(px[i * sx], pdy[i * sdy]);                              \
        }                                                                                \
    }

#define FLOAT_BACKWARD(SUF, T)                                                  \
    BACKWARD_FN(relu_backward_##SUF, T, ms_k_relu_backward_##SUF)               \
    BACKWARD_FN(gelu_backward_##SUF, T, ms_k_gelu_backward_##SUF)               \
    BACKWARD_FN(gelu_tanh_backward_##SUF, T, ms_k_gelu_tanh_backward_##SUF)     \
    BACKWARD_FN(tanh_backward_##SUF, T, ms_k_tanh_backward_##SUF)               \
    BACKWARD_FN(sigmoid_backward_##SUF, T, ms_k_sigmoid_backward_##SUF)

FLOAT_BACKWARD(f32, float)
FLOAT_BACKWARD(f64, double)

/* The loop for an op that ms_unary_backward accepted. */
static ms_iter_fn backward_fn(int dtype, int op)
{
    int f32 = dtype != MS_F64;
    switch (op) {
    case MS_RELU: return f32 ? relu_backward_f32 : relu_backward_f64;
    case MS_GELU: return f32 ? gelu_backward_f32 : gelu_backward_f64;
    case MS_GELU_TANH: return f32 ? gelu_tanh_backward_f32 : gelu_tanh_backward_f64;
    case MS_TANH: return f32 ? tanh_backward_f32 : tanh_backward_f64;
    default: return f32 ? sigmoid_backward_f32 : sigmoid_backward_f64;
    }
}

int ms_cpu_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op)
{
    static const char *const names[] = {"dx", "x", "dy"};
    return run_pointwise("unary_backward", backward_fn(dx->dtype, op),
                         op == MS_RELU ? CHEAP : TRANSCENDENTAL, 3, names,
                         (const ms_tensor *const[]){dx, x, dy});
}
