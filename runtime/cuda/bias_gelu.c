/* moonshard CUDA backend: ms_bias_gelu and ms_bias_gelu_backward on a device, over dense
 * copies of strided operands, after the checks of runtime/ops/. */
#include "cuda_internal.h"
#include "bias_gelu.cuh"

int ms_cuda_bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                      const ms_tensor *bias, int tanh_approx, int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu";
    int device = ms_cuda_device_of(y);
    if (rows == 0 || cols == 0)
        return MS_OK;
    ms_cu_bias_gelu a = {.rows = rows, .cols = cols, .dtype = acc->dtype,
                         .tanh_approx = tanh_approx};
    ms_cuda_staging st = {0};
    a.acc = ms_cuda_stage(&st, op, acc, 1, 0);
    a.bias = ms_cuda_stage(&st, op, bias, 1, 0);
    a.y = ms_cuda_stage(&st, op, y, 0, 1);
    if (derivative)
        a.derivative_out = ms_cuda_stage(&st, op, derivative, 0, 1);
    if (st.status == MS_OK)
        st.status = ms_cuda_launched(op, ms_cu_bias_gelu_forward(ms_cuda_compute_stream(device),
                                                                 &a));
    return ms_cuda_unstage_all(&st);
}

int ms_cuda_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                               const ms_tensor *derivative, int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu_backward";
    int device = ms_cuda_device_of(dacc);
    if (cols == 0)
        return MS_OK;
    if (rows == 0)
        return ms_cuda_fill(dbias, 0.0);
    ms_cu_bias_gelu a = {.rows = rows, .cols = cols, .dtype = dy->dtype};
    ms_cuda_staging st = {0};
    a.dy = ms_cuda_stage(&st, op, dy, 1, 0);
    a.derivative = ms_cuda_stage(&st, op, derivative, 1, 0);
    a.dacc = ms_cuda_stage(&st, op, dacc, 0, 1);
    a.dbias = ms_cuda_stage(&st, op, dbias, 0, 1);
    ms_tensor *partials = NULL;
    int64_t partials_shape[1] = {ms_cu_column_chunks(rows) * cols};
    if (st.status == MS_OK)
        st.status = ms_cuda_tensor_new(&partials, MS_F64, 1, partials_shape,
                                       dy->storage->pool);
    if (st.status == MS_OK) {
        a.partials = ms_tensor_data(partials);
        st.status = ms_cuda_launched(op, ms_cu_bias_gelu_backward(
                                             ms_cuda_compute_stream(device), &a));
    }
    ms_tensor_free(partials);
    return ms_cuda_unstage_all(&st);
}
