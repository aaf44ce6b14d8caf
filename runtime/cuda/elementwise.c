/* moonshard CUDA backend: ms_binary, ms_binary_scalar, ms_unary and ms_unary_backward on a
 * device, after the checks of runtime/ops/; outputs are assigned. */
#include "cuda_internal.h"
#include "elementwise.cuh"
#include "cast.h"

int ms_cuda_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op)
{
    int device = ms_cuda_device_of(out);
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
    int device = ms_cuda_device_of(out);
    ms_cu_shape shape;
    ms_cu_operand o, x;
    ms_cuda_shape_of(&shape, out->ndim, out->shape);
    MS_CHECK(ms_cuda_operand(&o, "binary_scalar", "out", &shape, out));
    MS_CHECK(ms_cuda_operand(&x, "binary_scalar", "a", &shape, a));
    if (shape.numel == 0)
        return MS_OK;
    ms_cu_operand *operands[2] = {&o, &x};
    ms_cuda_coalesce(&shape, operands, 2);
    int64_t scalar_i = out->dtype == MS_I32 ? ms_sat_i32(s) : ms_sat_i64(s);
    return ms_cuda_launched("binary_scalar",
                            ms_cu_binary_scalar(ms_cuda_compute_stream(device), &shape, o, x,
                                                out->dtype, op, s, scalar_i, reverse != 0));
}

int ms_cuda_unary(ms_tensor *out, const ms_tensor *a, int op)
{
    int device = ms_cuda_device_of(out);
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
    int device = ms_cuda_device_of(dx);
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
