/* moonshard CUDA backend: copy on one device (any strides, every dtype pair), fill, arange,
 * and dense staging for the kernels that want contiguous operands. */
#include "cuda_internal.h"
#include "copy.cuh"
#include "cast.h"

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
    if (!ms_broadcasts(src, dst) && src->numel == dst->numel) {
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

int ms_cuda_fill(ms_tensor *t, double value)
{
    int device = ms_cuda_device_of(t);
    if (t->numel == 0)
        return MS_OK;
    uint64_t element = 0;
    ms_store_double(t->dtype, &element, value);
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
    int device = ms_cuda_device_of(t);
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

int ms_cuda_dense(const char *op, const ms_tensor *t, int copy_in, ms_tensor **dense)
{
    (void)op;
    *dense = (ms_tensor *)t;
    if (!t || ms_tensor_is_contiguous(t))
        return MS_OK;
    MS_CHECK(ms_cuda_tensor_new(dense, t->dtype, t->ndim, t->shape, t->storage->pool));
    if (copy_in) {
        int status = ms_cuda_copy_device(*dense, t);
        if (status != MS_OK) {
            ms_tensor_free(*dense);
            *dense = NULL;
            return status;
        }
    }
    return MS_OK;
}

int ms_cuda_dense_done(const ms_tensor *t, ms_tensor *dense, int write_back)
{
    if (!dense || dense == t)
        return MS_OK;
    int status = write_back ? ms_cuda_copy_device((ms_tensor *)t, dense) : MS_OK;
    ms_tensor_free(dense);
    return status;
}

void *ms_cuda_stage(ms_cuda_staging *st, const char *op, const ms_tensor *t, int copy_in,
                    int is_output)
{
    if (!t || st->status != MS_OK)
        return NULL;
    if (st->count == MS_CUDA_STAGED) {
        st->status = MS_FAIL(MS_ERR_INVALID, "%s: more than %d operands to stage", op,
                             MS_CUDA_STAGED);
        return NULL;
    }
    int i = st->count++;
    st->tensors[i] = t;
    st->is_output[i] = is_output;
    st->status = ms_cuda_dense(op, t, copy_in, &st->dense[i]);
    return st->status == MS_OK ? ms_tensor_data(st->dense[i]) : NULL;
}

int ms_cuda_unstage_all(ms_cuda_staging *st)
{
    for (int i = 0; i < st->count; i++) {
        int status = ms_cuda_dense_done(st->tensors[i], st->dense[i],
                                        st->is_output[i] && st->status == MS_OK);
        if (st->status == MS_OK)
            st->status = status;
    }
    return st->status;
}
