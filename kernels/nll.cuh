/* moonshard kernels: launchers of the negative log likelihood over log-probabilities,
 * forward and backward. Outputs are assigned (dlogp is an activation gradient). */
#ifndef MS_KERNELS_NLL_CUH
#define MS_KERNELS_NLL_CUH

#include "launch.cuh"

/* logp (or dlogp) [rows, classes] with strides; target [rows] (i32 or i64) with a stride. */
typedef struct ms_cu_nll {
    void *logp;
    int64_t rows, classes, row_stride, class_stride;
    int dtype;
    const void *target;
    int64_t target_stride;
    int target_dtype;
    int64_t ignore_index;
    int reduction;   /* 0 none, 1 mean, 2 sum */
    int64_t counted; /* targets that are not ignore_index */
} ms_cu_nll;

/* result[0] (device, set to rows by the caller) becomes the first row whose target is
 * outside [0, classes) and not ignore_index; result[1] (set to 0) counts the others. */
MS_CU_API int ms_cu_check_targets(cudaStream_t stream, const ms_cu_nll *args, int64_t *result);
/* out: [rows] with out_stride for reduction none, else one element. */
MS_CU_API int ms_cu_nll_loss(cudaStream_t stream, const ms_cu_nll *args, void *out,
                             int64_t out_stride);
/* dlogp (args->logp, zero-filled by the caller) at each target = -dout. */
MS_CU_API int ms_cu_nll_loss_backward(cudaStream_t stream, const ms_cu_nll *args,
                                      const void *dout, int64_t dout_stride);

#endif
