/* moonshard kernels: launchers of layer norm over dense rows, forward and backward, with an
 * optional fused residual add. dx is assigned; dweight and dbias are parameter gradients and
 * accumulate (+=). */
#ifndef MS_KERNELS_LAYERNORM_CUH
#define MS_KERNELS_LAYERNORM_CUH

#include "column_sums.cuh"

/* Dense row-major buffers of rows x size elements of a float dtype; weight and bias
 * (size) may be NULL; mean and rstd (rows) have their own float dtypes. residual and sum
 * (forward) and dsum (backward) are NULL for plain layer norm. */
typedef struct ms_cu_layer_norm {
    int64_t rows, size;
    double eps;
    int dtype, mean_dtype, rstd_dtype;
    void *out, *dx, *dweight, *dbias, *mean, *rstd, *sum;
    const void *x, *dy, *weight, *bias, *residual, *dsum;
    double *partials; /* backward with dweight or dbias: 2 ms_cu_column_chunks(rows) x size
                         of device scratch */
} ms_cu_layer_norm;

/* out = (x - mean) rstd * weight + bias; mean and rstd [OUT]. With residual, sum = x +
 * residual is stored and normalised in place of x. */
MS_CU_API int ms_cu_layer_norm_forward(cudaStream_t stream, const ms_cu_layer_norm *args);
/* dx = rstd (g - mean(g) - xhat mean(g xhat)) (+ dsum) with g = dy weight; dweight += sum over rows of
 * dy xhat and dbias += sum of dy, each NULL to skip, summed in row chunks (column_sums.cuh). */
MS_CU_API int ms_cu_layer_norm_backward(cudaStream_t stream, const ms_cu_layer_norm *args);

#endif
