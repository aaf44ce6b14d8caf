/* moonshard CUDA backend: ms_nll_loss and ms_nll_loss_backward on a device, after
 * the checks of runtime/ops/. Targets are checked (and counted for the mean) before anything
 * is written; outputs are assigned. */
#include "cuda_internal.h"
#include "nll.cuh"

enum { REDUCE_NONE = 0 };

int ms_cuda_check_targets(const char *op, const ms_tensor *logp, const ms_tensor *target,
                         int64_t ignore_index, int reduction, int device, ms_cu_nll *args)
{
    int64_t rows = logp->shape[0];
    *args = (ms_cu_nll){ms_tensor_data(logp), rows, logp->shape[1], logp->strides[0],
                        logp->strides[1], logp->dtype, ms_tensor_data(target),
                        target->strides[0], target->dtype, ignore_index, reduction, 0};
    if (rows == 0)
        return MS_OK;
    int64_t initial[2] = {rows, 0}, result[2];
    ms_tensor *scratch = NULL;
    MS_CHECK(ms_cuda_scratch(&scratch, target->storage->pool, initial, 2));
    int status = ms_cuda_launched(op, ms_cu_check_targets(ms_cuda_compute_stream(device), args,
                                                          ms_tensor_data(scratch)));
    if (status == MS_OK)
        status = ms_cuda_download(device, result, ms_tensor_data(scratch), sizeof result);
    ms_tensor_free(scratch);
    MS_CHECK(status);
    if (result[0] < rows) {
        int64_t t = 0;
        size_t size = ms_dtype_size(target->dtype);
        MS_CHECK(ms_cuda_download(device, &t, (const char *)ms_tensor_data(target) +
                                                  (size_t)(result[0] * target->strides[0]) * size,
                                  size));
        if (target->dtype == MS_I32)
            t = (int32_t)t;
        return MS_FAIL(MS_ERR_INDEX, "%s: target %lld at row %lld is outside [0, %lld) and "
                       "is not ignore_index (%lld)", op, (long long)t, (long long)result[0],
                       (long long)logp->shape[1], (long long)ignore_index);
    }
    args->counted = result[1];
    return MS_OK;
}

int ms_cuda_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                     int64_t ignore_index, int reduction)
{
    const char *op = "nll_loss";
    int device = ms_cuda_device_of(out);
    ms_cu_nll args;
    MS_CHECK(ms_cuda_check_targets(op, logp, target, ignore_index, reduction, device, &args));
    if (args.rows == 0 && reduction == REDUCE_NONE)
        return MS_OK;
    return ms_cuda_launched(op, ms_cu_nll_loss(ms_cuda_compute_stream(device), &args,
                                               ms_tensor_data(out),
                                               out->ndim ? out->strides[0] : 0));
}

int ms_cuda_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                              int64_t ignore_index, int reduction)
{
    const char *op = "nll_loss_backward";
    int device = ms_cuda_device_of(dlogp);
    ms_cu_nll args;
    MS_CHECK(ms_cuda_check_targets(op, dlogp, target, ignore_index, reduction, device, &args));
    MS_CHECK(ms_cuda_fill(dlogp, 0.0));
    if (args.rows == 0)
        return MS_OK;
    return ms_cuda_launched(op, ms_cu_nll_loss_backward(ms_cuda_compute_stream(device), &args,
                                                        ms_tensor_data(dout),
                                                        dout->ndim ? dout->strides[0] : 0));
}
