/* moonshard runtime: dtypes, refcounted storage and tensor views.
 * A tensor handle owns one reference to its storage; the storage goes back to its pool
 * when the last view is freed. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* A storage's header shares one allocation with the handle ms_tensor_new made it for (one
 * malloc per new tensor instead of two). The block lives until the storage's last view is
 * freed, even when that first handle was freed before. */
typedef struct first_handle {
    ms_tensor tensor;
    ms_storage storage;
} first_handle;

static first_handle *block_of(ms_storage *storage)
{
    return (first_handle *)((char *)storage - offsetof(first_handle, storage));
}

static const size_t dtype_sizes[MS_DTYPE_COUNT] = {4, 8, 2, 2, 4, 8, 1};
static const char *const dtype_names[MS_DTYPE_COUNT] = {"f32", "f64", "bf16", "f16",
                                                        "i32", "i64", "u8"};

size_t ms_dtype_size(int dtype)
{
    return (dtype >= 0 && dtype < MS_DTYPE_COUNT) ? dtype_sizes[dtype] : 0;
}

const char *ms_dtype_name(int dtype)
{
    return (dtype >= 0 && dtype < MS_DTYPE_COUNT) ? dtype_names[dtype] : NULL;
}

void ms_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides)
{
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        strides[d] = stride;
        stride *= shape[d] > 0 ? shape[d] : 1;
    }
}

int ms_check_tensor(const char *op, const char *name, const ms_tensor *t)
{
    if (!t)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s must not be NULL", op, name);
    if (t->dtype < 0 || t->dtype >= MS_DTYPE_COUNT)
        return MS_FAIL(MS_ERR_DTYPE, "%s: %s has unknown dtype %d", op, name, t->dtype);
    if (!t->storage)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s has no storage", op, name);
    if (t->storage->released)
        return MS_FAIL(MS_ERR_STATE, "%s: %s's storage is released (a resharded parameter or a "
                       "freed buffer)", op, name);
    return MS_OK;
}

int ms_shapes_match(const ms_tensor *a, const ms_tensor *b)
{
    if (a->ndim != b->ndim)
        return 0;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d])
            return 0;
    return 1;
}

int ms_broadcasts(const ms_tensor *src, const ms_tensor *dst)
{
    int lead = dst->ndim - src->ndim;
    if (lead < 0)
        return 0;
    for (int d = 0; d < src->ndim; d++)
        if (src->shape[d] != 1 && src->shape[d] != dst->shape[lead + d])
            return 0;
    return 1;
}

static int check_geometry(const char *op, int ndim, const int64_t *shape, int64_t *numel)
{
    if (ndim < 0 || ndim > MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_INVALID, "%s: ndim %d outside [0, %d]", op, ndim, MS_MAX_DIMS);
    if (ndim > 0 && !shape)
        return MS_FAIL(MS_ERR_INVALID, "%s: shape must not be NULL", op);
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return MS_FAIL(MS_ERR_SHAPE, "%s: negative size %lld in dim %d", op,
                           (long long)shape[d], d);
        if (shape[d] != 0 && n > INT64_MAX / shape[d])
            return MS_FAIL(MS_ERR_SHAPE, "%s: shape overflows int64", op);
        n *= shape[d];
    }
    *numel = n;
    return MS_OK;
}

int ms_tensor_new(ms_tensor **out, int dtype, int ndim, const int64_t *shape, int pool)
{
    if (!out)
        return MS_FAIL(MS_ERR_INVALID, "tensor_new: out must not be NULL");
    if (dtype < 0 || dtype >= MS_DTYPE_COUNT)
        return MS_FAIL(MS_ERR_DTYPE, "tensor_new: unknown dtype %d", dtype);
    if (!ms_pool_name(pool))
        return MS_FAIL(MS_ERR_INVALID, "tensor_new: pool id %d out of range", pool);
    int64_t numel;
    MS_CHECK(check_geometry("tensor_new", ndim, shape, &numel));
    if ((uint64_t)numel > (uint64_t)INT64_MAX / dtype_sizes[dtype])
        return MS_FAIL(MS_ERR_OOM, "tensor_new: %lld elements of %zu bytes are more bytes than "
                       "memory can address", (long long)numel, dtype_sizes[dtype]);
    size_t nbytes = (size_t)numel * dtype_sizes[dtype];
    first_handle *block = malloc(sizeof *block);
    if (!block)
        return MS_FAIL(MS_ERR_OOM, "tensor_new: out of host memory for the handle");
    void *data = NULL;
    int status = ms_pool_alloc(pool, nbytes, &data);
    if (status != MS_OK) {
        free(block);
        return status;
    }
    ms_storage *storage = &block->storage;
    ms_tensor *t = &block->tensor;
    *storage = (ms_storage){.data = data, .nbytes = nbytes, .pool = pool, .refcount = 1};
    memset(t, 0, sizeof *t);
    t->storage = storage;
    t->dtype = dtype;
    t->ndim = ndim;
    t->numel = numel;
    for (int d = 0; d < ndim; d++)
        t->shape[d] = shape[d];
    ms_contiguous_strides(ndim, t->shape, t->strides);
    *out = t;
    return MS_OK;
}

