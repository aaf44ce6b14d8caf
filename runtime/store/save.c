/* moonshard store: the public side of one rank's save - begin, validated puts, the data
 * commit in the foreground or on a background writer thread, wait and abort. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store_internal.h"

enum { MAX_BYTES_VALUE = 1 << 30 };

static void release_pending(ms_store *s)
{
    for (size_t i = 0; i < s->pending_count; i++) {
        free(s->pending[i].fqn);
        ms_tensor_free(s->pending[i].chunk);
    }
    s->pending_count = 0;
}

void save_reset(ms_store *s)
{
    snapshot_finish(s, false);
    release_pending(s);
    if (s->pid == getpid())
        store_end_save_locks(s);
    s->txn = NULL;
    s->save_state = SAVE_IDLE;
}

/* Give the file space an abandoned save took beyond the used pages back to the disk. */
static void trim_shard(ms_store *s)
{
    if (s->save_state != SAVE_IDLE && (size_t)s->save_rank < s->shard_capacity &&
        s->shards[s->save_rank] && s->shards[s->save_rank]->writable)
        space_trim(s->shards[s->save_rank]);
}

/* A failed write leaves the transaction unusable: end the save, keep the message. */
static int fail_save(ms_store *s, int status)
{
    saved_error saved;
    error_save(&saved, status);
    if (s->txn)
        mdb_txn_abort(s->txn);
    s->txn = NULL;
    trim_shard(s);
    save_reset(s);
    return error_restore(&saved);
}

static int check_writing(ms_store *s, const char *op)
{
    MS_CHECK(store_check(s, op));
    if (s->save_state != SAVE_WRITING)
        return MS_FAIL(MS_ERR_STATE, "%s: %s: no save in progress; call ms_store_begin first", op,
                       s->path);
    return MS_OK;
}

int ms_store_begin(ms_store *s, int64_t step, int rank, int mode)
{
    MS_CHECK(store_check(s, "store_begin"));
    if (s->mode != MS_STORE_READ_WRITE)
        return MS_FAIL(MS_ERR_STATE, "store_begin: %s was opened read-only", s->path);
    if (s->save_state == SAVE_WRITING)
        return MS_FAIL(MS_ERR_STATE,
                       "store_begin: %s: the save of step %lld is still in progress on this "
                       "handle; commit or abort it first",
                       s->path, (long long)s->save_step);
    if (step < 0 || rank < 0 || (mode != MS_STORE_FOREGROUND && mode != MS_STORE_BACKGROUND))
        return MS_FAIL(MS_ERR_INVALID, "store_begin: step %lld, rank %d, mode %d out of range",
                       (long long)step, rank, mode);
    save_reset(s);
    table_clear(&s->own_table);
    table_clear(&s->merged);
    s->merge_failed = false;
    free(s->committed);
    s->committed = NULL;
    MS_CHECK(store_lock_shard(s, rank, step));
    int status = store_committed_steps(s, &s->committed, &s->committed_count);
    if (!status && steps_contain(s->committed, s->committed_count, step))
        status = MS_FAIL(MS_ERR_STATE, "%s: step %lld is already committed; delete it first",
                         s->path, (long long)step);
    store_env *shard;
    if (!status)
        status = store_shard(s, rank, true, &shard);
    if (status) {
        store_end_save_locks(s);
        return status;
    }
    s->save_step = step;
    s->save_rank = rank;
    s->background = mode == MS_STORE_BACKGROUND;
    s->next_seq = 0;
    if (!s->background && (status = write_start(s, 0)) != MS_OK) {
        store_end_save_locks(s);
        return status;
    }
    s->save_state = SAVE_WRITING;
    return MS_OK;
}

static int check_fqn(const char *op, const char *fqn, size_t *len)
{
    if (!fqn || !*fqn)
        return MS_FAIL(MS_ERR_INVALID, "%s: fqn must be a non-empty string", op);
    *len = strlen(fqn);
    if (*len > STORE_MAX_FQN_BYTES)
        return MS_FAIL(MS_ERR_INVALID, "%s: fqn '%.40s...' is longer than %d bytes", op, fqn,
                       STORE_MAX_FQN_BYTES);
    return MS_OK;
}

