/* moonshard kernels: launchers of bias + GELU after a bias-free GEMM, forward and backward,
 * over dense row-major [rows, cols] buffers of one float dtype. */
#ifndef MS_KERNELS_BIAS_GELU_CUH
#define MS_KERNELS_BIAS_GELU_CUH

#include "launch.cuh"

typedef struct ms_cu_bias_gelu {
    int64_t rows, cols;
    int dtype, tanh_approx;
    const void *acc, *bias, *dy;
    void *y, *dacc, *dbias;
} ms_cu_bias_gelu;

/* y = gelu(acc + bias). */
MS_CU_API int ms_cu_bias_gelu_forward(cudaStream_t stream, const ms_cu_bias_gelu *args);
/* dacc = dy gelu'(acc + bias) and dbias (assigned) = dacc summed over the rows in order. */
MS_CU_API int ms_cu_bias_gelu_backward(cudaStream_t stream, const ms_cu_bias_gelu *args);

#endif
