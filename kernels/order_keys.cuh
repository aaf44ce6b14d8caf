/* moonshard kernels: launchers that turn f32, f64, f16 and bf16 buffers into order keys
 * (order_keys.h) and back, for NaN-propagating max and min through integer reductions. */
#ifndef MS_KERNELS_ORDER_KEYS_CUH
#define MS_KERNELS_ORDER_KEYS_CUH

#include "launch.cuh"

/* [OUT] keys[i] = the order key of values[i] for i < count, on stream: uint64 keys for f64,
 * uint32 for f32, f16 and bf16 (dtype an ms_dtype). for_max picks the key a NaN becomes:
 * 1 for max, 0 for min. keys may be values for f32 and f64 (in place). */
MS_CU_API int ms_cu_order_keys_encode(cudaStream_t stream, void *keys, const void *values,
                                      int64_t count, int dtype, int for_max);
/* [OUT] values[i] = the value whose order key is keys[i] (the layout of encode). values may
 * be keys for f32 and f64 (in place). */
MS_CU_API int ms_cu_order_keys_decode(cudaStream_t stream, void *values, const void *keys,
                                      int64_t count, int dtype);

#endif