/* Validate a put and declare its entry in this rank's table. */
static int declare_tensor(ms_store *s, const char *fqn, size_t len, const ms_tensor *chunk,
                          const int64_t *global_shape, const int64_t *offsets)
{
    char have[160], want[160], region[200];
    int ndim = chunk->ndim;
    int64_t numel;
    if (ndim > 0 && !global_shape)
        return MS_FAIL(MS_ERR_INVALID, "store_put_tensor: '%s': global_shape must not be NULL",
                       fqn);
    if (!shape_numel(ndim, global_shape, &numel) ||
        numel > INT64_MAX / (int64_t)ms_dtype_size(chunk->dtype))
        return MS_FAIL(MS_ERR_SHAPE, "store_put_tensor: '%s': invalid global shape %s", fqn,
                       ms_shape_str(have, sizeof have, ndim, global_shape));
    for (int d = 0; d < ndim; d++)
        if (offsets[d] < 0 || offsets[d] > global_shape[d] - chunk->shape[d])
            return MS_FAIL(MS_ERR_SHAPE,
                           "store_put_tensor: '%s': chunk %s lies outside the global shape %s", fqn,
                           region_str(region, sizeof region, ndim, offsets, chunk->shape),
                           ms_shape_str(have, sizeof have, ndim, global_shape));
    if (chunk->numel > 0 && chunk->storage && chunk->storage->pool >= MS_POOL_CUDA0)
        return MS_FAIL(MS_ERR_DEVICE,
                       "store_put_tensor: '%s': the chunk is in pool %s; stage it in a host "
                       "tensor",
                       fqn, ms_pool_name(chunk->storage->pool));
    if (chunk->numel > 0 && !ms_tensor_data(chunk))
        return MS_FAIL(MS_ERR_INVALID, "store_put_tensor: '%s': the chunk has no storage", fqn);
    int64_t found = table_find(&s->own_table, fqn, len);
    if (found < 0) {
        store_entry *e;
        return table_add(&s->own_table, fqn, len, MS_STORE_TENSOR, chunk->dtype, ndim, global_shape,
                         &e);
    }
    store_entry *e = &s->own_table.entries[found];
    if (e->kind != MS_STORE_TENSOR)
        return MS_FAIL(MS_ERR_INVALID, "store_put_tensor: '%s' was put as a non-tensor value", fqn);
    bool same = e->dtype == chunk->dtype && e->ndim == ndim;
    for (int d = 0; same && d < ndim; d++)
        same = e->shape[d] == global_shape[d];
    if (!same)
        return MS_FAIL(e->dtype != chunk->dtype ? MS_ERR_DTYPE : MS_ERR_SHAPE,
                       "store_put_tensor: '%s' was put as %s %s, now as %s %s", fqn,
                       ms_dtype_name(e->dtype), ms_shape_str(have, sizeof have, e->ndim, e->shape),
                       ms_dtype_name(chunk->dtype),
                       ms_shape_str(want, sizeof want, ndim, global_shape));
    return MS_OK;
}

static int queue_put(ms_store *s, const char *fqn, size_t len, const ms_tensor *chunk,
                     const int64_t *offsets)
{
    if (s->pending_count == s->pending_capacity) {
        size_t capacity = s->pending_capacity ? 2 * s->pending_capacity : 64;
        pending_put *grown = realloc(s->pending, capacity * sizeof *grown);
        if (!grown)
            return MS_FAIL(MS_ERR_OOM, "store_put_tensor: out of memory queueing '%s'", fqn);
        s->pending = grown;
        s->pending_capacity = capacity;
    }
    pending_put *p = &s->pending[s->pending_count];
    *p = (pending_put){.fqn_len = len};
    if (!(p->fqn = strdup(fqn)))
        return MS_FAIL(MS_ERR_OOM, "store_put_tensor: out of memory queueing '%s'", fqn);
    int status =
        ms_tensor_view(&p->chunk, chunk, chunk->ndim, chunk->shape, chunk->strides, chunk->offset);
    if (status) {
        free(p->fqn);
        return status;
    }
    for (int d = 0; d < chunk->ndim; d++)
        p->global_offsets[d] = offsets[d];
    s->pending_count++;
    return MS_OK;
}

int ms_store_put_tensor(ms_store *s, const char *fqn, const ms_tensor *chunk,
                        const int64_t *global_shape, const int64_t *global_offsets)
{
    MS_CHECK(check_writing(s, "store_put_tensor"));
    size_t len = 0;
    MS_CHECK(check_fqn("store_put_tensor", fqn, &len));
    MS_CHECK(ms_check_tensor("store_put_tensor", "chunk", chunk));
    if (chunk->ndim < 0 || chunk->ndim > MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_INVALID, "store_put_tensor: '%s': ndim %d", fqn, chunk->ndim);
    int64_t offsets[MS_MAX_DIMS] = {0};
    for (int d = 0; global_offsets && d < chunk->ndim; d++)
        offsets[d] = global_offsets[d];
    MS_CHECK(declare_tensor(s, fqn, len, chunk, global_shape, offsets));
    if (chunk->numel == 0)
        return MS_OK;
    if (s->background)
        return queue_put(s, fqn, len, chunk, offsets);
    int status = write_chunk(s, fqn, len, chunk, offsets);
    return status ? fail_save(s, status) : MS_OK;
}

int ms_store_put_bytes(ms_store *s, const char *fqn, const void *data, int64_t size)
{
    MS_CHECK(check_writing(s, "store_put_bytes"));
    size_t len = 0;
    MS_CHECK(check_fqn("store_put_bytes", fqn, &len));
    if (size < 0 || size > MAX_BYTES_VALUE || (size > 0 && !data))
        return MS_FAIL(MS_ERR_INVALID,
                       "store_put_bytes: '%s': %lld bytes (at most 1 GiB, data when > 0)", fqn,
                       (long long)size);
    if (table_find(&s->own_table, fqn, len) >= 0)
        return MS_FAIL(MS_ERR_INVALID, "store_put_bytes: '%s' was put already", fqn);
    store_entry *e;
    MS_CHECK(table_add(&s->own_table, fqn, len, MS_STORE_BYTES, 0, 0, NULL, &e));
    return entry_set_bytes(e, data, (uint64_t)size);
}

