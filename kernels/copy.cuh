/* moonshard kernels: launchers of the copy family (copy with dtype conversion and
 * broadcasting, fill, arange, bitwise and tolerant comparison). Every output is assigned. */
#ifndef MS_KERNELS_COPY_CUH
#define MS_KERNELS_COPY_CUH

#include "launch.cuh"

/* dst[i] = convert(src[i]) over shape; dtypes are ms_dtype values; src may broadcast. */
MS_CU_API int ms_cu_copy(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dst,
                         int dst_dtype, ms_cu_operand src, int src_dtype);
/* dst[i] = the element whose bits are the low elem_size bytes of bits. */
MS_CU_API int ms_cu_fill(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dst,
                         size_t elem_size, uint64_t bits);
/* dst[i] = start + i * step in dst's dtype; exact_int counts start_int + i * step_int with
 * wrapping integer arithmetic (integer dtypes with integer start and step). */
MS_CU_API int ms_cu_arange(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dst,
                           int dtype, double start, double step, int exact_int,
                           int64_t start_int, int64_t step_int);
/* *[OUT] device_flag (an int32 in device memory, set to 1 by the caller) becomes 0 when some
 * element of a and b differs bit for bit. */
MS_CU_API int ms_cu_equal(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                          ms_cu_operand b, size_t elem_size, int32_t *device_flag);
/* As ms_cu_equal with |a-b| <= atol + rtol*|b| (equal values pass, NaN never). */
MS_CU_API int ms_cu_allclose(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                             int a_dtype, ms_cu_operand b, int b_dtype, double rtol,
                             double atol, int32_t *device_flag);

#endif
