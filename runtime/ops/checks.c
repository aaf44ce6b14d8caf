/* moonshard runtime: argument checks shared by every op, with messages that name the op,
 * the argument and what was wrong ("binary: a has dtype i32; binary takes f32 or f64"). */
#include "checks.h"

static const char *pool_name(int pool)
{
    return ms_pool_name(pool) ? ms_pool_name(pool) : "an unknown pool";
}

int ms_check_input_full(ms_place *place, const char *op, const char *name,
                        const ms_tensor *t)
{
    MS_CHECK(ms_check_tensor(op, name, t));
    if (t->ndim < 0 || t->ndim > MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s has ndim %d outside [0, %d]", op, name, t->ndim,
                       MS_MAX_DIMS);
    int pool = t->storage->pool;
    int its_device = pool - MS_POOL_CUDA0;
    if (!place->on_device) {
        if (pool >= MS_POOL_CUDA0)
            return MS_FAIL(MS_ERR_DEVICE, "%s: %s lives on %s; the CPU backend needs cpu or "
                           "host tensors", op, name, pool_name(pool));
    } else {
        if (pool < MS_POOL_CUDA0 || pool >= MS_MAX_POOLS)
            return MS_FAIL(MS_ERR_DEVICE, "%s: %s lives on %s but the other operands are on "
                           "cuda:%d; move it with :to() first", op, name, pool_name(pool),
                           place->device >= 0 ? place->device : 0);
        if (place->device >= 0 && its_device != place->device)
            return MS_FAIL(MS_ERR_DEVICE, "%s: %s lives on cuda:%d but the other operands are "
                           "on cuda:%d", op, name, its_device, place->device);
    }
    if (t->numel > 0 && !t->storage->data)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s has %lld elements but no data", op, name,
                       (long long)t->numel);
    if (!place->on_device)
        return MS_OK;
    if (place->device < 0 && place->backend->use_device)
        MS_CHECK(place->backend->use_device(its_device));
    place->device = its_device;
    return place->backend->await ? place->backend->await(t) : MS_OK;
}

int ms_check_output_full(ms_place *place, const char *op, const char *name,
                         const ms_tensor *t)
{
    MS_CHECK(ms_check_input_full(place, op, name, t));
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] > 1 && t->strides[d] == 0)
            return MS_FAIL(MS_ERR_INVALID, "%s: %s is an expanded view (stride 0 in dim %d); "
                           "its elements share memory and cannot be written", op, name, d);
    return MS_OK;
}

int ms_check_optional(ms_place *place, const char *op, const char *name, const ms_tensor *t,
                      int is_output)
{
    if (!t)
        return MS_OK;
    return is_output ? ms_check_output(place, op, name, t) : ms_check_input(place, op, name, t);
}

int ms_check_float(const char *op, const char *name, const ms_tensor *t)
{
    if (t->dtype != MS_F32 && t->dtype != MS_F64 && t->dtype != MS_BF16 && t->dtype != MS_F16)
        return MS_FAIL(MS_ERR_DTYPE, "%s: %s has dtype %s; %s takes f32, f64, bf16 or f16", op,
                       name, ms_dtype_name(t->dtype), op);
    return MS_OK;
}

int ms_check_same_dtype(const char *op, const char *name_a, const ms_tensor *a,
                        const char *name_b, const ms_tensor *b)
{
    if (a->dtype != b->dtype)
        return MS_FAIL(MS_ERR_DTYPE, "%s: %s has dtype %s but %s has %s", op, name_a,
                       ms_dtype_name(a->dtype), name_b, ms_dtype_name(b->dtype));
    return MS_OK;
}

int ms_check_shape_is(const char *op, const char *name, const ms_tensor *t, int ndim,
                      const int64_t *shape)
{
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++)
        same = t->shape[d] == shape[d];
    if (!same) {
        char got[160], want[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: %s has shape %s, expected %s", op, name,
                       ms_shape_str(got, sizeof got, t->ndim, t->shape),
                       ms_shape_str(want, sizeof want, ndim, shape));
    }
    return MS_OK;
}

int ms_check_same_shape(const char *op, const char *name_a, const ms_tensor *a,
                        const char *name_b, const ms_tensor *b)
{
    if (!ms_shapes_match(a, b)) {
        char sa[160], sb[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: shapes %s (%s) and %s (%s) differ", op,
                       ms_shape_str(sa, sizeof sa, a->ndim, a->shape), name_a,
                       ms_shape_str(sb, sizeof sb, b->ndim, b->shape), name_b);
    }
    return MS_OK;
}

int ms_check_dim(const char *op, const ms_tensor *t, int dim)
{
    if (t->ndim == 0 ? dim != 0 : (dim < 0 || dim >= t->ndim))
        return MS_FAIL(MS_ERR_INVALID, "%s: dim %d outside [0, %d) for a %d-dim tensor", op,
                       dim, t->ndim > 0 ? t->ndim : 1, t->ndim);
    return MS_OK;
}

int ms_check_class_loss(ms_place *place, const char *op, const ms_tensor *scores,
                        const char *scores_name, const ms_tensor *target,
                        const ms_tensor *per_row, const char *per_row_name, int reduction)
{
    MS_CHECK(ms_check_input(place, op, "target", target));
    MS_CHECK(ms_check_float(op, scores_name, scores));
    MS_CHECK(ms_check_same_dtype(op, per_row_name, per_row, scores_name, scores));
    if (reduction < 0 || reduction > 2)
        return MS_FAIL(MS_ERR_INVALID, "%s: reduction %d is not 0 (none), 1 (mean) or 2 (sum)",
                       op, reduction);
    if (target->dtype != MS_I32 && target->dtype != MS_I64)
        return MS_FAIL(MS_ERR_DTYPE, "%s: target has dtype %s; it must be i32 or i64", op,
                       ms_dtype_name(target->dtype));
    if (scores->ndim != 2 || target->ndim != 1 || target->shape[0] != scores->shape[0]) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: expected %s [N, C] and target [N], got %s and %s", op,
                       scores_name, ms_shape_str(a, sizeof a, scores->ndim, scores->shape),
                       ms_shape_str(b, sizeof b, target->ndim, target->shape));
    }
    int64_t rows = scores->shape[0];
    if (reduction == 0)
        return ms_check_shape_is(op, per_row_name, per_row, 1, &rows);
    return ms_check_shape_is(op, per_row_name, per_row, 0, NULL);
}

/* Extent [lowest, highest] of a view's elements in bytes from its storage's start. */
static void byte_extent(const ms_tensor *t, int64_t *lowest, int64_t *highest)
{
    int64_t size = (int64_t)ms_dtype_size(t->dtype);
    int64_t low = t->offset, high = t->offset;
    for (int d = 0; d < t->ndim; d++) {
        int64_t reach = (t->shape[d] - 1) * t->strides[d];
        if (reach < 0)
            low += reach;
        else
            high += reach;
    }
    *lowest = low * size;
    *highest = high * size + size - 1;
}

int ms_tensors_overlap(const ms_tensor *a, const ms_tensor *b)
{
    if (a->storage != b->storage || a->numel == 0 || b->numel == 0)
        return 0;
    int64_t a_low, a_high, b_low, b_high;
    byte_extent(a, &a_low, &a_high);
    byte_extent(b, &b_low, &b_high);
    return a_low <= b_high && b_low <= a_high;
}
