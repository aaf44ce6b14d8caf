/* moonshard store: XXH3-64 checksums of chunks and encoded tables, and copies that hash.
 * libxxhash's header compiled inline here so the hash uses this machine's vector units. */
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "store_internal.h"
#include "stream.h"

struct checksum_state {
    XXH3_state_t state;
};

int checksum_new(checksum_state **out)
{
    checksum_state *st = aligned_alloc(64, (sizeof *st + 63) / 64 * 64);
    if (!st)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory for a checksum state");
    XXH3_INITSTATE(&st->state);
    XXH3_64bits_reset(&st->state);
    *out = st;
    return MS_OK;
}

void checksum_free(checksum_state *st)
{
    free(st);
}

void checksum_reset(checksum_state *st)
{
    XXH3_64bits_reset(&st->state);
}

void checksum_update(checksum_state *st, const void *data, size_t n)
{
    XXH3_64bits_update(&st->state, data, n);
}

uint64_t checksum_digest(checksum_state *st)
{
    return XXH3_64bits_digest(&st->state);
}

uint64_t checksum_bytes(const void *data, size_t n)
{
    return XXH3_64bits(data, n);
}

/* Copy count stripes to dst while adding them to the accumulators (secret: their first key). */
static void copy_stripes(xxh_u64 *acc, uint8_t *dst, const uint8_t *src, const xxh_u8 *secret,
                         size_t count, bool streaming)
{
    for (size_t i = 0; i < count; i++) {
        const uint8_t *stripe = src + i * XXH_STRIPE_LEN;
        if (streaming)
            stream_line(dst + i * XXH_STRIPE_LEN, stripe);
        else
            memcpy(dst + i * XXH_STRIPE_LEN, stripe, XXH_STRIPE_LEN);
        XXH3_accumulate_512(acc, stripe, secret + i * XXH_SECRET_CONSUME_RATE);
    }
}

/* XXH3-64's long-input loop with the default secret, built from libxxhash's own stripe,
 * scramble and merge steps, with the copy in it: the hash's arithmetic then runs while the
 * copy waits for memory, where a hash pass of its own would add its full time. */
uint64_t checksum_copy(uint8_t *dst, const uint8_t *src, size_t n, bool streaming)
{
    if (n <= XXH3_MIDSIZE_MAX) {
        memcpy(dst, src, n);
        return XXH3_64bits(src, n);
    }
    streaming = streaming && (uintptr_t)dst % STREAM_LINE_BYTES == 0;
    const xxh_u8 *secret = XXH3_kSecret;
    size_t secret_bytes = sizeof XXH3_kSecret;
    size_t stripes_per_block = (secret_bytes - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
    size_t block_bytes = stripes_per_block * XXH_STRIPE_LEN;
    size_t blocks = (n - 1) / block_bytes;
    XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB] = XXH3_INIT_ACC;
    for (size_t b = 0; b < blocks; b++) {
        copy_stripes(acc, dst + b * block_bytes, src + b * block_bytes, secret, stripes_per_block,
                     streaming);
        XXH3_scrambleAcc(acc, secret + secret_bytes - XXH_STRIPE_LEN);
    }
    size_t done = blocks * block_bytes;
    size_t last_stripes = (n - 1 - done) / XXH_STRIPE_LEN;
    copy_stripes(acc, dst + done, src + done, secret, last_stripes, streaming);
    done += last_stripes * XXH_STRIPE_LEN;
    memcpy(dst + done, src + done, n - done);
    XXH3_accumulate_512(acc, src + n - XXH_STRIPE_LEN,
                        secret + secret_bytes - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START);
    if (streaming)
        stream_fence();
    return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START, (xxh_u64)n * XXH_PRIME64_1);
}
