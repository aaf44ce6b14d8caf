/* moonshard runtime: ms_copy on one place, and between places (cpu/host and a device, or two
 * devices), staged through a dense host block when layouts or dtypes differ. */
#include <stdlib.h>

#include "checks.h"

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

/* t itself when contiguous, else a contiguous tensor of its pool (holding t's elements when
 * copy_in) that dense_done frees after writing it back into t when write_back. */
static int dense(const ms_place *place, const ms_tensor *t, int copy_in, ms_tensor **out)
{
    *out = (ms_tensor *)t;
    if (ms_tensor_is_contiguous(t))
        return MS_OK;
    MS_CHECK(ms_tensor_new(out, t->dtype, t->ndim, t->shape, t->storage->pool));
    int status = place->backend->await ? place->backend->await(*out) : MS_OK;
    if (status == MS_OK && copy_in)
        status = place->backend->copy(*out, t);
    if (status != MS_OK) {
        ms_tensor_free(*out);
        *out = NULL;
    }
    return status;
}

static int dense_done(const ms_place *place, const ms_tensor *t, ms_tensor *block,
                      int write_back)
{
    if (!block || block == t)
        return MS_OK;
    int status = write_back ? place->backend->copy((ms_tensor *)t, block) : MS_OK;
    ms_tensor_free(block);
    return status;
}

static int host_to_device(ms_tensor *dst, const ms_tensor *src)
{
    ms_place place = ms_place_of(dst);
    MS_CHECK(ms_check_output(&place, "copy", "dst", dst));
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
    int status = dense(&place, dst, 0, &dense_dst);
    if (status == MS_OK && ms_tensor_nbytes(dst))
        status = place.backend->to_device(place.device, ms_tensor_data(dense_dst),
                                          ms_tensor_data(dense_src), ms_tensor_nbytes(dst));
    int done = dense_done(&place, dst, dense_dst, status == MS_OK);
    free(staging.storage.data);
    return status != MS_OK ? status : done;
}

static int device_to_host(ms_tensor *dst, const ms_tensor *src)
{
    ms_place place = ms_place_of(src);
    MS_CHECK(ms_check_input(&place, "copy", "src", src));
    ms_tensor *dense_src = NULL;
    MS_CHECK(dense(&place, src, 1, &dense_src));
    int direct = src->dtype == dst->dtype && src->numel == dst->numel &&
                 ms_tensor_is_contiguous(dst) && dst->storage->data;
    size_t nbytes = ms_tensor_nbytes(src);
    host_block staging = {0};
    int status = MS_OK;
    if (direct) {
        if (nbytes)
            status = place.backend->to_host(place.device, ms_tensor_data(dst),
                                            ms_tensor_data(dense_src), nbytes);
    } else {
        status = host_block_make(&staging, src->dtype, src->ndim, src->shape);
        if (status == MS_OK && nbytes)
            status = place.backend->to_host(place.device, staging.storage.data,
                                            ms_tensor_data(dense_src), nbytes);
        if (status == MS_OK)
            status = ms_copy(dst, &staging.tensor);
        free(staging.storage.data);
    }
    dense_done(&place, src, dense_src, 0);
    return status;
}

/* Different devices: contiguous bytes of one dtype only. */
static int device_to_device(ms_tensor *dst, const ms_tensor *src)
{
    ms_place to = ms_place_of(dst), from = ms_place_of(src);
    MS_CHECK(ms_check_output(&to, "copy", "dst", dst));
    MS_CHECK(ms_check_input(&from, "copy", "src", src));
    if (src->dtype != dst->dtype || src->numel != dst->numel ||
        !ms_tensor_is_contiguous(src) || !ms_tensor_is_contiguous(dst))
        return MS_FAIL(MS_ERR_UNSUPPORTED, "copy: between cuda:%d and cuda:%d only contiguous "
                       "tensors of one dtype and size copy; convert on one device first",
                       from.device, to.device);
    return to.backend->between_devices(ms_tensor_data(dst), to.device, ms_tensor_data(src),
                                       from.device, ms_tensor_nbytes(dst));
}

int ms_copy(ms_tensor *dst, const ms_tensor *src)
{
    ms_place place = ms_place_of(dst), src_place = ms_place_of(src);
    if (!place.backend->device_tensors && !src_place.backend->device_tensors) {
        MS_CHECK(ms_check_output(&place, "copy", "dst", dst));
        MS_CHECK(ms_check_input(&place, "copy", "src", src));
        return place.backend->copy(dst, src);
    }
    MS_CHECK(ms_check_tensor("copy", "dst", dst));
    MS_CHECK(ms_check_tensor("copy", "src", src));
    if (!ms_broadcasts(src, dst) && src->numel != dst->numel) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "copy: src of shape %s does not broadcast to dst %s and "
                       "has a different number of elements",
                       ms_shape_str(a, sizeof a, src->ndim, src->shape),
                       ms_shape_str(b, sizeof b, dst->ndim, dst->shape));
    }
    if (!src_place.backend->device_tensors)
        return host_to_device(dst, src);
    if (!place.backend->device_tensors)
        return device_to_host(dst, src);
    if (dst->storage->pool != src->storage->pool)
        return device_to_device(dst, src);
    MS_CHECK(ms_check_output(&place, "copy", "dst", dst));
    MS_CHECK(ms_check_input(&place, "copy", "src", src));
    return place.backend->copy(dst, src);
}
