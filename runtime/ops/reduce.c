/* moonshard runtime: ms_reduce and ms_max_dim: argument checks and the reduced shape, then
 * the kernels of the first tensor's place. */
#include "widen.h"

static const char *const reduce_names[] = {"sum", "mean", "max", "min", "sumsq"};

int ms_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, "reduce", "out", out));
    MS_CHECK(ms_check_input(&place, "reduce", "a", a));
    MS_CHECK(ms_check_float("reduce", "a", a));
    MS_CHECK(ms_check_same_dtype("reduce", "out", out, "a", a));
    if (op < MS_SUM || op > MS_SUMSQ)
        return MS_FAIL(MS_ERR_INVALID, "reduce: unknown reduce op %d (expected 0..%d)", op,
                       MS_SUMSQ);
    if (a->ndim < 32 && (dims_mask >> a->ndim) != 0)
        return MS_FAIL(MS_ERR_INVALID, "reduce: dims_mask 0x%x names dims beyond the %d dims "
                       "of a", dims_mask, a->ndim);
    int64_t kept_shape[MS_MAX_DIMS];
    int64_t count = 1;
    for (int d = 0; d < a->ndim; d++) {
        int reduced = (dims_mask >> d) & 1u;
        kept_shape[d] = reduced ? 1 : a->shape[d];
        if (reduced)
            count *= a->shape[d];
    }
    MS_CHECK(ms_check_shape_is("reduce", "out", out, a->ndim, kept_shape));
    if (out->numel > 0 && count == 0 && (op == MS_MAX || op == MS_MIN))
        return MS_FAIL(MS_ERR_SHAPE, "reduce: %s over reduced dims with no elements (a has a "
                       "size-0 dim in dims_mask 0x%x)", reduce_names[op], dims_mask);
    if (!ms_is_half(a->dtype))
        return place.backend->reduce(out, a, op, dims_mask, kept_shape, count);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_REDUCE, 2, (const ms_tensor *[]){out, a}, "wr", f));
    return ms_widen_done(&w, &place,
                         place.backend->reduce(f[0], f[1], op, dims_mask, kept_shape, count));
}

int ms_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim)
{
    ms_place place = ms_place_of(values);
    MS_CHECK(ms_check_output(&place, "max_dim", "values", values));
    MS_CHECK(ms_check_output(&place, "max_dim", "indices", indices));
    MS_CHECK(ms_check_input(&place, "max_dim", "a", a));
    MS_CHECK(ms_check_float("max_dim", "a", a));
    MS_CHECK(ms_check_same_dtype("max_dim", "values", values, "a", a));
    if (indices->dtype != MS_I64)
        return MS_FAIL(MS_ERR_DTYPE, "max_dim: indices has dtype %s; it must be i64",
                       ms_dtype_name(indices->dtype));
    MS_CHECK(ms_check_dim("max_dim", a, dim));
    int64_t kept_shape[MS_MAX_DIMS];
    for (int d = 0; d < a->ndim; d++)
        kept_shape[d] = d == dim ? 1 : a->shape[d];
    MS_CHECK(ms_check_shape_is("max_dim", "values", values, a->ndim, kept_shape));
    MS_CHECK(ms_check_shape_is("max_dim", "indices", indices, a->ndim, kept_shape));
    if (values->numel > 0 && a->ndim > 0 && a->shape[dim] == 0)
        return MS_FAIL(MS_ERR_SHAPE, "max_dim: dim %d of a has size 0", dim);
    if (!ms_is_half(a->dtype))
        return place.backend->max_dim(values, indices, a, dim, kept_shape);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_REDUCE,
                           3, (const ms_tensor *[]){values, indices, a}, "wwr", f));
    return ms_widen_done(&w, &place, place.backend->max_dim(f[0], f[1], f[2], dim, kept_shape));
}
