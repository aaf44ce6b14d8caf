/* moonshard kernels: launchers of the reduction family: sum, mean, max, min and sum of
 * squares over a set of dims, and max with its index along one dim. Outputs are assigned. */
#ifndef MS_KERNELS_REDUCE_CUH
#define MS_KERNELS_REDUCE_CUH

#include "launch.cuh"

/* For every kept position o (row-major over kept), out[o] = reduction over every reduced
 * position r of a at kept offset o plus reduced offset r (a_reduced holds only strides).
 * op is an ms_reduce_op; sums accumulate in double in a fixed order (deterministic). */
/* Few kept positions with long reductions split each into chunks of about
 * MS_CU_REDUCE_CHUNK elements, at most MS_CU_REDUCE_WIDE blocks in all. */
enum { MS_CU_REDUCE_CHUNK = 65536, MS_CU_REDUCE_WIDE = 1024 };
/* Chunks per kept position; partials must hold kept * chunks doubles when it exceeds 1. */
MS_CU_API int64_t ms_cu_reduce_chunks(int64_t kept, int64_t reduced);
MS_CU_API int ms_cu_reduce(cudaStream_t stream, const ms_cu_shape *kept, ms_cu_operand out,
                           ms_cu_operand a, const ms_cu_shape *reduced,
                           ms_cu_operand a_reduced, int dtype, int op, double *partials);
/* values[o], indices[o] (i64) = max and index of the first max of a along a dim of length
 * elements with a_stride, at each kept position o. */
MS_CU_API int ms_cu_max_dim(cudaStream_t stream, const ms_cu_shape *kept, ms_cu_operand values,
                            ms_cu_operand indices, ms_cu_operand a, int64_t length,
                            int64_t a_stride, int dtype);

#endif
