/* moonshard store: the committing rank's side of a save - chunk tables out and in, and
 * the manifest that makes the step exist, checked and committed in one transaction. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

enum { MAX_WORLD_SIZE = 1 << 24, INDEX_GROW_ATTEMPTS = 8 };

static int check_data_committed(ms_store *s, const char *op)
{
    MS_CHECK(store_check(s, op));
    if (s->save_state != SAVE_DATA_COMMITTED)
        return MS_FAIL(MS_ERR_STATE,
                       "%s: %s: this handle has not committed the data of a save (call "
                       "ms_store_commit_data, or ms_store_wait in the background)",
                       op, s->path);
    return MS_OK;
}

int ms_store_chunk_table(ms_store *s, const void **table, int64_t *size)
{
    MS_CHECK(check_data_committed(s, "store_chunk_table"));
    if (!table || !size)
        return MS_FAIL(MS_ERR_INVALID, "store_chunk_table: table and size must not be NULL");
    *table = s->table_bytes.data;
    *size = (int64_t)s->table_bytes.size;
    return MS_OK;
}

static int mark_merged(ms_store *s, uint32_t rank)
{
    if (rank >= MAX_WORLD_SIZE)
        return MS_FAIL(MS_ERR_MISMATCH, "%s: a chunk table comes from rank %u", s->path, rank);
    if ((size_t)rank >= s->merged_capacity) {
        size_t capacity = (size_t)rank + 1;
        bool *grown = realloc(s->merged_ranks, capacity * sizeof *grown);
        if (!grown)
            return MS_FAIL(MS_ERR_OOM, "store: out of memory");
        memset(grown + s->merged_capacity, 0, (capacity - s->merged_capacity) * sizeof *grown);
        s->merged_ranks = grown;
        s->merged_capacity = capacity;
    }
    if (s->merged_ranks[rank])
        return MS_FAIL(MS_ERR_MISMATCH,
                       "%s: step %lld: the chunk table of rank %u was merged "
                       "already",
                       s->path, (long long)s->save_step, rank);
    s->merged_ranks[rank] = true;
    return MS_OK;
}

int ms_store_merge_chunk_table(ms_store *s, const void *table, int64_t size)
{
    MS_CHECK(check_data_committed(s, "store_merge_chunk_table"));
    if (!table || size < 0)
        return MS_FAIL(MS_ERR_INVALID, "store_merge_chunk_table: needs a table and a size >= 0");
    table_header header;
    int status = table_decode(&s->incoming, &header, TABLE_CHUNKS, table, (size_t)size);
    if (status)
        return store_fail_in_context(s, s->save_step, status);
    if (header.step != s->save_step)
        return MS_FAIL(MS_ERR_MISMATCH,
                       "%s: the chunk table of rank %u is for step %lld, this save is step %lld",
                       s->path, header.rank, (long long)header.step, (long long)s->save_step);
    MS_CHECK(mark_merged(s, header.rank));
    char where[256];
    snprintf(where, sizeof where, "%s: step %lld", s->path, (long long)s->save_step);
    status = table_merge(&s->merged, &s->incoming, header.rank, where);
    if (status)
        s->merge_failed = true;
    return status;
}

static int check_ranks(ms_store *s, int world_size)
{
    if (world_size < 1 || world_size > MAX_WORLD_SIZE)
        return MS_FAIL(MS_ERR_INVALID, "store_commit_manifest: world size %d", world_size);
    if (s->merge_failed)
        return MS_FAIL(MS_ERR_STATE,
                       "%s: step %lld: a chunk table failed to merge; abort the "
                       "save",
                       s->path, (long long)s->save_step);
    for (size_t r = 0; r < s->merged_capacity; r++)
        if (s->merged_ranks[r] && r >= (size_t)world_size)
            return MS_FAIL(MS_ERR_MISMATCH,
                           "%s: step %lld: a chunk table of rank %zu was merged, but the world "
                           "size is %d",
                           s->path, (long long)s->save_step, r, world_size);
    int missing = 0, first_missing = -1;
    for (int r = 0; r < world_size; r++)
        if ((size_t)r >= s->merged_capacity || !s->merged_ranks[r]) {
            if (!missing++)
                first_missing = r;
        }
    if (missing)
        return MS_FAIL(MS_ERR_STATE,
                       "%s: step %lld: chunk tables of %d of %d ranks are missing (rank %d "
                       "first); merge every rank's table first",
                       s->path, (long long)s->save_step, missing, world_size, first_missing);
    return MS_OK;
}

/* Every chunk the manifest will name is in its rank's file with the right size. */
static int check_chunks_present(ms_store *s)
{
    int status = MS_OK;
    for (size_t i = 0; i < s->merged.count && !status; i++) {
        const store_entry *e = &s->merged.entries[i];
        for (uint32_t c = 0; c < e->chunk_count && !status; c++) {
            const store_chunk *chunk = &e->chunks[c];
            uint64_t nbytes = (uint64_t)chunk_numel(chunk, e->ndim) * ms_dtype_size(e->dtype);
            const uint8_t *stored;
            status = store_fetch_chunk(s, s->save_step, e, chunk, nbytes, &stored);
        }
    }
    store_end_reads(s);
    return status;
}

static int put_manifest(ms_store *s, const byte_buffer *manifest)
{
    uint8_t key_bytes[STEP_KEY_BYTES];
    step_key(key_bytes, s->save_step);
    for (int attempt = 0;; attempt++) {
        MDB_txn *txn;
        MS_CHECK(env_write_begin(s->index, &txn));
        MDB_val key = {STEP_KEY_BYTES, key_bytes}, value = {manifest->size, manifest->data};
        int rc = mdb_put(txn, s->index->data_dbi, &key, &value, MDB_NOOVERWRITE);
        if (!rc)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
        if (!rc) {
            space_keep_spare(s->index);
            return MS_OK;
        }
        if (rc == MDB_KEYEXIST)
            return MS_FAIL(MS_ERR_STATE, "%s: step %lld was committed by another save meanwhile",
                           s->path, (long long)s->save_step);
        if (rc != MDB_MAP_FULL || attempt == INDEX_GROW_ATTEMPTS)
            return env_fail(s->index, rc, "committing a manifest");
        MDB_envinfo info;
        mdb_env_info(s->index->env, &info);
        MS_CHECK(env_grow(s->index, 2 * info.me_mapsize, 2 * info.me_mapsize));
    }
}

int ms_store_commit_manifest(ms_store *s, int world_size)
{
    MS_CHECK(check_data_committed(s, "store_commit_manifest"));
    MS_CHECK(check_ranks(s, world_size));
    char where[256];
    snprintf(where, sizeof where, "%s: step %lld", s->path, (long long)s->save_step);
    int status = table_finalize(&s->merged, where);
    if (status) {
        s->merge_failed = true;
        return status;
    }
    MS_CHECK(check_chunks_present(s));
    table_header header = {
        .kind = TABLE_MANIFEST, .step = s->save_step, .rank = (uint32_t)world_size};
    MS_CHECK(table_encode(&s->merged, &header, &s->scratch));
    if (s->scratch.size > UINT32_MAX)
        return MS_FAIL(MS_ERR_INVALID, "%s: the manifest of %zu bytes exceeds LMDB's 4 GiB", where,
                       s->scratch.size);
    MS_CHECK(put_manifest(s, &s->scratch));
    s->save_state = SAVE_IDLE;
    store_end_save_locks(s);
    return MS_OK;
}
