/* moonshard kernels: reductions on the device. A block folds a kept position (or a fixed
 * chunk of a long one): each thread a fixed slice in double, then a fixed tree, then the
 * chunks in order, so results never depend on scheduling. bf16 and f16 are read and
 * written as they are, the result rounded once through f32. */
#include "reduce.cuh"
#include "reduce.h"
#include "value.cuh"

enum { SUM, MEAN, MAX, MIN, SUMSQ };

/* ---- kernels ---- */

__device__ __forceinline__ double fold(int op, double acc, double x)
{
    switch (op) {
    case MAX: return ms_k_max_step(acc, x);
    case MIN: return ms_k_min_step(acc, x);
    case SUMSQ: return ms_k_sumsq_step(acc, x);
    default: return ms_k_sum_step(acc, x);
    }
}

__device__ __forceinline__ double combine(int op, double acc, double x)
{
    return op == MAX ? ms_k_max_step(acc, x) : op == MIN ? ms_k_min_step(acc, x) : acc + x;
}

/* Block b folds chunk b % chunks of kept position b / chunks: each thread a fixed slice
 * in double, then a fixed tree. With one chunk the block writes the result; with more it
 * writes a partial that finish_kernel combines in chunk order. */
template <typename S>
__global__ void reduce_kernel(ms_cu_shape kept, ms_cu_operand out, ms_cu_operand a,
                              ms_cu_shape reduced, ms_cu_operand a_reduced, int op,
                              int64_t chunks, double *partials)
{
    __shared__ double partial[MS_CU_THREADS];
    double init = op == MAX ? -INFINITY : op == MIN ? INFINITY : 0.0;
    int64_t chunk_length = (reduced.numel + chunks - 1) / chunks;
    for (int64_t b = blockIdx.x; b < kept.numel * chunks; b += gridDim.x) {
        int64_t o = b / chunks, chunk = b % chunks;
        int64_t first = chunk * chunk_length;
        int64_t last = first + chunk_length < reduced.numel ? first + chunk_length : reduced.numel;
        const S *base = (const S *)a.data + ms_cu_offset(kept, a.strides, o);
        double acc = init;
        for (int64_t r = first + threadIdx.x; r < last; r += blockDim.x)
            acc = fold(op, acc,
                       (double)ms_cu_widen(base[ms_cu_offset(reduced, a_reduced.strides, r)]));
        partial[threadIdx.x] = acc;
        __syncthreads();
        for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
            if (threadIdx.x < width)
                partial[threadIdx.x] = combine(op, partial[threadIdx.x],
                                               partial[threadIdx.x + width]);
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            if (chunks > 1) {
                partials[b] = partial[0];
            } else {
                double result = op == MEAN ? partial[0] / (double)reduced.numel : partial[0];
                ms_cu_set<S>(out.data, ms_cu_offset(kept, out.strides, o),
                             (typename ms_cu_math<S>::type)result);
            }
        }
        __syncthreads();
    }
}

/* One thread per kept position combines its chunks' partials in order. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void finish_kernel(ms_cu_shape kept, ms_cu_operand out, int64_t count, int op,
                              int64_t chunks, const double *partials)
{
    MS_CU_FOR(o, kept.numel)
    {
        double acc = partials[o * chunks];
        for (int64_t c = 1; c < chunks; c++)
            acc = combine(op, acc, partials[o * chunks + c]);
        ms_cu_set<S>(out.data, ms_cu_offset(kept, out.strides, o),
                     (T)(op == MEAN ? acc / (double)count : acc));
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void max_dim_kernel(ms_cu_shape kept, ms_cu_operand values, ms_cu_operand indices,
                               ms_cu_operand a, int64_t length, int64_t a_stride)
{
    MS_CU_FOR(o, kept.numel)
    {
        const S *row = (const S *)a.data + ms_cu_offset(kept, a.strides, o);
        T best = ms_cu_widen(row[0]);
        int64_t best_index = 0;
        for (int64_t k = 1; k < length; k++) {
            T v = ms_cu_widen(row[k * a_stride]);
            if (ms_k_argmax_better(v, best)) {
                best = v;
                best_index = k;
            }
        }
        ms_cu_set<S>(values.data, ms_cu_offset(kept, values.strides, o), best);
        ((int64_t *)indices.data)[ms_cu_offset(kept, indices.strides, o)] = best_index;
    }
}

/* ---- launchers ---- */

int64_t ms_cu_reduce_chunks(int64_t kept, int64_t reduced)
{
    if (kept >= MS_CU_REDUCE_WIDE || reduced < 2 * MS_CU_REDUCE_CHUNK)
        return 1;
    int64_t chunks = reduced / MS_CU_REDUCE_CHUNK;
    int64_t limit = MS_CU_REDUCE_WIDE / kept;
    return chunks < limit ? chunks : limit;
}

int ms_cu_reduce(cudaStream_t stream, const ms_cu_shape *kept, ms_cu_operand out,
                 ms_cu_operand a, const ms_cu_shape *reduced, ms_cu_operand a_reduced,
                 int dtype, int op, double *partials)
{
    int64_t chunks = ms_cu_reduce_chunks(kept->numel, reduced->numel);
    /* short reductions use one warp per position, long ones a full block */
    unsigned threads = reduced->numel / chunks <= 1024 ? 32 : MS_CU_THREADS;
    int64_t work = kept->numel * chunks;
    unsigned blocks = (unsigned)(work < 65535 ? work : 65535);
    MS_CU_LAUNCH_FLOAT(dtype, reduce_kernel, blocks, threads, stream, *kept, out, a, *reduced,
                       a_reduced, op, chunks, partials)
    if (chunks == 1)
        return ms_cu_last_error();
    unsigned finish_blocks = ms_cu_blocks(kept->numel);
    MS_CU_LAUNCH_FLOAT(dtype, finish_kernel, finish_blocks, MS_CU_THREADS, stream, *kept, out,
                       reduced->numel, op, chunks, partials)
    return ms_cu_last_error();
}

int ms_cu_max_dim(cudaStream_t stream, const ms_cu_shape *kept, ms_cu_operand values,
                  ms_cu_operand indices, ms_cu_operand a, int64_t length, int64_t a_stride,
                  int dtype)
{
    unsigned blocks = ms_cu_blocks(kept->numel);
    MS_CU_LAUNCH_FLOAT(dtype, max_dim_kernel, blocks, MS_CU_THREADS, stream, *kept, values,
                       indices, a, length, a_stride)
    return ms_cu_last_error();
}