/* The data is durable: publish this rank's chunk table and seed the manifest with it. */
static int finish_data_commit(ms_store *s)
{
    table_header header = {
        .kind = TABLE_CHUNKS, .step = s->save_step, .rank = (uint32_t)s->save_rank};
    MS_CHECK(table_encode(&s->own_table, &header, &s->table_bytes));
    size_t ranks = (size_t)s->save_rank + 1;
    if (ranks > s->merged_capacity) {
        bool *grown = realloc(s->merged_ranks, ranks * sizeof *grown);
        if (!grown)
            return MS_FAIL(MS_ERR_OOM, "store: out of memory");
        s->merged_ranks = grown;
        s->merged_capacity = ranks;
    }
    memset(s->merged_ranks, 0, s->merged_capacity * sizeof *s->merged_ranks);
    s->merged_ranks[s->save_rank] = true;
    char where[256];
    snprintf(where, sizeof where, "%s: step %lld", s->path, (long long)s->save_step);
    MS_CHECK(table_merge(&s->merged, &s->own_table, (uint32_t)s->save_rank, where));
    s->save_state = SAVE_DATA_COMMITTED;
    return MS_OK;
}

static void *writer_main(void *arg)
{
    ms_store *s = arg;
    int status = snapshot_finish(s, true);
    uint64_t expected = 0;
    for (size_t i = 0; i < s->pending_count; i++)
        expected += chunk_space(s, ms_tensor_nbytes(s->pending[i].chunk));
    if (!status)
        status = write_start(s, expected);
    for (size_t i = 0; i < s->pending_count && !status; i++) {
        pending_put *p = &s->pending[i];
        status = write_chunk(s, p->fqn, p->fqn_len, p->chunk, p->global_offsets);
    }
    if (!status)
        status = write_finish(s);
    if (status && s->txn) {
        mdb_txn_abort(s->txn);
        s->txn = NULL;
    }
    if (status)
        error_save(&s->writer_error, status);
    else
        s->writer_error.status = MS_OK;
    return NULL;
}

int ms_store_commit_data(ms_store *s)
{
    MS_CHECK(check_writing(s, "store_commit_data"));
    if (s->background) {
        s->save_state = SAVE_FLUSHING;
        int err = pthread_create(&s->writer, NULL, writer_main, s);
        if (err) {
            s->save_state = SAVE_WRITING;
            return MS_FAIL(err, "store_commit_data: cannot start the writer thread: %s",
                           strerror(err));
        }
        return MS_OK;
    }
    int status = write_finish(s);
    if (!status)
        status = finish_data_commit(s);
    return status ? fail_save(s, status) : MS_OK;
}

uint64_t chunk_space(const ms_store *s, uint64_t tensor_bytes)
{
    uint64_t pieces = tensor_bytes / (uint64_t)s->max_chunk_bytes + 1, page = 4096;
    if (s->shard_capacity > (size_t)s->save_rank && s->shards[s->save_rank])
        page = s->shards[s->save_rank]->page_bytes;
    return tensor_bytes + pieces * (CHUNK_DATA_OFFSET + LMDB_PAGE_HEADER_BYTES + 2 * page);
}

int ms_store_reserve(ms_store *s, int64_t bytes)
{
    MS_CHECK(check_writing(s, "store_reserve"));
    if (bytes < 0)
        return MS_FAIL(MS_ERR_INVALID, "store_reserve: %lld bytes", (long long)bytes);
    if (s->next_seq > 0)
        return MS_FAIL(MS_ERR_STATE, "store_reserve: %s: chunks were put already", s->path);
    if (s->background || bytes == 0)
        return MS_OK; /* the writer thread sizes the map from what was put */
    int status = write_reserve(s, chunk_space(s, (uint64_t)bytes));
    return status ? fail_save(s, status) : MS_OK;
}

static int check_owner(ms_store *s, const char *op)
{
    if (!s)
        return MS_FAIL(MS_ERR_INVALID, "%s: store must not be NULL", op);
    if (s->pid != getpid())
        return store_check(s, op);
    return MS_OK;
}

int ms_store_wait(ms_store *s)
{
    MS_CHECK(check_owner(s, "store_wait"));
    if (s->save_state != SAVE_FLUSHING)
        return MS_OK;
    pthread_join(s->writer, NULL);
    int status = s->writer_error.status;
    if (!status)
        status = finish_data_commit(s);
    else
        error_restore(&s->writer_error);
    release_pending(s);
    return status ? fail_save(s, status) : MS_OK;
}

int ms_store_abort(ms_store *s)
{
    MS_CHECK(check_owner(s, "store_abort"));
    if (s->save_state == SAVE_FLUSHING)
        pthread_join(s->writer, NULL);
    if (s->txn)
        mdb_txn_abort(s->txn);
    s->txn = NULL;
    trim_shard(s);
    save_reset(s);
    return MS_OK;
}
