/* moonshard kernels: launchers of the fused optimizer steps (SGD with momentum, Adam and
 * AdamW), in place on the parameter and its state; grad is read, never written. */
#ifndef MS_KERNELS_OPTIM_CUH
#define MS_KERNELS_OPTIM_CUH

#include "launch.cuh"
#include "optim.h"

/* buf.data is NULL without momentum. dtype f32 or f64. */
MS_CU_API int ms_cu_sgd_step(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand param,
                             ms_cu_operand buf, ms_cu_operand grad, int dtype,
                             const ms_k_sgd_coeffs *coeffs);
MS_CU_API int ms_cu_adam_step(cudaStream_t stream, const ms_cu_shape *shape,
                              ms_cu_operand param, ms_cu_operand exp_avg,
                              ms_cu_operand exp_avg_sq, ms_cu_operand grad, int dtype,
                              const ms_k_adam_coeffs *coeffs);

#endif
