/* moonshard CUDA backend: ms_cross_entropy and ms_cross_entropy_backward on a device, after
 * the checks of runtime/ops/. Targets are checked (and counted for the mean) first. */
#include "cuda_internal.h"
#include "cross_entropy.cuh"

enum { REDUCE_NONE = 0 };

int ms_cuda_cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                          const ms_tensor *target, int64_t ignore_index, int reduction)
{
    const char *op = "cross_entropy";
    int device = ms_cuda_device_of(out);
    ms_cu_nll args;
    MS_CHECK(ms_cuda_check_targets(op, logits, target, ignore_index, reduction, device, &args));
    cudaStream_t stream = ms_cuda_compute_stream(device);
    if (reduction == REDUCE_NONE) {
        if (args.rows == 0)
            return MS_OK;
        return ms_cuda_launched(op, ms_cu_cross_entropy(stream, &args, ms_tensor_data(stats),
                                                        stats->strides[0], stats->strides[1],
                                                        ms_tensor_data(out), out->strides[0]));
    }
    ms_tensor *losses = NULL;
    MS_CHECK(ms_tensor_new(&losses, logits->dtype, 1, &args.rows, out->storage->pool));
    int status = MS_OK;
    if (args.rows > 0)
        status = ms_cuda_launched(op, ms_cu_cross_entropy(stream, &args, ms_tensor_data(stats),
                                                          stats->strides[0], stats->strides[1],
                                                          ms_tensor_data(losses), 1));
    if (status == MS_OK)
        status = ms_cuda_launched(op, ms_cu_cross_entropy_total(stream, &args,
                                                                ms_tensor_data(losses),
                                                                ms_tensor_data(out)));
    ms_tensor_free(losses);
    return status;
}

int ms_cuda_cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                                   const ms_tensor *logits, const ms_tensor *stats,
                                   const ms_tensor *target, int64_t ignore_index, int reduction)
{
    const char *op = "cross_entropy_backward";
    int device = ms_cuda_device_of(dlogits);
    ms_cu_nll args;
    MS_CHECK(ms_cuda_check_targets(op, logits, target, ignore_index, reduction, device, &args));
    if (args.rows == 0)
        return MS_OK;
    return ms_cuda_launched(
        op, ms_cu_cross_entropy_backward(ms_cuda_compute_stream(device), &args,
                                         ms_tensor_data(stats), stats->strides[0],
                                         stats->strides[1], ms_tensor_data(dout),
                                         dout->ndim ? dout->strides[0] : 0,
                                         ms_tensor_data(dlogits), dlogits->strides[0],
                                         dlogits->strides[1]));
}
