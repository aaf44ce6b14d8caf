/* moonshard CUDA backend: operand checks with messages naming the op and argument, the
 * launch geometry built from tensor views, and dense staging for row-wise kernels. */
#include "cuda_internal.h"

static int check_device_tensor(const char *op, const char *name, const ms_tensor *t,
                               int *device)
{
    MS_CHECK(ms_check_tensor(op, name, t));
    if (t->ndim < 0 || t->ndim > MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s has ndim %d outside [0, %d]", op, name, t->ndim,
                       MS_MAX_DIMS);
    int pool = t->storage->pool;
    if (pool < MS_POOL_CUDA0 || pool >= MS_MAX_POOLS)
        return MS_FAIL(MS_ERR_DEVICE, "%s: %s lives on %s but the other operands are on "
                       "cuda:%d; move it with :to() first", op, name,
                       ms_pool_name(pool) ? ms_pool_name(pool) : "an unknown pool",
                       *device >= 0 ? *device : 0);
    int its_device = pool - MS_POOL_CUDA0;
    if (*device >= 0 && its_device != *device)
        return MS_FAIL(MS_ERR_DEVICE, "%s: %s lives on cuda:%d but the other operands are on "
                       "cuda:%d", op, name, its_device, *device);
    if (t->numel > 0 && !t->storage->data)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s has %lld elements but no data", op, name,
                       (long long)t->numel);
    if (*device < 0)
        MS_CHECK(ms_cuda_use_device(its_device));
    *device = its_device;
    return ms_cuda_await(t);
}

int ms_cuda_input(const char *op, const char *name, const ms_tensor *t, int *device)
{
    return check_device_tensor(op, name, t, device);
}

int ms_cuda_output(const char *op, const char *name, const ms_tensor *t, int *device)
{
    MS_CHECK(check_device_tensor(op, name, t, device));
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] > 1 && t->strides[d] == 0)
            return MS_FAIL(MS_ERR_INVALID, "%s: %s is an expanded view (stride 0 in dim %d); "
                           "its elements share memory and cannot be written", op, name, d);
    return MS_OK;
}

void ms_cuda_shape_of(ms_cu_shape *shape, int ndim, const int64_t *sizes)
{
    shape->ndim = ndim;
    shape->numel = 1;
    for (int d = 0; d < ndim; d++) {
        shape->sizes[d] = sizes[d];
        shape->numel *= sizes[d];
    }
}

int ms_cuda_operand(ms_cu_operand *operand, const char *op, const char *name,
                    const ms_cu_shape *shape, const ms_tensor *t)
{
    int lead = shape->ndim - t->ndim;
    int fits = lead >= 0;
    for (int d = 0; fits && d < t->ndim; d++)
        fits = t->shape[d] == shape->sizes[lead + d] || t->shape[d] == 1;
    if (!fits) {
        char from[160], to[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: %s of shape %s does not broadcast to %s", op, name,
                       ms_shape_str(from, sizeof from, t->ndim, t->shape),
                       ms_shape_str(to, sizeof to, shape->ndim, shape->sizes));
    }
    operand->data = ms_tensor_data(t);
    for (int d = 0; d < MS_CU_MAX_DIMS; d++)
        operand->strides[d] = 0;
    for (int d = 0; d < t->ndim; d++)
        operand->strides[lead + d] = t->shape[d] == 1 ? 0 : t->strides[d];
    return MS_OK;
}

void ms_cuda_coalesce(ms_cu_shape *shape, ms_cu_operand *const *operands, int count)
{
    int ndim = 0;
    for (int d = 0; d < shape->ndim; d++) {
        if (shape->sizes[d] == 1)
            continue;
        int merge = ndim > 0;
        for (int k = 0; merge && k < count; k++)
            merge = operands[k]->strides[ndim - 1] ==
                    operands[k]->strides[d] * shape->sizes[d];
        if (merge) {
            shape->sizes[ndim - 1] *= shape->sizes[d];
            for (int k = 0; k < count; k++)
                operands[k]->strides[ndim - 1] = operands[k]->strides[d];
        } else {
            shape->sizes[ndim] = shape->sizes[d];
            for (int k = 0; k < count; k++)
                operands[k]->strides[ndim] = operands[k]->strides[d];
            ndim++;
        }
    }
    if (ndim == 0) {
        ndim = 1;
        shape->sizes[0] = 1;
        for (int k = 0; k < count; k++)
            operands[k]->strides[0] = 0;
    }
    shape->ndim = ndim;
}

int ms_cuda_tensor_new(ms_tensor **out, int dtype, int ndim, const int64_t *shape, int pool)
{
    MS_CHECK(ms_tensor_new(out, dtype, ndim, shape, pool));
    int status = ms_cuda_await(*out);
    if (status != MS_OK) {
        ms_tensor_free(*out);
        *out = NULL;
    }
    return status;
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

int ms_cuda_scratch(ms_tensor **out, int pool, const int64_t *values, int count)
{
    int64_t shape[1] = {count};
    MS_CHECK(ms_cuda_tensor_new(out, MS_I64, 1, shape, pool));
    int status = MS_CUDA_STATUS(cudaMemcpyAsync(ms_tensor_data(*out), values,
                                                sizeof *values * (size_t)count,
                                                cudaMemcpyHostToDevice,
                                                ms_cuda_compute_stream(pool - MS_POOL_CUDA0)),
                                "cuda: filling scratch");
    if (status != MS_OK) {
        ms_tensor_free(*out);
        *out = NULL;
    }
    return status;
}

int ms_cuda_download(int device, void *host, const void *device_data, size_t nbytes)
{
    cudaStream_t stream = ms_cuda_compute_stream(device);
    MS_CUDA_CHECK(cudaMemcpyAsync(host, device_data, nbytes, cudaMemcpyDeviceToHost, stream),
                  "cuda: reading back");
    MS_CUDA_CHECK(cudaStreamSynchronize(stream), "cuda: waiting for the read-back");
    return MS_OK;
}
