/* moonshard CUDA backend: ms_layer_norm and ms_layer_norm_backward (and their fused residual
 * add forms) on a device, over dense copies of strided operands, after the checks of
 * runtime/ops/; dx is assigned, dweight and dbias accumulate. */
#include <math.h>

#include "cuda_internal.h"
#include "layernorm.cuh"

int ms_cuda_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, ms_tensor *sum,
                       const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                       const ms_tensor *bias, double eps, int64_t rows, int64_t size)
{
    const char *op = "layer_norm";
    int device = ms_cuda_device_of(out);
    if (rows == 0)
        return MS_OK;
    if (size == 0) { /* statistics of empty rows are 0/0 */
        MS_CHECK(ms_cuda_fill(mean, NAN));
        return ms_cuda_fill(rstd, NAN);
    }
    ms_cu_layer_norm a = {.rows = rows, .size = size, .eps = eps, .dtype = x->dtype,
                          .mean_dtype = mean->dtype, .rstd_dtype = rstd->dtype};
    ms_cuda_staging st = {0};
    a.x = ms_cuda_stage(&st, op, x, 1, 0);
    a.residual = ms_cuda_stage(&st, op, residual, 1, 0);
    a.weight = ms_cuda_stage(&st, op, weight, 1, 0);
    a.bias = ms_cuda_stage(&st, op, bias, 1, 0);
    a.out = ms_cuda_stage(&st, op, out, 0, 1);
    a.sum = ms_cuda_stage(&st, op, residual ? sum : NULL, 0, 1);
    a.mean = ms_cuda_stage(&st, op, mean, 0, 1);
    a.rstd = ms_cuda_stage(&st, op, rstd, 0, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_layer_norm_forward(ms_cuda_compute_stream(device),
                                                                  &a));
    return ms_cuda_unstage_all(&st);
}

int ms_cuda_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                                const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *x,
                                const ms_tensor *mean, const ms_tensor *rstd,
                                const ms_tensor *weight, int64_t rows, int64_t size)
{
    const char *op = "layer_norm_backward";
    int device = ms_cuda_device_of(dx);
    if (rows == 0 || size == 0)
        return MS_OK;
    ms_cu_layer_norm a = {.rows = rows, .size = size, .dtype = x->dtype,
                          .mean_dtype = mean->dtype, .rstd_dtype = rstd->dtype};
    ms_cuda_staging st = {0};
    a.x = ms_cuda_stage(&st, op, x, 1, 0);
    a.dy = ms_cuda_stage(&st, op, dy, 1, 0);
    a.dsum = ms_cuda_stage(&st, op, dsum, 1, 0);
    a.weight = ms_cuda_stage(&st, op, weight, 1, 0);
    a.mean = ms_cuda_stage(&st, op, mean, 1, 0);
    a.rstd = ms_cuda_stage(&st, op, rstd, 1, 0);
    a.dx = ms_cuda_stage(&st, op, dx, 0, 1);
    a.dweight = ms_cuda_stage(&st, op, dweight, 1, 1);
    a.dbias = ms_cuda_stage(&st, op, dbias, 1, 1);
    ms_tensor *partials = NULL;
    int64_t partials_shape[1] = {2 * ms_cu_column_chunks(rows) * size};
    if (st.status == MS_OK && (dweight || dbias))
        st.status = ms_cuda_tensor_new(&partials, MS_F64, 1, partials_shape, x->storage->pool);
    if (st.status == MS_OK) {
        a.partials = partials ? ms_tensor_data(partials) : NULL;
        st.status = ms_cuda_launched(op, ms_cu_layer_norm_backward(
                                             ms_cuda_compute_stream(device), &a));
    }
    ms_tensor_free(partials);
    return ms_cuda_unstage_all(&st);
}
