/* moonshard CUDA backend: ms_embedding and ms_embedding_backward on a device, after
 * the checks of runtime/ops/. Every index is checked before anything is written, as on the
 * CPU; out is assigned, dweight accumulates. */
#include "cuda_internal.h"
#include "embedding.cuh"

/* Every index of the dense indices in [0, num), or MS_ERR_INDEX naming the first bad one. */
static int check_indices(const char *op, const ms_tensor *indices, int device, int64_t num)
{
    ms_tensor *first_bad = NULL;
    int64_t count = indices->numel, found = count;
    MS_CHECK(ms_cuda_scratch(&first_bad, indices->storage->pool, &count, 1));
    int status = ms_cuda_launched(op, ms_cu_check_indices(ms_cuda_compute_stream(device),
                                                          ms_tensor_data(indices),
                                                          indices->dtype, count, num,
                                                          ms_tensor_data(first_bad)));
    if (status == MS_OK)
        status = ms_cuda_download(device, &found, ms_tensor_data(first_bad), sizeof found);
    ms_tensor_free(first_bad);
    if (status != MS_OK || found == count)
        return status;
    int64_t index = 0;
    size_t size = ms_dtype_size(indices->dtype);
    MS_CHECK(ms_cuda_download(device, &index, (const char *)ms_tensor_data(indices) +
                                                  (size_t)found * size, size));
    if (indices->dtype == MS_I32)
        index = (int32_t)index;
    return MS_FAIL(MS_ERR_INDEX, "%s: index %lld at position %lld is outside [0, %lld)", op,
                   (long long)index, (long long)found, (long long)num);
}

static ms_cu_table table_of(const ms_tensor *t)
{
    return (ms_cu_table){ms_tensor_data(t), t->shape[0], t->shape[1], t->strides[0],
                         t->strides[1], t->dtype};
}

int ms_cuda_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices)
{
    const char *op = "embedding";
    int device = ms_cuda_device_of(out);
    if (indices->numel == 0)
        return MS_OK;
    ms_tensor *dense_indices = NULL, *dense_out = NULL;
    MS_CHECK(ms_cuda_dense(op, indices, 1, &dense_indices));
    int status = check_indices(op, dense_indices, device, weight->shape[0]);
    if (status == MS_OK && weight->shape[1] > 0) {
        status = ms_cuda_dense(op, out, 0, &dense_out);
        if (status == MS_OK)
            status = ms_cuda_launched(op, ms_cu_embedding(ms_cuda_compute_stream(device),
                                                          ms_tensor_data(dense_out),
                                                          table_of(weight),
                                                          ms_tensor_data(dense_indices),
                                                          indices->dtype, indices->numel));
        int done = ms_cuda_dense_done(out, dense_out, status == MS_OK);
        if (status == MS_OK)
            status = done;
    }
    ms_cuda_dense_done(indices, dense_indices, 0);
    return status;
}

int ms_cuda_embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                               const ms_tensor *dout)
{
    const char *op = "embedding_backward";
    int device = ms_cuda_device_of(dweight);
    if (indices->numel == 0)
        return MS_OK;
    ms_tensor *dense_indices = NULL, *dense_dout = NULL;
    MS_CHECK(ms_cuda_dense(op, indices, 1, &dense_indices));
    int status = check_indices(op, dense_indices, device, dweight->shape[0]);
    if (status == MS_OK && dweight->shape[1] > 0) {
        status = ms_cuda_dense(op, dout, 1, &dense_dout);
        if (status == MS_OK)
            status = ms_cuda_launched(op, ms_cu_embedding_backward(
                                              ms_cuda_compute_stream(device), table_of(dweight),
                                              ms_tensor_data(dense_indices), indices->dtype,
                                              ms_tensor_data(dense_dout), indices->numel));
        ms_cuda_dense_done(dout, dense_dout, 0);
    }
    ms_cuda_dense_done(indices, dense_indices, 0);
    return status;
}
