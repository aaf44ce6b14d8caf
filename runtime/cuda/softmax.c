/* moonshard CUDA backend: ms_softmax and ms_softmax_backward on a device (softmax or
 * log_softmax along one dim), after the checks of runtime/ops/; dx is assigned. */
#include "cuda_internal.h"
#include "softmax.cuh"

/* The row starts of count same-shaped tensors along dim, and each one's step along dim. */
static void row_geometry(ms_tensor *const *tensors, int count, int dim, ms_cu_shape *rows,
                         ms_cu_operand *operands, int64_t *dim_strides, int64_t *length)
{
    const ms_tensor *first = tensors[0];
    int64_t starts[MS_MAX_DIMS] = {0};
    for (int d = 0; d < first->ndim; d++)
        starts[d] = d == dim ? 1 : first->shape[d];
    ms_cuda_shape_of(rows, first->ndim, starts);
    *length = first->ndim ? first->shape[dim] : 1;
    for (int i = 0; i < count; i++) {
        operands[i].data = ms_tensor_data(tensors[i]);
        for (int d = 0; d < MS_CU_MAX_DIMS; d++)
            operands[i].strides[d] = d < first->ndim && d != dim ? tensors[i]->strides[d] : 0;
        dim_strides[i] = tensors[i]->ndim ? tensors[i]->strides[dim] : 0;
    }
}

int ms_cuda_softmax(ms_tensor *out, const ms_tensor *x, int dim, int kind)
{
    int device = ms_cuda_device_of(out);
    ms_tensor *tensors[2] = {out, (ms_tensor *)x};
    ms_cu_shape rows;
    ms_cu_operand operands[2];
    int64_t dim_strides[2], length;
    row_geometry(tensors, 2, dim, &rows, operands, dim_strides, &length);
    if (rows.numel == 0 || length == 0)
        return MS_OK;
    return ms_cuda_launched("softmax", ms_cu_softmax(ms_cuda_compute_stream(device), &rows,
                                                     operands[0], operands[1], length,
                                                     dim_strides, x->dtype, kind));
}

int ms_cuda_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                             int kind)
{
    const char *op = "softmax_backward";
    int device = ms_cuda_device_of(dx);
    ms_tensor *tensors[3] = {dx, (ms_tensor *)y, (ms_tensor *)dy};
    ms_cu_shape rows;
    ms_cu_operand operands[3];
    int64_t dim_strides[3], length;
    row_geometry(tensors, 3, dim, &rows, operands, dim_strides, &length);
    if (rows.numel == 0 || length == 0)
        return MS_OK;
    return ms_cuda_launched(op, ms_cu_softmax_backward(ms_cuda_compute_stream(device), &rows,
                                                       operands[0], operands[1], operands[2],
                                                       length, dim_strides, y->dtype,
                                                       kind == MS_LOG_SOFTMAX));
}
