/* moonshard kernels: launchers of bias + GELU after a bias-free GEMM, forward and backward,
 * over dense row-major [rows, cols] buffers of one float dtype. */
#ifndef MS_KERNELS_BIAS_GELU_CUH
#define MS_KERNELS_BIAS_GELU_CUH

#include "column_sums.cuh"

typedef struct ms_cu_bias_gelu {
    int64_t rows, cols;
    int dtype, tanh_approx;
    const void *acc, *bias, *dy;
    void *y, *dacc, *dbias;
    double *partials; /* backward: ms_cu_column_chunks(rows) x cols of device scratch */
} ms_cu_bias_gelu;

/* y = gelu(acc + bias). */
MS_CU_API int ms_cu_bias_gelu_forward(cudaStream_t stream, const ms_cu_bias_gelu *args);
/* dacc = dy gelu'(acc + bias) and dbias (assigned) = dacc summed over the rows, in row
 * chunks whose sums add in chunk order (column_sums.cuh). */
MS_CU_API int ms_cu_bias_gelu_backward(cudaStream_t stream, const ms_cu_bias_gelu *args);

#endif
