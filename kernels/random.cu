/* moonshard kernels: uniform and normal draws and dropout on the device, one thread per
 * element; the words come from rng.h's Philox, so masks match the CPU backend's. */
#include "random.cuh"
#include "rng.h"

enum { F32 = 0 };

/* ---- kernels ---- */

template <typename T>
__device__ __forceinline__ T uniform_value(const uint32_t *words);
template <>
__device__ __forceinline__ float uniform_value<float>(const uint32_t *words)
{
    return ms_k_uniform24(words[0]);
}
template <>
__device__ __forceinline__ double uniform_value<double>(const uint32_t *words)
{
    return ms_k_uniform53(words[0], words[1]);
}

template <typename T>
__global__ void uniform_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_draw draw)
{
    T low = (T)draw.a, high = (T)draw.b, width = (T)(draw.b - draw.a);
    T below_high = nextafter(high, low);
    MS_CU_FOR(i, shape.numel)
    {
        uint32_t words[4];
        ms_k_rng_block(draw.seed, draw.offset + (uint64_t)i, words);
        T v = low + width * uniform_value<T>(words);
        ((T *)out.data)[ms_cu_offset(shape, out.strides, i)] =
            (v >= high && high > low) ? below_high : v; /* keep the half-open range */
    }
}

template <typename T>
__global__ void normal_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_draw draw)
{
    MS_CU_FOR(i, shape.numel)
    {
        uint32_t words[4];
        ms_k_rng_block(draw.seed, draw.offset + (uint64_t)i, words);
        ((T *)out.data)[ms_cu_offset(shape, out.strides, i)] =
            (T)(draw.a + draw.b * ms_k_normal(words));
    }
}

template <typename T>
__global__ void dropout_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_operand x,
                               ms_cu_draw draw)
{
    T scale = (T)draw.b;
    MS_CU_FOR(i, shape.numel)
    {
        int keep = ms_k_dropout_keep(draw.seed, draw.offset + (uint64_t)i, draw.a);
        T v = ((const T *)x.data)[ms_cu_offset(shape, x.strides, i)];
        ((T *)out.data)[ms_cu_offset(shape, out.strides, i)] = keep ? v * scale : (T)0;
    }
}

/* ---- launchers ---- */

int ms_cu_rand_uniform(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                       const ms_cu_draw *draw)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    if (draw->dtype == F32)
        uniform_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, out, *draw);
    else
        uniform_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, out, *draw);
    return ms_cu_last_error();
}

int ms_cu_rand_normal(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                      const ms_cu_draw *draw)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    if (draw->dtype == F32)
        normal_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, out, *draw);
    else
        normal_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, out, *draw);
    return ms_cu_last_error();
}

int ms_cu_dropout(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                  ms_cu_operand x, const ms_cu_draw *draw)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    if (draw->dtype == F32)
        dropout_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, out, x, *draw);
    else
        dropout_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, out, x, *draw);
    return ms_cu_last_error();
}