int ms_tensor_view(ms_tensor **out, const ms_tensor *base, int ndim, const int64_t *shape,
                   const int64_t *strides, int64_t offset)
{
    if (!out)
        return MS_FAIL(MS_ERR_INVALID, "tensor_view: out must not be NULL");
    MS_CHECK(ms_check_tensor("tensor_view", "base", base));
    int64_t numel;
    MS_CHECK(check_geometry("tensor_view", ndim, shape, &numel));
    int64_t view_strides[MS_MAX_DIMS];
    if (strides) {
        for (int d = 0; d < ndim; d++)
            view_strides[d] = strides[d];
    } else {
        ms_contiguous_strides(ndim, shape, view_strides);
    }
    int64_t capacity = (int64_t)(base->storage->nbytes / dtype_sizes[base->dtype]);
    if (numel > 0) {
        int64_t lowest = offset, highest = offset;
        for (int d = 0; d < ndim; d++) {
            int64_t reach = (shape[d] - 1) * view_strides[d];
            if (reach < 0)
                lowest += reach;
            else
                highest += reach;
        }
        if (lowest < 0 || highest >= capacity) {
            char buf[160];
            return MS_FAIL(MS_ERR_INDEX,
                           "tensor_view: view of shape %s at offset %lld reaches elements "
                           "[%lld, %lld], outside the storage of %lld elements",
                           ms_shape_str(buf, sizeof buf, ndim, shape), (long long)offset,
                           (long long)lowest, (long long)highest, (long long)capacity);
        }
    } else if (offset < 0 || offset > capacity) {
        return MS_FAIL(MS_ERR_INDEX, "tensor_view: offset %lld outside the storage",
                       (long long)offset);
    }
    ms_tensor *t = malloc(sizeof *t);
    if (!t)
        return MS_FAIL(MS_ERR_OOM, "tensor_view: out of host memory for the handle");
    memset(t, 0, sizeof *t);
    t->storage = base->storage;
    __atomic_fetch_add(&t->storage->refcount, 1, __ATOMIC_RELAXED);
    t->dtype = base->dtype;
    t->ndim = ndim;
    t->numel = numel;
    t->offset = offset;
    for (int d = 0; d < ndim; d++) {
        t->shape[d] = shape[d];
        t->strides[d] = view_strides[d];
    }
    *out = t;
    return MS_OK;
}

void ms_tensor_free(ms_tensor *t)
{
    if (!t)
        return;
    ms_storage *storage = t->storage;
    if (!storage) {
        free(t);
        return;
    }
    first_handle *block = block_of(storage);
    if (t != &block->tensor)
        free(t);
    if (__atomic_sub_fetch(&storage->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        if (!storage->released)
            ms_pool_free(storage->pool, storage->data, storage->nbytes);
        free(block);
    }
}

int ms_storage_release(ms_storage *storage)
{
    if (!storage)
        return MS_FAIL(MS_ERR_INVALID, "storage_release: storage must not be NULL");
    if (storage->released)
        return MS_OK;
    MS_CHECK(ms_pool_free(storage->pool, storage->data, storage->nbytes));
    storage->data = NULL;
    storage->released = 1;
    return MS_OK;
}

int ms_storage_restore(ms_storage *storage)
{
    if (!storage)
        return MS_FAIL(MS_ERR_INVALID, "storage_restore: storage must not be NULL");
    if (!storage->released)
        return MS_OK;
    void *data = NULL;
    MS_CHECK(ms_pool_alloc(storage->pool, storage->nbytes, &data));
    storage->data = data;
    storage->released = 0;
    return MS_OK;
}

void *ms_tensor_data(const ms_tensor *t)
{
    if (!t || !t->storage || !t->storage->data)
        return NULL;
    return (char *)t->storage->data + t->offset * (int64_t)dtype_sizes[t->dtype];
}

int ms_tensor_is_contiguous(const ms_tensor *t)
{
    if (!t)
        return 0;
    int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->strides[d] != expected)
            return 0;
        expected *= t->shape[d];
    }
    return 1;
}

size_t ms_tensor_nbytes(const ms_tensor *t)
{
    if (!t || t->dtype < 0 || t->dtype >= MS_DTYPE_COUNT)
        return 0;
    return (size_t)t->numel * dtype_sizes[t->dtype];
}
