/* moonshard kernels: launchers of cross-entropy fused with its log_softmax, forward and
 * backward, one block per row of logits. dlogits is assigned. */
#ifndef MS_KERNELS_CROSS_ENTROPY_CUH
#define MS_KERNELS_CROSS_ENTROPY_CUH

#include "nll.cuh"

/* args->logp holds the logits [rows, classes]; stats [rows, 2] with (row, column) strides
 * gets each row's max and log(sum(exp(x - max))); losses[i * loss_stride] each row's loss
 * (0 where the target is ignored). */
MS_CU_API int ms_cu_cross_entropy(cudaStream_t stream, const ms_cu_nll *args, void *stats,
                                  int64_t stats_row, int64_t stats_col, void *losses,
                                  int64_t loss_stride);
/* *out = the sum of rows losses (mean: over args->counted), in a fixed order in double. */
MS_CU_API int ms_cu_cross_entropy_total(cudaStream_t stream, const ms_cu_nll *args,
                                        const void *losses, void *out);
/* dlogits [rows, classes] with (row, column) strides from the stats and dout (one element per
 * row with dout_stride for reduction none, else one). */
MS_CU_API int ms_cu_cross_entropy_backward(cudaStream_t stream, const ms_cu_nll *args,
                                           const void *stats, int64_t stats_row,
                                           int64_t stats_col, const void *dout,
                                           int64_t dout_stride, void *dlogits, int64_t d_row,
                                           int64_t d_col);

#endif
