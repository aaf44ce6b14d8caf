/* moonshard store: XXH3-64 checksums of chunks and encoded tables.
 * libxxhash's header compiled inline here so the hash uses this machine's vector units. */
#include <stdlib.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "store_internal.h"

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
