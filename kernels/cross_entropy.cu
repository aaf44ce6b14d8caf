/* moonshard kernels: cross-entropy fused with its log_softmax on the device, one block per
 * row; the row's max and sum go through fixed-order block reductions in double, the element
 * math is kernels/cross_entropy.h's. */
#include "cross_entropy.cuh"
#include "block.cuh"
#include "cross_entropy.h"

enum { F32 = 0, I32 = 4 };
enum { NONE = 0, MEAN = 1, SUM = 2 };

__device__ __forceinline__ int64_t target_of(const ms_cu_nll &a, int64_t i)
{
    int64_t offset = i * a.target_stride;
    return a.target_dtype == I32 ? (int64_t)((const int32_t *)a.target)[offset]
                                 : ((const int64_t *)a.target)[offset];
}

__device__ __forceinline__ float logp_of(float x, float max, float log_sum)
{
    return ms_k_ce_logp_f32(x, max, log_sum);
}
__device__ __forceinline__ double logp_of(double x, double max, double log_sum)
{
    return ms_k_ce_logp_f64(x, max, log_sum);
}
__device__ __forceinline__ float grad_of(float e, float g, int is_target)
{
    return ms_k_ce_grad_f32(e, g, is_target);
}
__device__ __forceinline__ double grad_of(double e, double g, int is_target)
{
    return ms_k_ce_grad_f64(e, g, is_target);
}

template <typename T>
__global__ void forward_kernel(ms_cu_nll a, T *stats, int64_t stats_row, int64_t stats_col,
                               T *losses, int64_t loss_stride)
{
    __shared__ double scratch[MS_CU_THREADS];
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T *x = (const T *)a.logp + r * a.row_stride;
        double local_max = -INFINITY;
        for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
            double v = (double)x[k * a.class_stride];
            if (v > local_max || v != v)
                local_max = v;
        }
        T max = (T)ms_cu_block_max(local_max, scratch);
        double local_sum = 0.0;
        for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x)
            local_sum += (double)exp(x[k * a.class_stride] - max);
        T log_sum = (T)::log(ms_cu_block_sum(local_sum, scratch));
        if (threadIdx.x == 0) {
            int64_t t = target_of(a, r);
            stats[r * stats_row] = max;
            stats[r * stats_row + stats_col] = log_sum;
            losses[r * loss_stride] =
                t == a.ignore_index ? (T)0 : -logp_of(x[t * a.class_stride], max, log_sum);
        }
    }
}

template <typename T>
__global__ void total_kernel(ms_cu_nll a, const T *losses, T *out)
{
    __shared__ double scratch[MS_CU_THREADS];
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < a.rows; i += blockDim.x)
        local += (double)losses[i];
    double total = ms_cu_block_sum(local, scratch);
    if (threadIdx.x == 0) /* no counted target: 0/0 = NaN, as in PyTorch */
        *out = (T)(a.reduction == MEAN ? total / (double)a.counted : total);
}

template <typename T>
__global__ void backward_kernel(ms_cu_nll a, const T *stats, int64_t stats_row,
                                int64_t stats_col, const T *dout, int64_t dout_stride,
                                T *dlogits, int64_t d_row, int64_t d_col)
{
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        int64_t t = target_of(a, r);
        T *g = dlogits + r * d_row;
        if (t == a.ignore_index) {
            for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x)
                g[k * d_col] = (T)0;
            continue;
        }
        double share = a.reduction == NONE  ? (double)dout[r * dout_stride]
                       : a.reduction == SUM ? (double)dout[0]
                                            : (double)dout[0] / (double)a.counted;
        T target_grad = (T)-share;
        T max = stats[r * stats_row], log_sum = stats[r * stats_row + stats_col];
        const T *x = (const T *)a.logp + r * a.row_stride;
        for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x)
            g[k * d_col] = grad_of((T)exp(logp_of(x[k * a.class_stride], max, log_sum)),
                                   target_grad, k == t);
    }
}

static unsigned row_blocks(int64_t rows) { return (unsigned)(rows < 65535 ? rows : 65535); }

int ms_cu_cross_entropy(cudaStream_t stream, const ms_cu_nll *args, void *stats,
                        int64_t stats_row, int64_t stats_col, void *losses, int64_t loss_stride)
{
    unsigned blocks = row_blocks(args->rows);
    if (args->dtype == F32)
        forward_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *args, (float *)stats, stats_row, stats_col, (float *)losses, loss_stride);
    else
        forward_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *args, (double *)stats, stats_row, stats_col, (double *)losses, loss_stride);
    return ms_cu_last_error();
}

int ms_cu_cross_entropy_total(cudaStream_t stream, const ms_cu_nll *args, const void *losses,
                              void *out)
{
    if (args->dtype == F32)
        total_kernel<float><<<1, MS_CU_THREADS, 0, stream>>>(*args, (const float *)losses,
                                                             (float *)out);
    else
        total_kernel<double><<<1, MS_CU_THREADS, 0, stream>>>(*args, (const double *)losses,
                                                              (double *)out);
    return ms_cu_last_error();
}

int ms_cu_cross_entropy_backward(cudaStream_t stream, const ms_cu_nll *args, const void *stats,
                                 int64_t stats_row, int64_t stats_col, const void *dout,
                                 int64_t dout_stride, void *dlogits, int64_t d_row,
                                 int64_t d_col)
{
    unsigned blocks = row_blocks(args->rows);
    if (args->dtype == F32)
        backward_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *args, (const float *)stats, stats_row, stats_col, (const float *)dout, dout_stride,
            (float *)dlogits, d_row, d_col);
    else
        backward_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *args, (const double *)stats, stats_row, stats_col, (const double *)dout,
            dout_stride, (double *)dlogits, d_row, d_col);
    return ms_cu_last_error();
}
