/* moonshard store: checking the stored chunks of an entry against their checksums, for
 * store:verify() and for callers that want a whole step checked before loading it. */
#include "store_internal.h"

static int verify_chunk(ms_store *s, int64_t step, const store_entry *e, store_chunk *c)
{
    uint64_t nbytes = (uint64_t)chunk_numel(c, e->ndim) * ms_dtype_size(e->dtype);
    const uint8_t *stored;
    MS_CHECK(store_fetch_chunk(s, step, e, c, nbytes, &stored));
    prefetch_chunk(stored, nbytes);
    uint64_t digest = checksum_bytes(stored, nbytes);
    if (digest != c->checksum)
        return chunk_corrupt(s, step, e, c, digest);
    c->verified = true;
    return MS_OK;
}

int ms_store_verify_entry(ms_store *s, int64_t step, const char *fqn)
{
    MS_CHECK(store_check(s, "store_verify_entry"));
    step_manifest *m;
    store_entry *e;
    MS_CHECK(store_find_entry(s, step, fqn, &m, &e));
    int status = MS_OK;
    for (uint32_t i = 0; i < e->chunk_count && !status; i++) {
        status = verify_chunk(s, step, e, &e->chunks[i]);
        store_end_reads(s);
    }
    return status;
}
