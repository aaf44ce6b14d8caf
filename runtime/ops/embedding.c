/* moonshard runtime: ms_embedding and ms_embedding_backward: argument checks (the index
 * values are checked by the kernels before they write), then the first tensor's place. */
#include "widen.h"

/* out (or dout) has indices' shape + [dim]. */
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
    return ms_check_shape_is(op, name, rows, indices->ndim + 1, shape);
}

/* The table (weight or dweight) and indices, the table already checked on place. */
static int check_table(ms_place *place, const char *op, const ms_tensor *table,
                       const char *table_name, const ms_tensor *indices)
{
    MS_CHECK(ms_check_input(place, op, "indices", indices));
    MS_CHECK(ms_check_float(op, table_name, table));
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

int ms_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices)
{
    const char *op = "embedding";
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, op, "out", out));
    MS_CHECK(ms_check_input(&place, op, "weight", weight));
    MS_CHECK(check_table(&place, op, weight, "weight", indices));
    MS_CHECK(ms_check_same_dtype(op, "out", out, "weight", weight));
    MS_CHECK(check_rows_shape(op, "out", out, indices, weight->shape[1]));
    if (!ms_is_half(weight->dtype))
        return place.backend->embedding(out, weight, indices);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_EMBEDDING,
                           2, (const ms_tensor *[]){out, weight}, "wr", f));
    return ms_widen_done(&w, &place, place.backend->embedding(f[0], f[1], indices));
}

int ms_embedding_backward(ms_tensor *dweight, const ms_tensor *indices, const ms_tensor *dout)
{
    const char *op = "embedding_backward";
    ms_place place = ms_place_of(dweight);
    MS_CHECK(ms_check_output(&place, op, "dweight", dweight));
    MS_CHECK(check_table(&place, op, dweight, "dweight", indices));
    MS_CHECK(ms_check_input(&place, op, "dout", dout));
    MS_CHECK(ms_check_same_dtype(op, "dout", dout, "dweight", dweight));
    MS_CHECK(check_rows_shape(op, "dout", dout, indices, dweight->shape[1]));
    if (!ms_is_half(dweight->dtype))
        return place.backend->embedding_backward(dweight, indices, dout);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_EMBEDDING,
                           2, (const ms_tensor *[]){dweight, dout}, "br", f));
    return ms_widen_done(&w, &place, place.backend->embedding_backward(f[0], indices, f[1]));
}
