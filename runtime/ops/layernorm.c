/* moonshard runtime: ms_layer_norm and ms_layer_norm_backward over the last normalized_ndim
 * dims, and ms_add_layer_norm(_backward) with the residual add fused in: argument checks and
 * the row layout, then the kernels of the first tensor's place. */
#include "widen.h"

/* Checks shared by forward and backward; [OUT] rows and size of the normalised rows. */
static int check_layout(const char *op, const ms_tensor *x, const ms_tensor *mean,
                        const ms_tensor *rstd, int normalized_ndim, int64_t *rows,
                        int64_t *size)
{
    if (normalized_ndim < 1 || normalized_ndim > x->ndim)
        return MS_FAIL(MS_ERR_INVALID, "%s: normalized_ndim %d outside [1, %d] for x with %d "
                       "dims", op, normalized_ndim, x->ndim, x->ndim);
    *rows = 1;
    *size = 1;
    for (int d = 0; d < x->ndim; d++) {
        if (d < x->ndim - normalized_ndim)
            *rows *= x->shape[d];
        else
            *size *= x->shape[d];
    }
    MS_CHECK(ms_check_float(op, "mean", mean));
    MS_CHECK(ms_check_float(op, "rstd", rstd));
    if (mean->numel != *rows || rstd->numel != *rows)
        return MS_FAIL(MS_ERR_SHAPE, "%s: mean and rstd have %lld and %lld elements, expected "
                       "one per row (%lld)", op, (long long)mean->numel,
                       (long long)rstd->numel, (long long)*rows);
    return MS_OK;
}

/* weight, bias, dweight and dbias (optional) have x's dtype and the normalised shape (x's
 * last dims). */
static int check_affine(const char *op, const char *name, const ms_tensor *t,
                        const ms_tensor *x, int normalized_ndim)
{
    if (!t)
        return MS_OK;
    MS_CHECK(ms_check_same_dtype(op, name, t, "x", x));
    return ms_check_shape_is(op, name, t, normalized_ndim,
                             x->shape + (x->ndim - normalized_ndim));
}

/* sum and residual are NULL for plain layer norm. */
static int layer_norm(const char *op, ms_tensor *sum, ms_tensor *out, ms_tensor *mean,
                      ms_tensor *rstd, const ms_tensor *x, const ms_tensor *residual,
                      const ms_tensor *weight, const ms_tensor *bias, int normalized_ndim,
                      double eps)
{
    ms_place place = ms_place_of(out);
    int64_t rows, size;
    MS_CHECK(ms_check_output(&place, op, "out", out));
    MS_CHECK(ms_check_output(&place, op, "mean", mean));
    MS_CHECK(ms_check_output(&place, op, "rstd", rstd));
    MS_CHECK(ms_check_input(&place, op, "x", x));
    MS_CHECK(ms_check_float(op, "x", x));
    MS_CHECK(ms_check_same_dtype(op, "out", out, "x", x));
    MS_CHECK(ms_check_same_shape(op, "out", out, "x", x));
    if (residual) {
        MS_CHECK(ms_check_output(&place, op, "sum", sum));
        MS_CHECK(ms_check_input(&place, op, "residual", residual));
        MS_CHECK(ms_check_same_dtype(op, "residual", residual, "x", x));
        MS_CHECK(ms_check_same_shape(op, "residual", residual, "x", x));
        MS_CHECK(ms_check_same_dtype(op, "sum", sum, "x", x));
        MS_CHECK(ms_check_same_shape(op, "sum", sum, "x", x));
    }
    MS_CHECK(check_layout(op, x, mean, rstd, normalized_ndim, &rows, &size));
    MS_CHECK(ms_check_optional(&place, op, "weight", weight, 0));
    MS_CHECK(check_affine(op, "weight", weight, x, normalized_ndim));
    MS_CHECK(ms_check_optional(&place, op, "bias", bias, 0));
    MS_CHECK(check_affine(op, "bias", bias, x, normalized_ndim));
    if (!(eps >= 0.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: eps %g must be >= 0", op, eps);
    if (!ms_is_half(x->dtype) && !ms_is_half(mean->dtype) && !ms_is_half(rstd->dtype))
        return place.backend->layer_norm(out, mean, rstd, sum, x, residual, weight, bias, eps,
                                         rows, size);
    ms_widened w = {0};
    ms_tensor *f[8];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_LAYER_NORM, 8,
                           (const ms_tensor *[]){out, mean, rstd, sum, x, residual, weight, bias},
                           "wwwwrrrr", f));
    return ms_widen_done(&w, &place, place.backend->layer_norm(f[0], f[1], f[2], f[3], f[4], f[5],
                                                               f[6], f[7], eps, rows, size));
}

