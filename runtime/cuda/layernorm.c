/* moonshard CUDA backend: ms_layer_norm and ms_layer_norm_backward on a device, over dense
 * copies of strided operands. Checks match the CPU backend's; dx is assigned, dweight and
 * dbias accumulate. */
#include <math.h>

#include "cuda_internal.h"
#include "dispatch.h"
#include "layernorm.cuh"
#include "cpu/cpu.h"

/* Dense copies of up to 8 operands of one call, released together. */
typedef struct staging {
    int count, status;
    const ms_tensor *tensors[8];
    ms_tensor *dense[8];
    int is_output[8];
} staging;

static void *stage(staging *st, const ms_tensor *t, int copy_in, int is_output)
{
    if (!t || st->status != MS_OK)
        return NULL;
    int i = st->count++;
    st->tensors[i] = t;
    st->is_output[i] = is_output;
    st->status = ms_cuda_dense("layer_norm", t, copy_in, &st->dense[i]);
    return st->status == MS_OK ? ms_tensor_data(st->dense[i]) : NULL;
}

static int unstage_all(staging *st)
{
    for (int i = 0; i < st->count; i++) {
        int status = ms_cuda_dense_done(st->tensors[i], st->dense[i],
                                        st->is_output[i] && st->status == MS_OK);
        if (st->status == MS_OK)
            st->status = status;
    }
    return st->status;
}

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
    MS_CHECK(ms_cpu_float(op, "mean", mean));
    MS_CHECK(ms_cpu_float(op, "rstd", rstd));
    if (mean->numel != *rows || rstd->numel != *rows)
        return MS_FAIL(MS_ERR_SHAPE, "%s: mean and rstd have %lld and %lld elements, expected "
                       "one per row (%lld)", op, (long long)mean->numel,
                       (long long)rstd->numel, (long long)*rows);
    return MS_OK;
}

static int check_affine(const char *op, const char *name, const ms_tensor *t,
                        const ms_tensor *x, int normalized_ndim, int written, int *device)
{
    if (!t)
        return MS_OK;
    MS_CHECK(written ? ms_cuda_output(op, name, t, device) : ms_cuda_input(op, name, t, device));
    MS_CHECK(ms_cpu_same_dtype(op, name, t, "x", x));
    return ms_cpu_shape_is(op, name, t, normalized_ndim, x->shape + (x->ndim - normalized_ndim));
}

int ms_cuda_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, const ms_tensor *x,
                       const ms_tensor *weight, const ms_tensor *bias, int normalized_ndim,
                       double eps)
{
    const char *op = "layer_norm";
    int device = -1;
    MS_CHECK(ms_cuda_output(op, "out", out, &device));
    MS_CHECK(ms_cuda_output(op, "mean", mean, &device));
    MS_CHECK(ms_cuda_output(op, "rstd", rstd, &device));
    MS_CHECK(ms_cuda_input(op, "x", x, &device));
    MS_CHECK(ms_cpu_float(op, "x", x));
    MS_CHECK(ms_cpu_same_dtype(op, "out", out, "x", x));
    MS_CHECK(ms_cpu_same_shape(op, "out", out, "x", x));
    int64_t rows, size;
    MS_CHECK(check_layout(op, x, mean, rstd, normalized_ndim, &rows, &size));
    MS_CHECK(check_affine(op, "weight", weight, x, normalized_ndim, 0, &device));
    MS_CHECK(check_affine(op, "bias", bias, x, normalized_ndim, 0, &device));
    if (!(eps >= 0.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: eps %g must be >= 0", op, eps);
    if (rows == 0)
        return MS_OK;
    if (size == 0) { /* statistics of empty rows are 0/0 */
        MS_CHECK(ms_cuda_fill(mean, NAN));
        return ms_cuda_fill(rstd, NAN);
    }
    ms_cu_layer_norm a = {.rows = rows, .size = size, .eps = eps, .dtype = x->dtype,
                          .mean_dtype = mean->dtype, .rstd_dtype = rstd->dtype};
    staging st = {0};
    a.x = stage(&st, x, 1, 0);
    a.weight = stage(&st, weight, 1, 0);
    a.bias = stage(&st, bias, 1, 0);
    a.out = stage(&st, out, 0, 1);
    a.mean = stage(&st, mean, 0, 1);
    a.rstd = stage(&st, rstd, 0, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_layer_norm_forward(ms_cuda_compute_stream(device),
                                                                  &a));
    return unstage_all(&st);
}

int ms_cuda_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                                const ms_tensor *dy, const ms_tensor *x, const ms_tensor *mean,
                                const ms_tensor *rstd, const ms_tensor *weight,
                                int normalized_ndim)
{
    const char *op = "layer_norm_backward";
    int device = -1;
    MS_CHECK(ms_cuda_output(op, "dx", dx, &device));
    MS_CHECK(ms_cuda_input(op, "dy", dy, &device));
    MS_CHECK(ms_cuda_input(op, "x", x, &device));
    MS_CHECK(ms_cuda_input(op, "mean", mean, &device));
    MS_CHECK(ms_cuda_input(op, "rstd", rstd, &device));
    MS_CHECK(ms_cpu_float(op, "x", x));
    MS_CHECK(ms_cpu_same_dtype(op, "dx", dx, "x", x));
    MS_CHECK(ms_cpu_same_dtype(op, "dy", dy, "x", x));
    MS_CHECK(ms_cpu_same_shape(op, "dx", dx, "x", x));
    MS_CHECK(ms_cpu_same_shape(op, "dy", dy, "x", x));
    int64_t rows, size;
    MS_CHECK(check_layout(op, x, mean, rstd, normalized_ndim, &rows, &size));
    MS_CHECK(check_affine(op, "weight", weight, x, normalized_ndim, 0, &device));
    MS_CHECK(check_affine(op, "dweight", dweight, x, normalized_ndim, 1, &device));
    MS_CHECK(check_affine(op, "dbias", dbias, x, normalized_ndim, 1, &device));
    if (rows == 0 || size == 0)
        return MS_OK;
    ms_cu_layer_norm a = {.rows = rows, .size = size, .dtype = x->dtype,
                          .mean_dtype = mean->dtype, .rstd_dtype = rstd->dtype};
    staging st = {0};
    a.x = stage(&st, x, 1, 0);
    a.dy = stage(&st, dy, 1, 0);
    a.weight = stage(&st, weight, 1, 0);
    a.mean = stage(&st, mean, 1, 0);
    a.rstd = stage(&st, rstd, 1, 0);
    a.dx = stage(&st, dx, 0, 1);
    a.dweight = stage(&st, dweight, 1, 1);
    a.dbias = stage(&st, dbias, 1, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_layer_norm_backward(
                                             ms_cuda_compute_stream(device), &a));
    return unstage_all(&st);
}
