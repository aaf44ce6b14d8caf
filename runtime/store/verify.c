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

typedef struct verify_args {
    ms_store *s;
    int64_t step;
    const store_entry *e;
    store_chunk *c;
} verify_args;

static int verify_chunk_guarded(void *arg)
{
    verify_args *a = arg;
    return verify_chunk(a->s, a->step, a->e, a->c);
}

int ms_store_verify_entry(ms_store *s, int64_t step, const char *fqn)
{
    MS_CHECK(store_check(s, "store_verify_entry"));
    step_manifest *m;
    store_entry *e;
    MS_CHECK(store_find_entry(s, step, fqn, &m, &e));
    int status = MS_OK;
    for (uint32_t i = 0; i < e->chunk_count && !status; i++) {
        verify_args a = {s, step, e, &e->chunks[i]};
        status = guard_run(verify_chunk_guarded, &a);
        store_after_guarded_reads(s, status);
    }
    return status;
}
