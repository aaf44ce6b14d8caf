/* moonshard kernels: layer norm on the device. One block per row for the statistics and dx;
 * one thread per column sums dweight and dbias over the rows in order (deterministic). */
#include "layernorm.cuh"
#include "block.cuh"
#include "reduce.h"

enum { F32 = 0 };

__device__ __forceinline__ double load_stat(const void *stats, int dtype, int64_t i)
{
    return dtype == F32 ? (double)((const float *)stats)[i] : ((const double *)stats)[i];
}

__device__ __forceinline__ void store_stat(void *stats, int dtype, int64_t i, double value)
{
    if (dtype == F32)
        ((float *)stats)[i] = (float)value;
    else
        ((double *)stats)[i] = value;
}

/* ---- kernels ---- */

template <typename T>
__global__ void forward_kernel(ms_cu_layer_norm a)
{
    __shared__ double scratch[MS_CU_THREADS];
    const T *weight = (const T *)a.weight, *bias = (const T *)a.bias;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T *x = (const T *)a.x + r * a.size;
        T *out = (T *)a.out + r * a.size;
        double local = 0.0;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x)
            local += (double)x[j];
        double mean = ms_cu_block_sum(local, scratch) / (double)a.size;
        local = 0.0;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            double d = (double)x[j] - mean;
            local += d * d;
        }
        double rstd = ms_k_rstd(ms_cu_block_sum(local, scratch) / (double)a.size, a.eps);
        if (threadIdx.x == 0) {
            store_stat(a.mean, a.mean_dtype, r, mean);
            store_stat(a.rstd, a.rstd_dtype, r, rstd);
        }
        T m = (T)mean, s = (T)rstd;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            T y = (x[j] - m) * s;
            if (weight)
                y *= weight[j];
            if (bias)
                y += bias[j];
            out[j] = y;
        }
    }
}

template <typename T>
__global__ void backward_dx_kernel(ms_cu_layer_norm a)
{
    __shared__ double scratch[MS_CU_THREADS];
    const T *weight = (const T *)a.weight;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T *x = (const T *)a.x + r * a.size, *dy = (const T *)a.dy + r * a.size;
        T *dx = (T *)a.dx + r * a.size;
        T mean = (T)load_stat(a.mean, a.mean_dtype, r),
          rstd = (T)load_stat(a.rstd, a.rstd_dtype, r);
        double local_g = 0.0, local_g_xhat = 0.0;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            T xhat = (x[j] - mean) * rstd;
            T g = weight ? dy[j] * weight[j] : dy[j];
            local_g += (double)g;
            local_g_xhat += (double)g * (double)xhat;
        }
        T mean_g = (T)(ms_cu_block_sum(local_g, scratch) / (double)a.size);
        T mean_g_xhat = (T)(ms_cu_block_sum(local_g_xhat, scratch) / (double)a.size);
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            T xhat = (x[j] - mean) * rstd;
            T g = weight ? dy[j] * weight[j] : dy[j];
            dx[j] = rstd * (g - mean_g - xhat * mean_g_xhat);
        }
    }
}

template <typename T>
__global__ void backward_params_kernel(ms_cu_layer_norm a)
{
    MS_CU_FOR(j, a.size)
    {
        double dweight = 0.0, dbias = 0.0;
        for (int64_t r = 0; r < a.rows; r++) {
            T x = ((const T *)a.x)[r * a.size + j], dy = ((const T *)a.dy)[r * a.size + j];
            T xhat = (x - (T)load_stat(a.mean, a.mean_dtype, r)) *
                     (T)load_stat(a.rstd, a.rstd_dtype, r);
            dweight += (double)dy * (double)xhat;
            dbias += (double)dy;
        }
        if (a.dweight)
            ((T *)a.dweight)[j] = (T)((double)((T *)a.dweight)[j] + dweight);
        if (a.dbias)
            ((T *)a.dbias)[j] = (T)((double)((T *)a.dbias)[j] + dbias);
    }
}

/* ---- launchers ---- */

static unsigned row_blocks(int64_t rows) { return (unsigned)(rows < 65535 ? rows : 65535); }

int ms_cu_layer_norm_forward(cudaStream_t stream, const ms_cu_layer_norm *args)
{
    if (args->dtype == F32)
        forward_kernel<float><<<row_blocks(args->rows), MS_CU_THREADS, 0, stream>>>(*args);
    else
        forward_kernel<double><<<row_blocks(args->rows), MS_CU_THREADS, 0, stream>>>(*args);
    return ms_cu_last_error();
}

int ms_cu_layer_norm_backward(cudaStream_t stream, const ms_cu_layer_norm *args)
{
    if (args->dtype == F32)
        backward_dx_kernel<float><<<row_blocks(args->rows), MS_CU_THREADS, 0, stream>>>(*args);
    else
        backward_dx_kernel<double><<<row_blocks(args->rows), MS_CU_THREADS, 0, stream>>>(*args);
    if (!args->dweight && !args->dbias)
        return ms_cu_last_error();
    unsigned blocks = ms_cu_blocks(args->size);
    if (args->dtype == F32)
        backward_params_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*args);
    else
        backward_params_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*args);
    return ms_cu_last_error();
}
