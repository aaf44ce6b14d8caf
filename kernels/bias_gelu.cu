/* moonshard kernels: bias + GELU on the device (element math in bias_gelu.h). The forward is
 * a grid-stride loop over elements writing y and, when asked, gelu'; the backward multiplies
 * dy by that derivative, visiting the elements in column blocks (column_sums.cuh), so the bias
 * gradient is summed in an order fixed by the shape. bf16 and f16 are read and written as
 * they are, computed in f32; the derivative is kept in the compute type. */
#include "bias_gelu.cuh"
#include "bias_gelu.h"
#include "column_sums.cuh"
#include "value.cuh"

__device__ __forceinline__ float bias_gelu(float acc, float bias, int tanh_approx)
{
    return ms_k_bias_gelu_f32(acc, bias, tanh_approx);
}
__device__ __forceinline__ double bias_gelu(double acc, double bias, int tanh_approx)
{
    return ms_k_bias_gelu_f64(acc, bias, tanh_approx);
}
__device__ __forceinline__ float bias_gelu(float acc, float bias, int tanh_approx,
                                          float *derivative)
{
    return ms_k_bias_gelu_and_derivative_f32(acc, bias, tanh_approx, derivative);
}
__device__ __forceinline__ double bias_gelu(double acc, double bias, int tanh_approx,
                                           double *derivative)
{
    return ms_k_bias_gelu_and_derivative_f64(acc, bias, tanh_approx, derivative);
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void forward_kernel(ms_cu_bias_gelu a)
{
    MS_CU_FOR(i, a.rows * a.cols)
    {
        T acc = ms_cu_get<S>(a.acc, i), bias = ms_cu_get<S>(a.bias, i % a.cols);
        if (a.derivative_out)
            ms_cu_set<S>(a.y, i, bias_gelu(acc, bias, a.tanh_approx,
                                           (T *)a.derivative_out + i));
        else
            ms_cu_set<S>(a.y, i, bias_gelu(acc, bias, a.tanh_approx));
    }
}

/* dacc, and each chunk's sum of dacc per column into partials[chunk][col]. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void backward_kernel(ms_cu_bias_gelu a)
{
    int64_t blocks = ms_cu_column_blocks(a.rows, a.cols);
    const T *derivative = (const T *)a.derivative;
    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        ms_cu_column_block t = ms_cu_column_block_of(b, a.rows, a.cols);
        double sum = 0.0;
        if (t.col < a.cols) {
            for (int64_t r = t.first; r < t.last; r += MS_CU_ROW_LANES) {
                int64_t i = r * a.cols + t.col;
                T d = (T)ms_cu_get<S>(a.dy, i) * derivative[i];
                ms_cu_set<S>(a.dacc, i, d);
                sum += (double)d;
            }
        }
        double total = ms_cu_lanes_total(sum);
        if (threadIdx.y == 0 && t.col < a.cols)
            a.partials[t.chunk * a.cols + t.col] = total;
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void dbias_kernel(ms_cu_bias_gelu a)
{
    int64_t chunks = ms_cu_column_chunks(a.rows);
    MS_CU_FOR(j, a.cols)
    {
        ms_cu_set<S>(a.dbias, j, (T)ms_cu_chunks_total(a.partials, chunks, a.cols, j));
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
    MS_CU_LAUNCH_FLOAT(args->dtype, backward_kernel, ms_cu_column_grid(args->rows, args->cols),
                       ms_cu_column_threads(), stream, *args)
    MS_CU_LAUNCH_FLOAT(args->dtype, dbias_kernel, ms_cu_blocks(args->cols), MS_CU_THREADS,
                       stream, *args)
    return ms_cu_last_error();
}
