/* moonshard CUDA backend: copies between host memory (cpu and host pools) and a device,
 * staged through a dense host block when layouts or dtypes differ, and between devices. */
#include <stdlib.h>

#include "cuda_internal.h"
#include "dispatch.h"

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

int ms_cuda_copy_across(ms_tensor *dst, const ms_tensor *src)
{
    if (!ms_on_device(src))
        return host_to_device(dst, src, -1);
    if (!ms_on_device(dst))
        return device_to_host(dst, src, -1);
    return device_to_device(dst, src);
}
