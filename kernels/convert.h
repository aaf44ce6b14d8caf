/* moonshard kernels: bf16 and f16 <-> f32 conversions, round to nearest even.
 * NaN stays NaN (quieted, sign kept), infinities stay infinite, overflow rounds to inf. */
#ifndef MS_KERNELS_CONVERT_H
#define MS_KERNELS_CONVERT_H

#include "common.h"

MS_HD float ms_k_bf16_to_f32(uint16_t bits) { return ms_k_bits_f32((uint32_t)bits << 16); }

MS_HD uint16_t ms_k_f32_to_bf16(float value)
{
    uint32_t bits = ms_k_f32_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) /* NaN: truncating could leave an inf pattern */
        return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

MS_HD float ms_k_f16_to_f32(uint16_t bits)
{
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1fu;
    uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0x1fu)
        return ms_k_bits_f32(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24 is exact in f32 */
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return ms_k_bits_f32(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

MS_HD uint16_t ms_k_f32_to_f16(float value)
{
    uint32_t bits = ms_k_f32_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) { /* inf, or NaN with the quiet bit set */
        if (magnitude == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
    }
    if (magnitude >= 0x477ff000u) /* 65520 and above round past the largest f16 (65504) */
        return (uint16_t)(sign | 0x7c00u);
    if (magnitude < 0x38800000u) { /* below 2^-14: an f16 subnormal or zero */
        if (magnitude < 0x33000000u) /* below 2^-25, under half the smallest subnormal */
            return sign;
        uint32_t exponent = magnitude >> 23;
        uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exponent; /* to units of 2^-24 */
        uint32_t half = mantissa >> shift;
        uint32_t rest = mantissa & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (half & 1u)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = (magnitude - 0x38000000u) >> 13; /* rebias 127 -> 15 */
    uint32_t rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u)))
        half++; /* a carry into the exponent is the correct rounding */
    return (uint16_t)(sign | half);
}

#endif
