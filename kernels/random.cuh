/* moonshard kernels: launchers of the counter-based draws (uniform, normal) and of dropout.
 * Element i (row-major) uses the Philox block (seed, offset + i) of rng.h, as on the CPU. */
#ifndef MS_KERNELS_RANDOM_CUH
#define MS_KERNELS_RANDOM_CUH

#include "launch.cuh"

typedef struct ms_cu_draw {
    uint64_t seed, offset;
    double a, b; /* uniform: low and high; normal: mean and std; dropout: p and 1/(1-p) */
    int dtype;
} ms_cu_draw;

/* out[i] uniform in [low, high). */
MS_CU_API int ms_cu_rand_uniform(cudaStream_t stream, const ms_cu_shape *shape,
                                 ms_cu_operand out, const ms_cu_draw *draw);
/* out[i] = mean + std * standard normal. */
MS_CU_API int ms_cu_rand_normal(cudaStream_t stream, const ms_cu_shape *shape,
                                ms_cu_operand out, const ms_cu_draw *draw);
/* out[i] = keep(i) ? x[i] / (1 - p) : 0 (forward on x, backward on dy with the same mask). */
MS_CU_API int ms_cu_dropout(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                            ms_cu_operand x, const ms_cu_draw *draw);

#endif
