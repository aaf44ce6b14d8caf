/* moonshard kernels: reductions on the device. One block per kept position: each thread
 * folds a fixed slice in double, then a fixed tree combines the threads (deterministic). */
#include "reduce.cuh"
#include "reduce.h"

enum { SUM, MEAN, MAX, MIN, SUMSQ };
enum { F32 = 0 };

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

template <typename T>
__global__ void reduce_kernel(ms_cu_shape kept, ms_cu_operand out, ms_cu_operand a,
                              ms_cu_shape reduced, ms_cu_operand a_reduced, int op)
{
    __shared__ double partial[MS_CU_THREADS];
    double init = op == MAX ? -INFINITY : op == MIN ? INFINITY : 0.0;
    for (int64_t o = blockIdx.x; o < kept.numel; o += gridDim.x) {
        const T *base = (const T *)a.data + ms_cu_offset(kept, a.strides, o);
        double acc = init;
        for (int64_t r = threadIdx.x; r < reduced.numel; r += blockDim.x)
            acc = fold(op, acc, (double)base[ms_cu_offset(reduced, a_reduced.strides, r)]);
        partial[threadIdx.x] = acc;
        __syncthreads();
        for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
            if (threadIdx.x < width)
                partial[threadIdx.x] = combine(op, partial[threadIdx.x],
                                               partial[threadIdx.x + width]);
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            double result = op == MEAN ? partial[0] / (double)reduced.numel : partial[0];
            ((T *)out.data)[ms_cu_offset(kept, out.strides, o)] = (T)result;
        }
        __syncthreads();
    }
}

template <typename T>
__global__ void max_dim_kernel(ms_cu_shape kept, ms_cu_operand values, ms_cu_operand indices,
                               ms_cu_operand a, int64_t length, int64_t a_stride)
{
    MS_CU_FOR(o, kept.numel)
    {
        const T *row = (const T *)a.data + ms_cu_offset(kept, a.strides, o);
        T best = row[0];
        int64_t best_index = 0;
        for (int64_t k = 1; k < length; k++) {
            T v = row[k * a_stride];
            if (ms_k_argmax_better(v, best)) {
                best = v;
                best_index = k;
            }
        }
        ((T *)values.data)[ms_cu_offset(kept, values.strides, o)] = best;
        ((int64_t *)indices.data)[ms_cu_offset(kept, indices.strides, o)] = best_index;
    }
}

/* ---- launchers ---- */

int ms_cu_reduce(cudaStream_t stream, const ms_cu_shape *kept, ms_cu_operand out,
                 ms_cu_operand a, const ms_cu_shape *reduced, ms_cu_operand a_reduced,
                 int dtype, int op)
{
    /* short reductions use one warp per position, long ones a full block */
    unsigned threads = reduced->numel <= 1024 ? 32 : MS_CU_THREADS;
    unsigned blocks = (unsigned)(kept->numel < 65535 ? kept->numel : 65535);
    if (dtype == F32)
        reduce_kernel<float><<<blocks, threads, 0, stream>>>(*kept, out, a, *reduced, a_reduced, op);
    else
        reduce_kernel<double><<<blocks, threads, 0, stream>>>(*kept, out, a, *reduced, a_reduced, op);
    return ms_cu_last_error();
}

int ms_cu_max_dim(cudaStream_t stream, const ms_cu_shape *kept, ms_cu_operand values,
                  ms_cu_operand indices, ms_cu_operand a, int64_t length, int64_t a_stride,
                  int dtype)
{
    unsigned blocks = ms_cu_blocks(kept->numel);
    if (dtype == F32)
        max_dim_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*kept, values, indices, a, length, a_stride);
    else
        max_dim_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*kept, values, indices, a, length, a_stride);
    return ms_cu_last_error();
}
