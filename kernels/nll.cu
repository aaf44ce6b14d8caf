/* moonshard kernels: negative log likelihood on the device. The reduced forms sum the rows
 * in one block in a fixed order (double); the backward writes one element per row. */
#include "nll.cuh"
#include "block.cuh"

enum { F32 = 0, I32 = 4 };
enum { NONE = 0, MEAN = 1, SUM = 2 };

__device__ __forceinline__ int64_t target_at(const ms_cu_nll &a, int64_t i)
{
    int64_t offset = i * a.target_stride;
    return a.target_dtype == I32 ? (int64_t)((const int32_t *)a.target)[offset]
                                 : ((const int64_t *)a.target)[offset];
}

template <typename T>
__device__ __forceinline__ double row_loss(const ms_cu_nll &a, int64_t i)
{
    int64_t t = target_at(a, i);
    return t == a.ignore_index
               ? 0.0
               : -(double)((const T *)a.logp)[i * a.row_stride + t * a.class_stride];
}

/* ---- kernels ---- */

__global__ void check_kernel(ms_cu_nll a, int64_t *result)
{
    MS_CU_FOR(i, a.rows)
    {
        int64_t t = target_at(a, i);
        if (t == a.ignore_index)
            continue;
        if (t < 0 || t >= a.classes)
            atomicMin((unsigned long long *)&result[0], (unsigned long long)i);
        else
            atomicAdd((unsigned long long *)&result[1], 1ull);
    }
}

template <typename T>
__global__ void per_row_kernel(ms_cu_nll a, T *out, int64_t out_stride)
{
    MS_CU_FOR(i, a.rows)
    {
        out[i * out_stride] = (T)row_loss<T>(a, i);
    }
}

template <typename T>
__global__ void total_kernel(ms_cu_nll a, T *out)
{
    __shared__ double scratch[MS_CU_THREADS];
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < a.rows; i += blockDim.x)
        local += row_loss<T>(a, i);
    double total = ms_cu_block_sum(local, scratch);
    if (threadIdx.x == 0) /* no counted target: 0/0 = NaN, as in PyTorch */
        *out = (T)(a.reduction == MEAN ? total / (double)a.counted : total);
}

template <typename T>
__global__ void backward_kernel(ms_cu_nll a, const T *dout, int64_t dout_stride)
{
    MS_CU_FOR(i, a.rows)
    {
        int64_t t = target_at(a, i);
        if (t == a.ignore_index)
            continue;
        double g = a.reduction == NONE   ? (double)dout[i * dout_stride]
                   : a.reduction == SUM ? (double)dout[0]
                                        : (double)dout[0] / (double)a.counted;
        ((T *)a.logp)[i * a.row_stride + t * a.class_stride] = (T)-g;
    }
}

/* ---- launchers ---- */

int ms_cu_check_targets(cudaStream_t stream, const ms_cu_nll *args, int64_t *result)
{
    check_kernel<<<ms_cu_blocks(args->rows), MS_CU_THREADS, 0, stream>>>(*args, result);
    return ms_cu_last_error();
}

int ms_cu_nll_loss(cudaStream_t stream, const ms_cu_nll *args, void *out, int64_t out_stride)
{
    unsigned blocks = ms_cu_blocks(args->rows);
    if (args->reduction == NONE && args->dtype == F32)
        per_row_kernel<float>
            <<<blocks, MS_CU_THREADS, 0, stream>>>(*args, (float *)out, out_stride);
    else if (args->reduction == NONE)
        per_row_kernel<double>
            <<<blocks, MS_CU_THREADS, 0, stream>>>(*args, (double *)out, out_stride);
    else if (args->dtype == F32)
        total_kernel<float><<<1, MS_CU_THREADS, 0, stream>>>(*args, (float *)out);
    else
        total_kernel<double><<<1, MS_CU_THREADS, 0, stream>>>(*args, (double *)out);
    return ms_cu_last_error();
}

int ms_cu_nll_loss_backward(cudaStream_t stream, const ms_cu_nll *args, const void *dout,
                            int64_t dout_stride)
{
    unsigned blocks = ms_cu_blocks(args->rows);
    if (args->dtype == F32)
        backward_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*args, (const float *)dout,
                                                                      dout_stride);
    else
        backward_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*args, (const double *)dout,
                                                                       dout_stride);
    return ms_cu_last_error();
}
