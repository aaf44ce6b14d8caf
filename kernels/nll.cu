/* moonshard kernels: negative log likelihood on the device. The reduced forms sum the rows
 * in one block in a fixed order (double); the backward writes one element per row. bf16 and
 * f16 are read and written as they are, each result rounded once through f32. */
#include "nll.cuh"
#include "block.cuh"
#include "value.cuh"

enum { I32 = 4 };
enum { NONE = 0, MEAN = 1, SUM = 2 };

__device__ __forceinline__ int64_t target_at(const ms_cu_nll &a, int64_t i)
{
    int64_t offset = i * a.target_stride;
    return a.target_dtype == I32 ? (int64_t)((const int32_t *)a.target)[offset]
                                 : ((const int64_t *)a.target)[offset];
}

/* S: the stored element type; T: the type computed in. */
template <typename S>
__device__ __forceinline__ double row_loss(const ms_cu_nll &a, int64_t i)
{
    int64_t t = target_at(a, i);
    return t == a.ignore_index
               ? 0.0
               : -(double)ms_cu_get<S>(a.logp, i * a.row_stride + t * a.class_stride);
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

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void per_row_kernel(ms_cu_nll a, void *out, int64_t out_stride)
{
    MS_CU_FOR(i, a.rows)
    {
        ms_cu_set<S>(out, i * out_stride, (T)row_loss<S>(a, i));
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void total_kernel(ms_cu_nll a, void *out)
{
    __shared__ double scratch[MS_CU_THREADS];
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < a.rows; i += blockDim.x)
        local += row_loss<S>(a, i);
    double total = ms_cu_block_sum(local, scratch);
    if (threadIdx.x == 0) /* no counted target: 0/0 = NaN, as in PyTorch */
        ms_cu_set<S>(out, 0, (T)(a.reduction == MEAN ? total / (double)a.counted : total));
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void backward_kernel(ms_cu_nll a, const void *dout, int64_t dout_stride)
{
    MS_CU_FOR(i, a.rows)
    {
        int64_t t = target_at(a, i);
        if (t == a.ignore_index)
            continue;
        double g = a.reduction == NONE   ? (double)ms_cu_get<S>(dout, i * dout_stride)
                   : a.reduction == SUM ? (double)ms_cu_get<S>(dout, 0)
                                        : (double)ms_cu_get<S>(dout, 0) / (double)a.counted;
        ms_cu_set<S>(a.logp, i * a.row_stride + t * a.class_stride, (T)-g);
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
    if (args->reduction == NONE) {
        MS_CU_LAUNCH_FLOAT(args->dtype, per_row_kernel, ms_cu_blocks(args->rows), MS_CU_THREADS,
                           stream, *args, out, out_stride)
    } else {
        MS_CU_LAUNCH_FLOAT(args->dtype, total_kernel, 1, MS_CU_THREADS, stream, *args, out)
    }
    return ms_cu_last_error();
}

int ms_cu_nll_loss_backward(cudaStream_t stream, const ms_cu_nll *args, const void *dout,
                            int64_t dout_stride)
{
    MS_CU_LAUNCH_FLOAT(args->dtype, backward_kernel, ms_cu_blocks(args->rows), MS_CU_THREADS,
                       stream, *args, dout, dout_stride)
    return ms_cu_last_error();
}
