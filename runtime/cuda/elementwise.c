/* moonshard CUDA backend: ms_binary, ms_binary_scalar, ms_unary and ms_unary_backward on a
 * device. Checks match the CPU backend's; outputs are assigned. */
#include "cuda_internal.h"
#include "dispatch.h"
#include "elementwise.cuh"
#include "cpu/cpu.h"
#include "cpu/cast.h"

static const char *const binary_names[] = {"add", "sub", "mul", "div", "maximum", "minimum",
                                           "pow", "eq", "ne", "lt", "le", "gt", "ge"};

static int check_binary_op(const char *opname, int dtype, int op)
{
    if (op < MS_ADD || op > MS_GE)
        return MS_FAIL(MS_ERR_INVALID, "%s: unknown binary op %d (expected 0..%d)", opname, op,
                       MS_GE);
    int is_float = dtype == MS_F32 || dtype == MS_F64;
    int is_int = dtype == MS_I32 || dtype == MS_I64;
    if (!is_float && !(is_int && op != MS_DIV && op != MS_POW))
        return MS_FAIL(MS_ERR_DTYPE, "%s: %s is not defined for dtype %s (f32 and f64 take "
                       "every op; i32 and i64 all but div and pow)", opname, binary_names[op],
                       ms_dtype_name(dtype));
    return MS_OK;
}

int ms_cuda_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("binary", "out", out, &device));
    MS_CHECK(ms_cuda_input("binary", "a", a, &device));
    MS_CHECK(ms_cuda_input("binary", "b", b, &device));
    MS_CHECK(ms_cpu_same_dtype("binary", "a", a, "b", b));
    MS_CHECK(ms_cpu_same_dtype("binary", "out", out, "a", a));
    MS_CHECK(check_binary_op("binary", out->dtype, op));
    ms_cu_shape shape;
    ms_cu_operand o, x, y;
    ms_cuda_shape_of(&shape, out->ndim, out->shape);
    MS_CHECK(ms_cuda_operand(&o, "binary", "out", &shape, out));
    MS_CHECK(ms_cuda_operand(&x, "binary", "a", &shape, a));
    MS_CHECK(ms_cuda_operand(&y, "binary", "b", &shape, b));
    if (shape.numel == 0)
        return MS_OK;
    ms_cu_operand *operands[3] = {&o, &x, &y};
    ms_cuda_coalesce(&shape, operands, 3);
    return ms_cuda_launched("binary", ms_cu_binary(ms_cuda_compute_stream(device), &shape, o, x,
                                                   y, out->dtype, op));
}

int ms_cuda_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("binary_scalar", "out", out, &device));
    MS_CHECK(ms_cuda_input("binary_scalar", "a", a, &device));
    MS_CHECK(ms_cpu_same_dtype("binary_scalar", "out", out, "a", a));
    MS_CHECK(ms_cpu_same_shape("binary_scalar", "out", out, "a", a));
    MS_CHECK(check_binary_op("binary_scalar", out->dtype, op));
    ms_cu_shape shape;
    ms_cu_operand o, x;
    ms_cuda_shape_of(&shape, out->ndim, out->shape);
    MS_CHECK(ms_cuda_operand(&o, "binary_scalar", "out", &shape, out));
    MS_CHECK(ms_cuda_operand(&x, "binary_scalar", "a", &shape, a));
    if (shape.numel == 0)
        return MS_OK;
    ms_cu_operand *operands[2] = {&o, &x};
    ms_cuda_coalesce(&shape, operands, 2);
    int64_t scalar_i = out->dtype == MS_I32 ? ms_cpu_sat_i32(s) : ms_cpu_sat_i64(s);
    return ms_cuda_launched("binary_scalar",
                            ms_cu_binary_scalar(ms_cuda_compute_stream(device), &shape, o, x,
                                                out->dtype, op, s, scalar_i, reverse != 0));
}

int ms_cuda_unary(ms_tensor *out, const ms_tensor *a, int op)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("unary", "out", out, &device));
    MS_CHECK(ms_cuda_input("unary", "a", a, &device));
    MS_CHECK(ms_cpu_float("unary", "a", a));
    MS_CHECK(ms_cpu_same_dtype("unary", "out", out, "a", a));
    MS_CHECK(ms_cpu_same_shape("unary", "out", out, "a", a));
    if (op < MS_NEG || op > MS_SQUARE)
        return MS_FAIL(MS_ERR_INVALID, "unary: unknown unary op %d (expected 0..%d)", op,
                       MS_SQUARE);
    ms_cu_shape shape;
    ms_cu_operand o, x;
    ms_cuda_shape_of(&shape, out->ndim, out->shape);
    MS_CHECK(ms_cuda_operand(&o, "unary", "out", &shape, out));
    MS_CHECK(ms_cuda_operand(&x, "unary", "a", &shape, a));
    if (shape.numel == 0)
        return MS_OK;
    ms_cu_operand *operands[2] = {&o, &x};
    ms_cuda_coalesce(&shape, operands, 2);
    return ms_cuda_launched("unary", ms_cu_unary(ms_cuda_compute_stream(device), &shape, o, x,
                                                 out->dtype, op));
}

int ms_cuda_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op)
{
    const char *name = "unary_backward";
    int device = -1;
    MS_CHECK(ms_cuda_output(name, "dx", dx, &device));
    MS_CHECK(ms_cuda_input(name, "x", x, &device));
    MS_CHECK(ms_cuda_input(name, "dy", dy, &device));
    MS_CHECK(ms_cpu_float(name, "x", x));
    MS_CHECK(ms_cpu_same_dtype(name, "dx", dx, "x", x));
    MS_CHECK(ms_cpu_same_dtype(name, "dy", dy, "x", x));
    MS_CHECK(ms_cpu_same_shape(name, "dx", dx, "x", x));
    MS_CHECK(ms_cpu_same_shape(name, "dy", dy, "x", x));
    if (op != MS_RELU && op != MS_GELU && op != MS_GELU_TANH && op != MS_TANH &&
        op != MS_SIGMOID)
        return MS_FAIL(MS_ERR_INVALID, "%s: op %d has no backward here (relu, gelu, "
                       "gelu_tanh, tanh and sigmoid do)", name, op);
    ms_cu_shape shape;
    ms_cu_operand g, in, grad_out;
    ms_cuda_shape_of(&shape, dx->ndim, dx->shape);
    MS_CHECK(ms_cuda_operand(&g, name, "dx", &shape, dx));
    MS_CHECK(ms_cuda_operand(&in, name, "x", &shape, x));
    MS_CHECK(ms_cuda_operand(&grad_out, name, "dy", &shape, dy));
    if (shape.numel == 0)
        return MS_OK;
    ms_cu_operand *operands[3] = {&g, &in, &grad_out};
    ms_cuda_coalesce(&shape, operands, 3);
    return ms_cuda_launched(name, ms_cu_unary_backward(ms_cuda_compute_stream(device), &shape,
                                                       g, in, grad_out, dx->dtype, op));
}
