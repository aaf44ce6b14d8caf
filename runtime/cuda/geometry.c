/* moonshard CUDA backend: the launch geometry built from tensor views, scratch tensors and
 * reading small results back. */
#include "cuda_internal.h"

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
