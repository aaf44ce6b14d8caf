/* moonshard kernels: order keys, unsigned integers that sort as the floats they stand for, so
 * an integer max or min (NCCL's, which need not propagate NaN on floats) reduces floats.
 *
 * A key is the value's bits with the sign bit set when the sign is clear, and every bit
 * inverted when it is set: unsigned order of keys is float order, with -0 just below +0.
 * A NaN (any sign or payload) is replaced first by the quiet NaN that wins the reduction:
 * for max the positive one, whose key is above +inf's; for min the negative one, whose key
 * is below -inf's. Decoding inverts the key, so every other value comes back bit for bit.
 * Values and keys are bit patterns; f16 and bf16 keys use 16 of their 32 bits (NCCL has
 * no 16-bit integer type). for_max is 1 for max, 0 for min. */
#ifndef MS_KERNELS_ORDER_KEYS_H
#define MS_KERNELS_ORDER_KEYS_H

#include "common.h"

MS_HD uint32_t ms_k_order_key32(uint32_t bits)
{
    return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

MS_HD uint32_t ms_k_from_order_key32(uint32_t key)
{
    return (key & 0x80000000u) ? key & 0x7fffffffu : ~key;
}

MS_HD uint64_t ms_k_order_key64(uint64_t bits)
{
    return (bits & 0x8000000000000000ull) ? ~bits : bits | 0x8000000000000000ull;
}

MS_HD uint64_t ms_k_from_order_key64(uint64_t key)
{
    return (key & 0x8000000000000000ull) ? key & 0x7fffffffffffffffull : ~key;
}

MS_HD uint32_t ms_k_order_key16(uint16_t bits)
{
    return (bits & 0x8000u) ? (uint32_t)(uint16_t)~bits : (uint32_t)(bits | 0x8000u);
}

MS_HD uint16_t ms_k_from_order_key16(uint32_t key)
{
    return (key & 0x8000u) ? (uint16_t)(key & 0x7fffu) : (uint16_t)~key;
}

MS_HD uint32_t ms_k_f32_order_key(uint32_t bits, int for_max)
{
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        bits = for_max ? 0x7fc00000u : 0xffc00000u;
    return ms_k_order_key32(bits);
}

MS_HD uint64_t ms_k_f64_order_key(uint64_t bits, int for_max)
{
    if ((bits & 0x7fffffffffffffffull) > 0x7ff0000000000000ull)
        bits = for_max ? 0x7ff8000000000000ull : 0xfff8000000000000ull;
    return ms_k_order_key64(bits);
}

/* f16 and bf16 differ only in where the exponent ends: infinity and quiet_nan are their
 * positive patterns. */
MS_HD uint32_t ms_k_order_key16_of(uint16_t bits, uint16_t infinity, uint16_t quiet_nan,
                                   int for_max)
{
    if ((bits & 0x7fffu) > infinity)
        bits = for_max ? quiet_nan : (uint16_t)(quiet_nan | 0x8000u);
    return ms_k_order_key16(bits);
}

MS_HD uint32_t ms_k_f16_order_key(uint16_t bits, int for_max)
{
    return ms_k_order_key16_of(bits, 0x7c00u, 0x7e00u, for_max);
}

MS_HD uint32_t ms_k_bf16_order_key(uint16_t bits, int for_max)
{
    return ms_k_order_key16_of(bits, 0x7f80u, 0x7fc0u, for_max);
}

#endif
