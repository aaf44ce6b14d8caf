/* moonshard kernels: launchers of softmax, log_softmax and safe softmax along one dim,
 * forward and backward. dx is an activation gradient and is assigned. */
#ifndef MS_KERNELS_SOFTMAX_CUH
#define MS_KERNELS_SOFTMAX_CUH

#include "launch.cuh"

/* rows: the shape with the softmax dim set to 1; each operand's strides walk the row starts
 * and dim_strides[k] steps operand k along the dim of `length` elements. kind: ops.h's
 * MS_SOFTMAX (0), MS_LOG_SOFTMAX (1) or MS_SAFE_SOFTMAX (2: a row of -inf gives 0). */
MS_CU_API int ms_cu_softmax(cudaStream_t stream, const ms_cu_shape *rows, ms_cu_operand out,
                            ms_cu_operand x, int64_t length, const int64_t *dim_strides,
                            int dtype, int kind);
/* softmax: dx = y (dy - sum(dy y)); log_softmax: dx = dy - exp(y) sum(dy). */
MS_CU_API int ms_cu_softmax_backward(cudaStream_t stream, const ms_cu_shape *rows,
                                     ms_cu_operand dx, ms_cu_operand y, ms_cu_operand dy,
                                     int64_t length, const int64_t *dim_strides, int dtype,
                                     int log);

#endif