int ms_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, const ms_tensor *x,
                  const ms_tensor *weight, const ms_tensor *bias, int normalized_ndim,
                  double eps)
{
    return layer_norm("layer_norm", NULL, out, mean, rstd, x, NULL, weight, bias,
                      normalized_ndim, eps);
}

int ms_add_layer_norm(ms_tensor *sum, ms_tensor *out, ms_tensor *mean, ms_tensor *rstd,
                      const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                      const ms_tensor *bias, int normalized_ndim, double eps)
{
    const char *op = "add_layer_norm";
    if (!sum || !residual)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s is NULL", op, sum ? "residual" : "sum");
    return layer_norm(op, sum, out, mean, rstd, x, residual, weight, bias, normalized_ndim, eps);
}

/* dsum is NULL for plain layer norm. */
/* x_name: what the caller calls the forward's normalised input ("x", or "sum" for the fused
 * add); dsum is NULL for plain layer norm. */
static int layer_norm_backward(const char *op, const char *x_name, ms_tensor *dx,
                               ms_tensor *dweight, ms_tensor *dbias, const ms_tensor *dy,
                               const ms_tensor *dsum,
                               const ms_tensor *x, const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int normalized_ndim)
{
    ms_place place = ms_place_of(dx);
    int64_t rows, size;
    MS_CHECK(ms_check_output(&place, op, "dx", dx));
    MS_CHECK(ms_check_input(&place, op, "dy", dy));
    MS_CHECK(ms_check_input(&place, op, x_name, x));
    MS_CHECK(ms_check_input(&place, op, "mean", mean));
    MS_CHECK(ms_check_input(&place, op, "rstd", rstd));
    MS_CHECK(ms_check_float(op, x_name, x));
    MS_CHECK(ms_check_same_dtype(op, "dx", dx, x_name, x));
    MS_CHECK(ms_check_same_dtype(op, "dy", dy, x_name, x));
    MS_CHECK(ms_check_same_shape(op, "dx", dx, x_name, x));
    MS_CHECK(ms_check_same_shape(op, "dy", dy, x_name, x));
    if (dsum) {
        MS_CHECK(ms_check_input(&place, op, "dsum", dsum));
        MS_CHECK(ms_check_same_dtype(op, "dsum", dsum, x_name, x));
        MS_CHECK(ms_check_same_shape(op, "dsum", dsum, x_name, x));
    }
    MS_CHECK(check_layout(op, x, mean, rstd, normalized_ndim, &rows, &size));
    MS_CHECK(ms_check_optional(&place, op, "weight", weight, 0));
    MS_CHECK(check_affine(op, "weight", weight, x, normalized_ndim));
    MS_CHECK(ms_check_optional(&place, op, "dweight", dweight, 1));
    MS_CHECK(ms_check_optional(&place, op, "dbias", dbias, 1));
    MS_CHECK(check_affine(op, "dweight", dweight, x, normalized_ndim));
    MS_CHECK(check_affine(op, "dbias", dbias, x, normalized_ndim));
    if (!ms_is_half(x->dtype) && !ms_is_half(mean->dtype) && !ms_is_half(rstd->dtype))
        return place.backend->layer_norm_backward(dx, dweight, dbias, dy, dsum, x, mean, rstd,
                                                  weight, rows, size);
    ms_widened w = {0};
    ms_tensor *f[9];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_LAYER_NORM, 9,
                           (const ms_tensor *[]){dx, dweight, dbias, dy, dsum, x, mean, rstd,
                                                 weight},
                           "wbbrrrrrr", f));
    return ms_widen_done(&w, &place,
                         place.backend->layer_norm_backward(f[0], f[1], f[2], f[3], f[4], f[5],
                                                            f[6], f[7], f[8], rows, size));
}

int ms_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                           const ms_tensor *dy, const ms_tensor *x, const ms_tensor *mean,
                           const ms_tensor *rstd, const ms_tensor *weight, int normalized_ndim)
{
    return layer_norm_backward("layer_norm_backward", "x", dx, dweight, dbias, dy, NULL, x, mean,
                               rstd, weight, normalized_ndim);
}

int ms_add_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                               const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *sum,
                               const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int normalized_ndim)
{
    return layer_norm_backward("add_layer_norm_backward", "sum", dx, dweight, dbias, dy, dsum, sum,
                               mean, rstd, weight, normalized_ndim);
}
