/* moonshard runtime: ms_binary, ms_binary_scalar, ms_unary and ms_unary_backward: argument
 * checks, then the kernels of the first tensor's place. */
#include "widen.h"

enum { BINARY_OPS = MS_GE + 1, UNARY_OPS = MS_SQUARE + 1 };

static const char *const binary_names[BINARY_OPS] = {
    "add", "sub", "mul", "div", "maximum", "minimum", "pow",
    "eq",  "ne",  "lt",  "le",  "gt",      "ge"};

static int check_binary_op(const char *opname, int dtype, int op)
{
    if (op < 0 || op >= BINARY_OPS)
        return MS_FAIL(MS_ERR_INVALID, "%s: unknown binary op %d (expected 0..%d)", opname, op,
                       BINARY_OPS - 1);
    int is_float = dtype == MS_F32 || dtype == MS_F64 || ms_is_half(dtype);
    int is_int = dtype == MS_I32 || dtype == MS_I64;
    if (!is_float && !(is_int && op != MS_DIV && op != MS_POW))
        return MS_FAIL(MS_ERR_DTYPE, "%s: %s is not defined for dtype %s (f32, f64, bf16 and "
                       "f16 take every op; i32 and i64 all but div and pow)", opname,
                       binary_names[op], ms_dtype_name(dtype));
    return MS_OK;
}

/* The 16-bit paths, out of line so that the f32 and f64 calls keep a small frame. */
static __attribute__((noinline)) int binary_half(ms_place *place, ms_tensor *out,
                                                 const ms_tensor *a, const ms_tensor *b, int op)
{
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, place, MS_HALF_ELEMENTWISE,
                           3, (const ms_tensor *[]){out, a, b}, "wrr", f));
    return ms_widen_done(&w, place, place->backend->binary(f[0], f[1], f[2], op));
}

static __attribute__((noinline)) int binary_scalar_half(ms_place *place, ms_tensor *out,
                                                        const ms_tensor *a, double s, int op,
                                                        int reverse)
{
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, place, MS_HALF_ELEMENTWISE,
                           2, (const ms_tensor *[]){out, a}, "wr", f));
    return ms_widen_done(&w, place, place->backend->binary_scalar(f[0], f[1], s, op, reverse));
}

static __attribute__((noinline)) int unary_half(ms_place *place, ms_tensor *out,
                                                const ms_tensor *a, int op)
{
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, place, MS_HALF_ELEMENTWISE,
                           2, (const ms_tensor *[]){out, a}, "wr", f));
    return ms_widen_done(&w, place, place->backend->unary(f[0], f[1], op));
}

int ms_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, "binary", "out", out));
    MS_CHECK(ms_check_input(&place, "binary", "a", a));
    MS_CHECK(ms_check_input(&place, "binary", "b", b));
    MS_CHECK(ms_check_same_dtype("binary", "a", a, "b", b));
    MS_CHECK(ms_check_same_dtype("binary", "out", out, "a", a));
    MS_CHECK(check_binary_op("binary", out->dtype, op));
    if (ms_is_half(out->dtype))
        return binary_half(&place, out, a, b, op);
    return place.backend->binary(out, a, b, op);
}

int ms_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, "binary_scalar", "out", out));
    MS_CHECK(ms_check_input(&place, "binary_scalar", "a", a));
    MS_CHECK(ms_check_same_dtype("binary_scalar", "out", out, "a", a));
    MS_CHECK(ms_check_same_shape("binary_scalar", "out", out, "a", a));
    MS_CHECK(check_binary_op("binary_scalar", out->dtype, op));
    if (ms_is_half(out->dtype))
        return binary_scalar_half(&place, out, a, s, op, reverse);
    return place.backend->binary_scalar(out, a, s, op, reverse);
}

int ms_unary(ms_tensor *out, const ms_tensor *a, int op)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, "unary", "out", out));
    MS_CHECK(ms_check_input(&place, "unary", "a", a));
    MS_CHECK(ms_check_float("unary", "a", a));
    MS_CHECK(ms_check_same_dtype("unary", "out", out, "a", a));
    MS_CHECK(ms_check_same_shape("unary", "out", out, "a", a));
    if (op < 0 || op >= UNARY_OPS)
        return MS_FAIL(MS_ERR_INVALID, "unary: unknown unary op %d (expected 0..%d)", op,
                       UNARY_OPS - 1);
    if (ms_is_half(out->dtype))
        return unary_half(&place, out, a, op);
    return place.backend->unary(out, a, op);
}

int ms_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op)
{
    const char *name = "unary_backward";
    ms_place place = ms_place_of(dx);
    MS_CHECK(ms_check_output(&place, name, "dx", dx));
    MS_CHECK(ms_check_input(&place, name, "x", x));
    MS_CHECK(ms_check_input(&place, name, "dy", dy));
    MS_CHECK(ms_check_float(name, "x", x));
    MS_CHECK(ms_check_same_dtype(name, "dx", dx, "x", x));
    MS_CHECK(ms_check_same_dtype(name, "dy", dy, "x", x));
    MS_CHECK(ms_check_same_shape(name, "dx", dx, "x", x));
    MS_CHECK(ms_check_same_shape(name, "dy", dy, "x", x));
    if (op != MS_RELU && op != MS_GELU && op != MS_GELU_TANH && op != MS_TANH &&
        op != MS_SIGMOID)
        return MS_FAIL(MS_ERR_INVALID, "%s: op %d has no backward here (relu, gelu, "
                       "gelu_tanh, tanh and sigmoid do)", name, op);
    if (!ms_is_half(dx->dtype))
        return place.backend->unary_backward(dx, x, dy, op);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_ELEMENTWISE,
                           3, (const ms_tensor *[]){dx, x, dy}, "wrr", f));
    return ms_widen_done(&w, &place, place.backend->unary_backward(f[0], f[1], f[2], op));
}
