/* moonshard kernels: order keys on the device, one thread per element, through the key math
 * of order_keys.h that the CPU tests check. Outputs are assigned; in place is allowed. */
#include "order_keys.cuh"
#include "order_keys.h"

enum { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

/* ---- kernels ---- */

struct f32_keys {
    typedef uint32_t value;
    typedef uint32_t key;
    static __device__ key encode(value v, int for_max) { return ms_k_f32_order_key(v, for_max); }
    static __device__ value decode(key k) { return ms_k_from_order_key32(k); }
};

struct f64_keys {
    typedef uint64_t value;
    typedef uint64_t key;
    static __device__ key encode(value v, int for_max) { return ms_k_f64_order_key(v, for_max); }
    static __device__ value decode(key k) { return ms_k_from_order_key64(k); }
};

struct f16_keys {
    typedef uint16_t value;
    typedef uint32_t key;
    static __device__ key encode(value v, int for_max) { return ms_k_f16_order_key(v, for_max); }
    static __device__ value decode(key k) { return ms_k_from_order_key16(k); }
};

struct bf16_keys {
    typedef uint16_t value;
    typedef uint32_t key;
    static __device__ key encode(value v, int for_max) { return ms_k_bf16_order_key(v, for_max); }
    static __device__ value decode(key k) { return ms_k_from_order_key16(k); }
};

/* keys and values may be one buffer: each thread reads its element before writing it. */
template <typename Format>
__global__ void encode_kernel(typename Format::key *keys, const typename Format::value *values,
                              int64_t count, int for_max)
{
    MS_CU_FOR(i, count) keys[i] = Format::encode(values[i], for_max);
}

template <typename Format>
__global__ void decode_kernel(typename Format::value *values, const typename Format::key *keys,
                              int64_t count)
{
    MS_CU_FOR(i, count) values[i] = Format::decode(keys[i]);
}

/* ---- launchers ---- */

template <typename Format>
static int encode(cudaStream_t stream, void *keys, const void *values, int64_t count, int for_max)
{
    encode_kernel<Format><<<ms_cu_blocks(count), MS_CU_THREADS, 0, stream>>>(
        (typename Format::key *)keys, (const typename Format::value *)values, count, for_max);
    return ms_cu_last_error();
}

template <typename Format>
static int decode(cudaStream_t stream, void *values, const void *keys, int64_t count)
{
    decode_kernel<Format><<<ms_cu_blocks(count), MS_CU_THREADS, 0, stream>>>(
        (typename Format::value *)values, (const typename Format::key *)keys, count);
    return ms_cu_last_error();
}

int ms_cu_order_keys_encode(cudaStream_t stream, void *keys, const void *values, int64_t count,
                            int dtype, int for_max)
{
    switch (dtype) {
    case F32: return encode<f32_keys>(stream, keys, values, count, for_max);
    case F64: return encode<f64_keys>(stream, keys, values, count, for_max);
    case F16: return encode<f16_keys>(stream, keys, values, count, for_max);
    case BF16: return encode<bf16_keys>(stream, keys, values, count, for_max);
    default: return (int)cudaErrorInvalidValue;
    }
}

int ms_cu_order_keys_decode(cudaStream_t stream, void *values, const void *keys, int64_t count,
                            int dtype)
{
    switch (dtype) {
    case F32: return decode<f32_keys>(stream, values, keys, count);
    case F64: return decode<f64_keys>(stream, values, keys, count);
    case F16: return decode<f16_keys>(stream, values, keys, count);
    case BF16: return decode<bf16_keys>(stream, values, keys, count);
    default: return (int)cudaErrorInvalidValue;
    }
}
