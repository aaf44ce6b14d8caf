/* moonshard kernels: launchers of bias + GELU after a bias-free GEMM, forward and backward,
 * over dense row-major [rows, cols] buffers of one float dtype. */
#ifndef MS_KERNELS_BIAS_GELU_CUH
#define MS_KERNELS_BIAS_GELU_CUH

#include "column_sums.cuh"

typedef struct ms_cu_bias_gelu {
    int64_t rows, cols;
    int dtype, tanh_approx;
    const void *acc, *bias, *dy;
    const void *derivative; /* backward: gelu' in the compute type (f64 for f64, else f32) */
    void *y, *dacc, *dbias;
    void *derivative_out;   /* forward: NULL, or where gelu' goes, in the compute type */
    double *partials;       /* backward: ms_cu_column_chunks(rows) x cols of device scratch */
} ms_cu_bias_gelu;

/* y = gelu(acc + bias), and derivative_out = gelu'(acc + bias) when given. */
MS_CU_API int ms_cu_bias_gelu_forward(cudaStream_t stream, const ms_cu_bias_gelu *args);
/* dacc = dy derivative and dbias (assigned) = dacc summed over the rows, in row chunks
 * whose sums add in chunk order (column_sums.cuh). */
MS_CU_API int ms_cu_bias_gelu_backward(cudaStream_t stream, const ms_cu_bias_gelu *args);

#endif
