/* moonshard CUDA backend: ms_layer_norm and ms_layer_norm_backward (and their fused residual
 * add forms) on a device, over dense
 * copies of strided operands, after the checks of runtime/ops/; dx is assigned,
 * dweight and dbias accumulate. */
#include <math.h>

#include "cuda_internal.h"
#include "layernorm.cuh"

/* Dense copies of up to 10 operands of one call, released together. */
typedef struct staging {
    int count, status;
    const ms_tensor *tensors[10];
    ms_tensor *dense[10];
    int is_output[10];
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
    staging st = {0};
    a.x = stage(&st, x, 1, 0);
    a.residual = stage(&st, residual, 1, 0);
    a.weight = stage(&st, weight, 1, 0);
    a.bias = stage(&st, bias, 1, 0);
    a.out = stage(&st, out, 0, 1);
    a.sum = stage(&st, residual ? sum : NULL, 0, 1);
    a.mean = stage(&st, mean, 0, 1);
    a.rstd = stage(&st, rstd, 0, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_layer_norm_forward(ms_cuda_compute_stream(device),
                                                                  &a));
    return unstage_all(&st);
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
    staging st = {0};
    a.x = stage(&st, x, 1, 0);
    a.dy = stage(&st, dy, 1, 0);
    a.dsum = stage(&st, dsum, 1, 0);
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
