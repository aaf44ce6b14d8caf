/* moonshard CUDA backend: ms_rand_uniform, ms_rand_normal, ms_dropout and
 * ms_dropout_backward on a device, after the checks of runtime/ops/; dx is assigned. */
#include "cuda_internal.h"
#include "random.cuh"

typedef int (*draw_launch)(cudaStream_t, const ms_cu_shape *, ms_cu_operand,
                           const ms_cu_draw *);

static int draw(const char *op, ms_tensor *out, int device, ms_cu_draw *d, draw_launch launch)
{
    if (out->numel == 0)
        return MS_OK;
    ms_cu_shape shape;
    ms_cu_operand o;
    ms_cuda_shape_of(&shape, out->ndim, out->shape);
    MS_CHECK(ms_cuda_operand(&o, op, "out", &shape, out));
    d->dtype = out->dtype;
    return ms_cuda_launched(op, launch(ms_cuda_compute_stream(device), &shape, o, d));
}

int ms_cuda_rand_uniform(ms_tensor *out, double low, double high, uint64_t seed,
                         uint64_t offset)
{
    ms_cu_draw d = {seed, offset, low, high, 0};
    return draw("rand_uniform", out, ms_cuda_device_of(out), &d, ms_cu_rand_uniform);
}

int ms_cuda_rand_normal(ms_tensor *out, double mean, double std, uint64_t seed,
                        uint64_t offset)
{
    ms_cu_draw d = {seed, offset, mean, std, 0};
    return draw("rand_normal", out, ms_cuda_device_of(out), &d, ms_cu_rand_normal);
}

static int dropout_run(const char *op, ms_tensor *out, const char *out_name,
                       const ms_tensor *x, const char *x_name, double p, uint64_t seed,
                       uint64_t offset)
{
    int device = ms_cuda_device_of(out);
    if (out->numel == 0)
        return MS_OK;
    /* p == 1 drops everything; the scale is never applied */
    ms_cu_draw d = {seed, offset, p, p < 1.0 ? 1.0 / (1.0 - p) : 0.0, out->dtype};
    ms_cu_shape shape;
    ms_cu_operand o, in;
    ms_cuda_shape_of(&shape, out->ndim, out->shape);
    MS_CHECK(ms_cuda_operand(&o, op, out_name, &shape, out));
    MS_CHECK(ms_cuda_operand(&in, op, x_name, &shape, x));
    return ms_cuda_launched(op, ms_cu_dropout(ms_cuda_compute_stream(device), &shape, o, in, &d));
}

int ms_cuda_dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed,
                    uint64_t offset)
{
    return dropout_run("dropout", out, "out", x, "x", p, seed, offset);
}

int ms_cuda_dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                             uint64_t offset)
{
    return dropout_run("dropout_backward", dx, "dx", dy, "dy", p, seed, offset);
}
