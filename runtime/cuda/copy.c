/* moonshard CUDA backend: ms_copy (on one device here; to and from cpu/host and between
 * devices in transfer.c), ms_fill and ms_arange. Every output is assigned. */
#include "cuda_internal.h"
#include "dispatch.h"
#include "copy.cuh"
#include "cpu/cpu.h"
#include "cpu/cast.h"

/* dst = src on one device; src broadcasts to dst, or has dst's numel and is read in
 * row-major order (a reshaping copy). */
static int copy_on_device(ms_tensor *dst, const ms_tensor *src, int device)
{
    if (dst->numel == 0)
        return MS_OK;
    ms_cu_shape shape;
    ms_cuda_shape_of(&shape, dst->ndim, dst->shape);
    ms_cu_operand out, in;
    MS_CHECK(ms_cuda_operand(&out, "copy", "dst", &shape, dst));
    ms_tensor *dense = NULL;
    if (!ms_cpu_broadcasts(src, dst) && src->numel == dst->numel) {
        MS_CHECK(ms_cuda_dense("copy", src, 1, &dense));
        in.data = ms_tensor_data(dense);
        ms_contiguous_strides(dst->ndim, dst->shape, in.strides);
    } else {
        MS_CHECK(ms_cuda_operand(&in, "copy", "src", &shape, src));
    }
    ms_cu_operand *operands[2] = {&out, &in};
    ms_cuda_coalesce(&shape, operands, 2);
    int status = ms_cuda_launched("copy", ms_cu_copy(ms_cuda_compute_stream(device), &shape,
                                                     out, dst->dtype, in, src->dtype));
    if (dense != src)
        ms_tensor_free(dense);
    return status;
}

int ms_cuda_copy_device(ms_tensor *dst, const ms_tensor *src)
{
    return copy_on_device(dst, src, dst->storage->pool - MS_POOL_CUDA0);
}

int ms_cuda_copy(ms_tensor *dst, const ms_tensor *src)
{
    MS_CHECK(ms_check_tensor("copy", "dst", dst));
    MS_CHECK(ms_check_tensor("copy", "src", src));
    if (!ms_cpu_broadcasts(src, dst) && src->numel != dst->numel) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "copy: src of shape %s does not broadcast to dst %s and "
                       "has a different number of elements",
                       ms_shape_str(a, sizeof a, src->ndim, src->shape),
                       ms_shape_str(b, sizeof b, dst->ndim, dst->shape));
    }
    if (!ms_on_device(src) || !ms_on_device(dst) || dst->storage->pool != src->storage->pool)
        return ms_cuda_copy_across(dst, src);
    int device = -1;
    MS_CHECK(ms_cuda_output("copy", "dst", dst, &device));
    MS_CHECK(ms_cuda_input("copy", "src", src, &device));
    return copy_on_device(dst, src, device);
}

int ms_cuda_fill(ms_tensor *t, double value)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("fill", "t", t, &device));
    if (t->numel == 0)
        return MS_OK;
    uint64_t element = 0;
    ms_cpu_store_double(t->dtype, &element, value);
    ms_cu_shape shape;
    ms_cu_operand out;
    ms_cuda_shape_of(&shape, t->ndim, t->shape);
    MS_CHECK(ms_cuda_operand(&out, "fill", "t", &shape, t));
    ms_cu_operand *operands[1] = {&out};
    ms_cuda_coalesce(&shape, operands, 1);
    return ms_cuda_launched("fill", ms_cu_fill(ms_cuda_compute_stream(device), &shape, out,
                                               ms_dtype_size(t->dtype), element));
}

static int is_int64(double v)
{
    return v == v && v >= -9.2e18 && v <= 9.2e18 && v == (double)(int64_t)v;
}

int ms_cuda_arange(ms_tensor *t, double start, double step)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("arange", "t", t, &device));
    if (t->numel == 0)
        return MS_OK;
    int exact_int = is_int64(start) && is_int64(step);
    ms_cu_shape shape;
    ms_cu_operand out;
    ms_cuda_shape_of(&shape, t->ndim, t->shape);
    MS_CHECK(ms_cuda_operand(&out, "arange", "t", &shape, t));
    return ms_cuda_launched("arange", ms_cu_arange(ms_cuda_compute_stream(device), &shape, out,
                                                   t->dtype, start, step, exact_int,
                                                   exact_int ? (int64_t)start : 0,
                                                   exact_int ? (int64_t)step : 0));
}
