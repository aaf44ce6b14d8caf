/* moonshard kernels: bias + GELU on the device (element math in bias_gelu.h). The forward is
 * a grid-stride loop over elements; the backward gives each thread a column, which it walks
 * down the rows in order, so the bias gradient is summed the same way every time (adjacent
 * threads read adjacent columns: coalesced). bf16 and f16 are read and written as they are,
 * computed in f32. */
#include "bias_gelu.cuh"
#include "bias_gelu.h"
#include "value.cuh"

__device__ __forceinline__ float bias_gelu(float acc, float bias, int tanh_approx)
{
    return ms_k_bias_gelu_f32(acc, bias, tanh_approx);
}
__device__ __forceinline__ double bias_gelu(double acc, double bias, int tanh_approx)
{
    return ms_k_bias_gelu_f64(acc, bias, tanh_approx);
}
__device__ __forceinline__ float bias_gelu_backward(float acc, float bias, float dy,
                                                    int tanh_approx)
{
    return ms_k_bias_gelu_backward_f32(acc, bias, dy, tanh_approx);
}
__device__ __forceinline__ double bias_gelu_backward(double acc, double bias, double dy,
                                                     int tanh_approx)
{
    return ms_k_bias_gelu_backward_f64(acc, bias, dy, tanh_approx);
}

template <typename S> __global__ void forward_kernel(ms_cu_bias_gelu a)
{
    MS_CU_FOR(i, a.rows * a.cols)
    {
        ms_cu_set<S>(a.y, i, bias_gelu(ms_cu_get<S>(a.acc, i), ms_cu_get<S>(a.bias, i % a.cols),
                                       a.tanh_approx));
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void backward_kernel(ms_cu_bias_gelu a)
{
    MS_CU_FOR(j, a.cols)
    {
        T bias = ms_cu_get<S>(a.bias, j);
        double sum = 0.0;
        for (int64_t r = 0; r < a.rows; r++) {
            int64_t i = r * a.cols + j;
            T d = bias_gelu_backward(ms_cu_get<S>(a.acc, i), bias, ms_cu_get<S>(a.dy, i),
                                     a.tanh_approx);
            ms_cu_set<S>(a.dacc, i, d);
            sum += (double)d;
        }
        ms_cu_set<S>(a.dbias, j, (T)sum);
    }
}

int ms_cu_bias_gelu_forward(cudaStream_t stream, const ms_cu_bias_gelu *args)
{
    MS_CU_LAUNCH_FLOAT(args->dtype, forward_kernel, ms_cu_blocks(args->rows * args->cols),
                       MS_CU_THREADS, stream, *args)
    return ms_cu_last_error();
}

int ms_cu_bias_gelu_backward(cudaStream_t stream, const ms_cu_bias_gelu *args)
{
    MS_CU_LAUNCH_FLOAT(args->dtype, backward_kernel, ms_cu_blocks(args->cols), MS_CU_THREADS,
                       stream, *args)
    return ms_cu_last_error();
}
