/* moonshard CUDA backend: ms_embedding and ms_embedding_backward on a device. Every index is
 * checked before anything is written, as on the CPU; out is assigned, dweight accumulates. */
#include "cuda_internal.h"
#include "dispatch.h"
#include "embedding.cuh"
#include "cpu/cpu.h"

static int check_common(const char *op, const ms_tensor *table, const char *table_name,
                        const ms_tensor *indices, int *device)
{
    MS_CHECK(ms_cuda_input(op, "indices", indices, device));
    MS_CHECK(ms_cpu_float(op, table_name, table));
    if (table->ndim != 2) {
        char buf[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: %s must be 2-D [num, dim], got %s", op, table_name,
                       ms_shape_str(buf, sizeof buf, table->ndim, table->shape));
    }
    if (indices->dtype != MS_I32 && indices->dtype != MS_I64)
        return MS_FAIL(MS_ERR_DTYPE, "%s: indices has dtype %s; it must be i32 or i64", op,
                       ms_dtype_name(indices->dtype));
    return MS_OK;
}

static int check_rows_shape(const char *op, const char *name, const ms_tensor *rows,
                            const ms_tensor *indices, int64_t dim)
{
    if (indices->ndim >= MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_SHAPE, "%s: indices has %d dims; at most %d leave room for the "
                       "embedding dim", op, indices->ndim, MS_MAX_DIMS - 1);
    int64_t shape[MS_MAX_DIMS];
    for (int d = 0; d < indices->ndim; d++)
        shape[d] = indices->shape[d];
    shape[indices->ndim] = dim;
    return ms_cpu_shape_is(op, name, rows, indices->ndim + 1, shape);
}

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
    int device = -1;
    MS_CHECK(ms_cuda_output(op, "out", out, &device));
    MS_CHECK(ms_cuda_input(op, "weight", weight, &device));
    MS_CHECK(check_common(op, weight, "weight", indices, &device));
    MS_CHECK(ms_cpu_same_dtype(op, "out", out, "weight", weight));
    MS_CHECK(check_rows_shape(op, "out", out, indices, weight->shape[1]));
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
    int device = -1;
    MS_CHECK(ms_cuda_output(op, "dweight", dweight, &device));
    MS_CHECK(check_common(op, dweight, "dweight", indices, &device));
    MS_CHECK(ms_cuda_input(op, "dout", dout, &device));
    MS_CHECK(ms_cpu_same_dtype(op, "dout", dout, "dweight", dweight));
    MS_CHECK(check_rows_shape(op, "dout", dout, indices, dweight->shape[1]));
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
