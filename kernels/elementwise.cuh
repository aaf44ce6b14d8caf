/* moonshard kernels: launchers of the element-wise family: binary ops with broadcasting,
 * binary ops with a scalar, unary ops and their backward (dx = dy * f'(x), assigned). */
#ifndef MS_KERNELS_ELEMENTWISE_CUH
#define MS_KERNELS_ELEMENTWISE_CUH

#include "launch.cuh"

/* out = a op b; op is an ms_binary_op, dtype f32, f64, bf16, f16, i32 or i64 (no div or pow for
 * integers: the caller checks). */
MS_CU_API int ms_cu_binary(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                           ms_cu_operand a, ms_cu_operand b, int dtype, int op);
/* out = a op s (s op a with reverse); s is scalar_f for floats, scalar_i for integers. */
MS_CU_API int ms_cu_binary_scalar(cudaStream_t stream, const ms_cu_shape *shape,
                                  ms_cu_operand out, ms_cu_operand a, int dtype, int op,
                                  double scalar_f, int64_t scalar_i, int reverse);
/* out = f(a) for an ms_unary_op; f32, f64, bf16 or f16. */
MS_CU_API int ms_cu_unary(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                          ms_cu_operand a, int dtype, int op);
/* dx = dy * f'(x) for MS_RELU, MS_GELU, MS_GELU_TANH, MS_TANH and MS_SIGMOID. */
MS_CU_API int ms_cu_unary_backward(cudaStream_t stream, const ms_cu_shape *shape,
                                   ms_cu_operand dx, ms_cu_operand x, ms_cu_operand dy,
                                   int dtype, int op);

#endif
