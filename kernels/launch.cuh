/* moonshard kernels: what every CUDA launcher takes: an iteration shape, strided operands and
 * a stream. Plain C for the launchers' callers in runtime/cuda/; device helpers for the .cu. */
#ifndef MS_KERNELS_LAUNCH_CUH
#define MS_KERNELS_LAUNCH_CUH

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
#define MS_CU_API extern "C"
#else
#define MS_CU_API
#endif

enum { MS_CU_MAX_DIMS = 8, MS_CU_THREADS = 256 };

/* Elements visited in row-major order over sizes[0..ndim). */
typedef struct ms_cu_shape {
    int32_t ndim;
    int64_t numel;
    int64_t sizes[MS_CU_MAX_DIMS];
} ms_cu_shape;

/* An operand over a ms_cu_shape: element 0's address and a stride per dim in elements (0
 * where the operand is broadcast). */
typedef struct ms_cu_operand {
    void *data;
    int64_t strides[MS_CU_MAX_DIMS];
} ms_cu_operand;

/* Launchers return the cudaError_t of the launch (cudaSuccess = 0). */

#ifdef __CUDACC__
/* Element offset of row-major position i of shape in an operand with strides. */
__device__ __forceinline__ int64_t ms_cu_offset(const ms_cu_shape &shape,
                                                const int64_t *strides, int64_t i)
{
    int64_t offset = 0;
    for (int d = shape.ndim - 1; d >= 0; d--) {
        int64_t size = shape.sizes[d];
        offset += (i % size) * strides[d];
        i /= size;
    }
    return offset;
}

/* A grid-stride loop over [0, n). */
#define MS_CU_FOR(i, n)                                                                  \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n);            \
         i += (int64_t)blockDim.x * gridDim.x)

/* Blocks for n elements at MS_CU_THREADS each, capped (the loops stride over the rest). */
static inline unsigned ms_cu_blocks(int64_t n)
{
    int64_t blocks = (n + MS_CU_THREADS - 1) / MS_CU_THREADS;
    return (unsigned)(blocks < 1 ? 1 : blocks > 65535 ? 65535 : blocks);
}

static inline int ms_cu_last_error(void) { return (int)cudaGetLastError(); }
#endif

#endif
