/* moonshard CUDA backend: ms_bias_gelu and ms_bias_gelu_backward on a device, over dense
 * copies of strided operands, after the checks of runtime/ops/. */
#include "cuda_internal.h"
#include "bias_gelu.cuh"

/* Dense copies of up to 5 operands of one call, released together. */
typedef struct staging {
    int count, status;
    const ms_tensor *tensors[5];
    ms_tensor *dense[5];
    int is_output[5];
} staging;

static void *stage(staging *st, const char *op, const ms_tensor *t, int is_output)
{
    if (st->status != MS_OK)
        return NULL;
    int i = st->count++;
    st->tensors[i] = t;
    st->is_output[i] = is_output;
    st->status = ms_cuda_dense(op, t, !is_output, &st->dense[i]);
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

int ms_cuda_bias_gelu(ms_tensor *y, const ms_tensor *acc, const ms_tensor *bias,
                      int tanh_approx, int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu";
    int device = ms_cuda_device_of(y);
    if (rows == 0 || cols == 0)
        return MS_OK;
    ms_cu_bias_gelu a = {.rows = rows, .cols = cols, .dtype = acc->dtype,
                         .tanh_approx = tanh_approx};
    staging st = {0};
    a.acc = stage(&st, op, acc, 0);
    a.bias = stage(&st, op, bias, 0);
    a.y = stage(&st, op, y, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_bias_gelu_forward(ms_cuda_compute_stream(device),
                                                                 &a));
    return unstage_all(&st);
}

int ms_cuda_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                               const ms_tensor *acc, const ms_tensor *bias, int tanh_approx,
                               int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu_backward";
    int device = ms_cuda_device_of(dacc);
    if (cols == 0)
        return MS_OK;
    if (rows == 0)
        return ms_cuda_fill(dbias, 0.0);
    ms_cu_bias_gelu a = {.rows = rows, .cols = cols, .dtype = acc->dtype,
                         .tanh_approx = tanh_approx};
    staging st = {0};
    a.acc = stage(&st, op, acc, 0);
    a.bias = stage(&st, op, bias, 0);
    a.dy = stage(&st, op, dy, 0);
    a.dacc = stage(&st, op, dacc, 1);
    a.dbias = stage(&st, op, dbias, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_bias_gelu_backward(
                                             ms_cuda_compute_stream(device), &a));
    return unstage_all(&st);
}
