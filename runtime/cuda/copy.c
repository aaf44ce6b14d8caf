/* moonshard CUDA backend: ms_copy on and between devices (and to and from cpu/host, staged
 * through a dense host block when layouts or dtypes differ), ms_fill, ms_arange, ms_equal
 * and ms_allclose. Every output is assigned. */
#include <stdlib.h>

#include "cuda_internal.h"
#include "dispatch.h"
#include "copy.cuh"
#include "cpu/cast.h"

static int same_shape(const ms_tensor *a, const ms_tensor *b)
{
    if (a->ndim != b->ndim)
        return 0;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d])
            return 0;
    return 1;
}

static int broadcasts(const ms_tensor *src, const ms_tensor *dst)
{
    int lead = dst->ndim - src->ndim;
    if (lead < 0)
        return 0;
    for (int d = 0; d < src->ndim; d++)
        if (src->shape[d] != 1 && src->shape[d] != dst->shape[lead + d])
            return 0;
    return 1;
}

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
    if (!broadcasts(src, dst) && src->numel == dst->numel) {
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

/* A dense host tensor outside every pool (staging must not move the pools' statistics). */
typedef struct host_block {
    ms_storage storage;
    ms_tensor tensor;
} host_block;

static int host_block_make(host_block *block, int dtype, int ndim, const int64_t *shape)
{
    *block = (host_block){0};
    block->tensor.storage = &block->storage;
    block->tensor.dtype = dtype;
    block->tensor.ndim = ndim;
    block->tensor.numel = 1;
    for (int d = 0; d < ndim; d++) {
        block->tensor.shape[d] = shape[d];
        block->tensor.numel *= shape[d];
    }
    ms_contiguous_strides(ndim, block->tensor.shape, block->tensor.strides);
    block->storage.nbytes = (size_t)block->tensor.numel * ms_dtype_size(dtype);
    block->storage.pool = MS_POOL_CPU;
    block->storage.refcount = 1;
    block->storage.data = malloc(block->storage.nbytes ? block->storage.nbytes : 1);
    if (!block->storage.data)
        return MS_FAIL(MS_ERR_OOM, "copy: out of host memory for %zu bytes of staging",
                       block->storage.nbytes);
    return MS_OK;
}

/* Bytes between host memory and a dense device tensor, finished before returning. */
static int transfer(int device, void *to, const void *from, size_t nbytes,
                    enum cudaMemcpyKind kind)
{
    if (nbytes == 0)
        return MS_OK;
    cudaStream_t stream = ms_cuda_compute_stream(device);
    MS_CUDA_CHECK(cudaMemcpyAsync(to, from, nbytes, kind, stream), "copy: cudaMemcpyAsync");
    MS_CUDA_CHECK(cudaStreamSynchronize(stream), "copy: waiting for the transfer");
    return MS_OK;
}

static int host_to_device(ms_tensor *dst, const ms_tensor *src, int device)
{
    MS_CHECK(ms_cuda_output("copy", "dst", dst, &device));
    host_block staging = {0};
    const ms_tensor *dense_src = src;
    int direct = src->dtype == dst->dtype && src->numel == dst->numel &&
                 ms_tensor_is_contiguous(src) && src->storage->data;
    if (!direct) {
        MS_CHECK(host_block_make(&staging, dst->dtype, dst->ndim, dst->shape));
        int status = ms_copy(&staging.tensor, src);
        if (status != MS_OK) {
            free(staging.storage.data);
            return status;
        }
        dense_src = &staging.tensor;
    }
    ms_tensor *dense_dst = NULL;
    int status = ms_cuda_dense("copy", dst, 0, &dense_dst);
    if (status == MS_OK)
        status = transfer(device, ms_tensor_data(dense_dst), ms_tensor_data(dense_src),
                          ms_tensor_nbytes(dst), cudaMemcpyHostToDevice);
    int done = ms_cuda_dense_done(dst, dense_dst, status == MS_OK);
    free(staging.storage.data);
    return status != MS_OK ? status : done;
}

static int device_to_host(ms_tensor *dst, const ms_tensor *src, int device)
{
    MS_CHECK(ms_cuda_input("copy", "src", src, &device));
    MS_CHECK(ms_check_tensor("copy", "dst", dst));
    ms_tensor *dense_src = NULL;
    MS_CHECK(ms_cuda_dense("copy", src, 1, &dense_src));
    int direct = src->dtype == dst->dtype && src->numel == dst->numel &&
                 ms_tensor_is_contiguous(dst) && dst->storage->data;
    host_block staging = {0};
    int status = MS_OK;
    if (direct) {
        status = transfer(device, ms_tensor_data(dst), ms_tensor_data(dense_src),
                          ms_tensor_nbytes(src), cudaMemcpyDeviceToHost);
    } else {
        status = host_block_make(&staging, src->dtype, src->ndim, src->shape);
        if (status == MS_OK)
            status = transfer(device, staging.storage.data, ms_tensor_data(dense_src),
                              ms_tensor_nbytes(src), cudaMemcpyDeviceToHost);
        if (status == MS_OK)
            status = ms_copy(dst, &staging.tensor);
        free(staging.storage.data);
    }
    ms_cuda_dense_done(src, dense_src, 0);
    return status;
}

/* Different devices: contiguous bytes of one dtype only. */
static int device_to_device(ms_tensor *dst, const ms_tensor *src)
{
    int dst_device = -1, src_device = -1;
    MS_CHECK(ms_cuda_output("copy", "dst", dst, &dst_device));
    MS_CHECK(ms_cuda_input("copy", "src", src, &src_device));
    if (src->dtype != dst->dtype || src->numel != dst->numel ||
        !ms_tensor_is_contiguous(src) || !ms_tensor_is_contiguous(dst))
        return MS_FAIL(MS_ERR_UNSUPPORTED, "copy: between cuda:%d and cuda:%d only contiguous "
                       "tensors of one dtype and size copy; convert on one device first",
                       src_device, dst_device);
    MS_CUDA_CHECK(cudaMemcpyPeer(ms_tensor_data(dst), dst_device, ms_tensor_data(src),
                                 src_device, ms_tensor_nbytes(dst)), "copy: cudaMemcpyPeer");
    return MS_OK;
}

int ms_cuda_copy(ms_tensor *dst, const ms_tensor *src)
{
    MS_CHECK(ms_check_tensor("copy", "dst", dst));
    MS_CHECK(ms_check_tensor("copy", "src", src));
    if (!broadcasts(src, dst) && src->numel != dst->numel) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "copy: src of shape %s does not broadcast to dst %s and "
                       "has a different number of elements",
                       ms_shape_str(a, sizeof a, src->ndim, src->shape),
                       ms_shape_str(b, sizeof b, dst->ndim, dst->shape));
    }
    if (!ms_on_device(src))
        return host_to_device(dst, src, -1);
    if (!ms_on_device(dst))
        return device_to_host(dst, src, -1);
    if (dst->storage->pool != src->storage->pool)
        return device_to_device(dst, src);
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

