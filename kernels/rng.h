/* moonshard kernels: the counter-based random stream (Philox4x32-10, Salmon et al. 2011).
 * Element i of a draw uses block (seed, offset + i): four 32-bit words, no state to carry. */
#ifndef MS_KERNELS_RNG_H
#define MS_KERNELS_RNG_H

#include "common.h"

#define MS_K_PHILOX_M0 0xD2511F53u
#define MS_K_PHILOX_M1 0xCD9E8D57u
#define MS_K_PHILOX_W0 0x9E3779B9u
#define MS_K_PHILOX_W1 0xBB67AE85u

/* Philox4x32 with 10 rounds: out = block cipher of counter under key. */
MS_HD void ms_k_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)MS_K_PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)MS_K_PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += MS_K_PHILOX_W0;
        k1 += MS_K_PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* The four words of element counter `index` of stream `seed`. */
MS_HD void ms_k_rng_block(uint64_t seed, uint64_t index, uint32_t out[4])
{
    uint32_t counter[4] = {(uint32_t)index, (uint32_t)(index >> 32), 0u, 0u};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    ms_k_philox4x32_10(counter, key, out);
}

/* Uniform in [0, 1) from the top 24 bits of one word (every f32 value on a 2^-24 grid). */
MS_HD float ms_k_uniform24(uint32_t word) { return (float)(word >> 8) * 5.9604644775390625e-8f; }

/* Uniform in [0, 1) from 53 bits of two words. */
MS_HD double ms_k_uniform53(uint32_t high, uint32_t low)
{
    uint64_t bits = (((uint64_t)high << 32) | low) >> 11;
    return (double)bits * 1.1102230246251565404e-16; /* 2^-53 */
}

/* Standard normal by Box-Muller from one block: u1 in (0, 1] keeps the log finite. */
MS_HD double ms_k_normal(const uint32_t words[4])
{
    double u1 = 1.0 - ms_k_uniform53(words[0], words[1]);
    double u2 = ms_k_uniform53(words[2], words[3]);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * MS_K_PI * u2);
}

/* Dropout keeps element `index` with probability 1 - p. The decision uses 53 bits whatever
 * the tensor's dtype, so f32 and f64 runs of the same stream drop the same elements. */
MS_HD int ms_k_dropout_keep(uint64_t seed, uint64_t index, double p)
{
    uint32_t words[4];
    ms_k_rng_block(seed, index, words);
    return ms_k_uniform53(words[0], words[1]) >= p;
}

#endif
