/* moonshard kernels: block-wide reductions in a fixed order (each thread's slice, then a
 * tree), so row kernels give the same bits on every run. Device only. */
#ifndef MS_KERNELS_BLOCK_CUH
#define MS_KERNELS_BLOCK_CUH

#include "launch.cuh"

/* Sum of every thread's value; all threads get the total. scratch holds blockDim.x. */
__device__ __forceinline__ double ms_cu_block_sum(double value, double *scratch)
{
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
        if (threadIdx.x < width)
            scratch[threadIdx.x] += scratch[threadIdx.x + width];
        __syncthreads();
    }
    double total = scratch[0];
    __syncthreads();
    return total;
}

/* Maximum that keeps a NaN once seen. */
__device__ __forceinline__ double ms_cu_block_max(double value, double *scratch)
{
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) {
            double other = scratch[threadIdx.x + width];
            if (other > scratch[threadIdx.x] || other != other)
                scratch[threadIdx.x] = other;
        }
        __syncthreads();
    }
    double result = scratch[0];
    __syncthreads();
    return result;
}

#endif