/* Run a comparison kernel into a device flag that starts at 1; [OUT] *result. */
typedef int (*compare_launch)(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                              ms_cu_operand b, const void *args, int32_t *flag);

static int compare(const char *op, const ms_tensor *a, const ms_tensor *b, int device,
                   compare_launch launch, const void *args, int *result)
{
    ms_cu_shape shape;
    ms_cu_operand in_a, in_b;
    ms_cuda_shape_of(&shape, a->ndim, a->shape);
    MS_CHECK(ms_cuda_operand(&in_a, op, "a", &shape, a));
    MS_CHECK(ms_cuda_operand(&in_b, op, "b", &shape, b));
    ms_cu_operand *operands[2] = {&in_a, &in_b};
    ms_cuda_coalesce(&shape, operands, 2);
    ms_tensor *flag = NULL;
    MS_CHECK(ms_cuda_tensor_new(&flag, MS_I32, 0, NULL, a->storage->pool));
    int32_t host_flag = 1;
    cudaStream_t stream = ms_cuda_compute_stream(device);
    int status = MS_CUDA_STATUS(cudaMemcpyAsync(ms_tensor_data(flag), &host_flag,
                                                sizeof host_flag, cudaMemcpyHostToDevice,
                                                stream), op);
    if (status == MS_OK)
        status = ms_cuda_launched(op, launch(stream, &shape, in_a, in_b, args,
                                             ms_tensor_data(flag)));
    if (status == MS_OK)
        status = transfer(device, &host_flag, ms_tensor_data(flag), sizeof host_flag,
                          cudaMemcpyDeviceToHost);
    ms_tensor_free(flag);
    if (status == MS_OK)
        *result = host_flag;
    return status;
}

static int launch_equal(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                        ms_cu_operand b, const void *args, int32_t *flag)
{
    return ms_cu_equal(stream, shape, a, b, *(const size_t *)args, flag);
}

int ms_cuda_equal(int *equal, const ms_tensor *a, const ms_tensor *b)
{
    if (!equal)
        return MS_FAIL(MS_ERR_INVALID, "equal: the result pointer must not be NULL");
    *equal = 0;
    int device = -1;
    MS_CHECK(ms_cuda_input("equal", "a", a, &device));
    MS_CHECK(ms_cuda_input("equal", "b", b, &device));
    if (a->dtype != b->dtype || !same_shape(a, b))
        return MS_OK;
    if (a->numel == 0) {
        *equal = 1;
        return MS_OK;
    }
    size_t elem_size = ms_dtype_size(a->dtype);
    return compare("equal", a, b, device, launch_equal, &elem_size, equal);
}

typedef struct close_args {
    int a_dtype, b_dtype;
    double rtol, atol;
} close_args;

static int launch_close(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                        ms_cu_operand b, const void *args, int32_t *flag)
{
    const close_args *c = args;
    return ms_cu_allclose(stream, shape, a, c->a_dtype, b, c->b_dtype, c->rtol, c->atol, flag);
}

int ms_cuda_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                     double atol)
{
    if (!close)
        return MS_FAIL(MS_ERR_INVALID, "allclose: the result pointer must not be NULL");
    *close = 0;
    int device = -1;
    MS_CHECK(ms_cuda_input("allclose", "a", a, &device));
    MS_CHECK(ms_cuda_input("allclose", "b", b, &device));
    if (!(rtol >= 0.0) || !(atol >= 0.0))
        return MS_FAIL(MS_ERR_INVALID, "allclose: rtol %g and atol %g must be >= 0", rtol,
                       atol);
    if (!same_shape(a, b))
        return MS_OK;
    if (a->numel == 0) {
        *close = 1;
        return MS_OK;
    }
    close_args args = {a->dtype, b->dtype, rtol, atol};
    return compare("allclose", a, b, device, launch_close, &args, close);
}
