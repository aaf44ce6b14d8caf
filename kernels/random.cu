/* moonshard kernels: uniform and normal draws and dropout on the device, one thread per
 * element; the words come from rng.h's Philox, so masks match the CPU backend's. bf16 and
 * f16 are drawn in f32 and rounded once at the store. */
#include "random.cuh"
#include "rng.h"
#include "value.cuh"

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

/* S: the stored element type; T: the type computed in. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void uniform_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_draw draw)
{
    T low = (T)draw.a, high = (T)draw.b, width = (T)(draw.b - draw.a);
    T below_high = nextafter(high, low);
    MS_CU_FOR(i, shape.numel)
    {
        uint32_t words[4];
        ms_k_rng_block(draw.seed, draw.offset + (uint64_t)i, words);
        T v = low + width * uniform_value<T>(words);
        ms_cu_set<S>(out.data, ms_cu_offset(shape, out.strides, i),
                     (v >= high && high > low) ? below_high : v); /* keep the half-open range */
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void normal_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_draw draw)
{
    MS_CU_FOR(i, shape.numel)
    {
        uint32_t words[4];
        ms_k_rng_block(draw.seed, draw.offset + (uint64_t)i, words);
        ms_cu_set<S>(out.data, ms_cu_offset(shape, out.strides, i),
                     (T)(draw.a + draw.b * ms_k_normal(words)));
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void dropout_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_operand x,
                               ms_cu_draw draw)
{
    T scale = (T)draw.b;
    MS_CU_FOR(i, shape.numel)
    {
        int keep = ms_k_dropout_keep(draw.seed, draw.offset + (uint64_t)i, draw.a);
        T v = ms_cu_get<S>(x.data, ms_cu_offset(shape, x.strides, i));
        ms_cu_set<S>(out.data, ms_cu_offset(shape, out.strides, i), keep ? v * scale : (T)0);
    }
}

/* ---- launchers ---- */

int ms_cu_rand_uniform(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                       const ms_cu_draw *draw)
{
    MS_CU_LAUNCH_FLOAT(draw->dtype, uniform_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS,
                       stream, *shape, out, *draw)
    return ms_cu_last_error();
}

int ms_cu_rand_normal(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                      const ms_cu_draw *draw)
{
    MS_CU_LAUNCH_FLOAT(draw->dtype, normal_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS,
                       stream, *shape, out, *draw)
    return ms_cu_last_error();
}

int ms_cu_dropout(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                  ms_cu_operand x, const ms_cu_draw *draw)
{
    MS_CU_LAUNCH_FLOAT(draw->dtype, dropout_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS,
                       stream, *shape, out, x, *draw)
    return ms_cu_last_error();
}
