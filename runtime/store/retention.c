/* moonshard store: reclaiming the space of chunks no committed manifest names (crashed or
 * deleted steps), deleting steps, and keeping only the newest ones. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

/* A transaction that deletes copies a few tree pages and writes the free list, which names
 * every page it freed (8 bytes each). Committing after FREED_PAGES_PER_TXN freed pages keeps
 * what the first two transactions of a deletion take within the spare space a file keeps
 * (STORE_SPARE_BYTES); each later one reuses the pages the one before the previous freed. */
enum { DELETES_PER_TXN = 4096, FREED_PAGES_PER_TXN = 2048 };

/* Position the cursor at the first chunk key >= (step, 0). rc as LMDB's. */
static int seek_step(MDB_cursor *cursor, int64_t step, MDB_val *key, MDB_val *value)
{
    uint8_t start[CHUNK_KEY_BYTES];
    chunk_key(start, step, 0);
    *key = (MDB_val){CHUNK_KEY_BYTES, start};
    return mdb_cursor_get(cursor, key, value, MDB_SET_RANGE);
}

/* LMDB reuses pages freed by a transaction only once a later one has committed (the
 * previous snapshot still names them), so record the count in one more small transaction:
 * the save that follows can then put its chunks in the reclaimed space. When even that
 * finds no room, the pages are free all the same, and reused after the next commit. */
static void note_reclaimed(store_env *e, size_t deleted)
{
    MDB_txn *txn;
    if (env_write_begin(e, &txn))
        return;
    uint64_t count = deleted;
    MDB_val key = {9, "reclaimed"}, value = {sizeof count, &count};
    if (mdb_put(txn, e->meta_dbi, &key, &value, 0))
        mdb_txn_abort(txn);
    else
        mdb_txn_commit(txn);
}

static int open_cursor(store_env *e, MDB_txn **txn, MDB_cursor **cursor)
{
    MS_CHECK(env_write_begin(e, txn));
    int rc = mdb_cursor_open(*txn, e->data_dbi, cursor);
    if (rc) {
        mdb_txn_abort(*txn);
        return env_fail(e, rc, "opening a cursor");
    }
    return MS_OK;
}

int reclaim_uncommitted(store_env *e, const int64_t *committed, size_t count)
{
    /* A reader killed mid-read leaves its slot behind, and its snapshot would keep every
     * page freed since from being reused: clear slots of dead processes first. */
    int dead_readers;
    mdb_reader_check(e->env, &dead_readers);
    MDB_txn *txn;
    MDB_cursor *cursor;
    MS_CHECK(open_cursor(e, &txn, &cursor));
    MDB_val key, value;
    size_t deleted = 0, deleted_in_txn = 0;
    uint64_t freed_in_txn = 0;
    int64_t step = 0;
    int rc;
    while (!(rc = seek_step(cursor, step, &key, &value))) {
        if (key.mv_size != CHUNK_KEY_BYTES) {
            mdb_txn_abort(txn);
            return MS_FAIL(MS_ERR_CORRUPT, "%s: a chunk key has %zu bytes", e->path, key.mv_size);
        }
        step = step_from_key(key.mv_data);
        if (steps_contain(committed, count, step)) {
            if (step == INT64_MAX)
                break;
            step++;
            continue;
        }
        uint64_t pages = (value.mv_size + LMDB_PAGE_HEADER_BYTES + e->page_bytes - 1) / e->page_bytes;
        if ((rc = mdb_cursor_del(cursor, 0)))
            break;
        deleted++;
        freed_in_txn += pages;
        if (++deleted_in_txn == DELETES_PER_TXN || freed_in_txn >= FREED_PAGES_PER_TXN) {
            if ((rc = mdb_txn_commit(txn)))
                return env_fail(e, rc, "committing reclaimed chunks");
            MS_CHECK(open_cursor(e, &txn, &cursor));
            deleted_in_txn = 0;
            freed_in_txn = 0;
        }
    }
    if (rc && rc != MDB_NOTFOUND) {
        mdb_txn_abort(txn);
        return env_fail(e, rc, "reclaiming chunks of uncommitted steps");
    }
    rc = mdb_txn_commit(txn);
    if (rc)
        return env_fail(e, rc, "committing reclaimed chunks");
    if (deleted)
        note_reclaimed(e, deleted);
    return space_trim(e);
}

static int check_maintenance(ms_store *s, const char *op)
{
    MS_CHECK(store_check(s, op));
    if (s->mode != MS_STORE_READ_WRITE)
        return MS_FAIL(MS_ERR_STATE, "%s: %s was opened read-only", op, s->path);
    if (s->save_state != SAVE_IDLE)
        return MS_FAIL(MS_ERR_STATE,
                       "%s: %s: the save of step %lld is unfinished on this handle; commit its "
                       "manifest or abort it first",
                       op, s->path, (long long)s->save_step);
    return MS_OK;
}

/* The shard files of the directory, open for writing; held: this handle had the file
 * before (the others are released again, so this process keeps no writable map of them). */
typedef struct shard_list {
    int *ranks;
    bool *held;
    size_t count;
} shard_list;

static void release_shards(ms_store *s, shard_list *l)
{
    for (size_t i = 0; i < l->count; i++) {
        int rank = l->ranks[i];
        if (!l->held[i] && (size_t)rank < s->shard_capacity && s->shards[rank]) {
            env_release(s->shards[rank]);
            s->shards[rank] = NULL;
        }
    }
    free(l->ranks);
    free(l->held);
    *l = (shard_list){0};
}

/* Open every shard file for writing before anything is deleted, so a file that cannot be
 * opened fails the deletion while every step is still there. */
static int open_shards(ms_store *s, shard_list *l)
{
    *l = (shard_list){0};
    DIR *dir = opendir(s->path);
    if (!dir)
        return MS_FAIL(MS_ERR_NOT_FOUND, "%s: cannot list the directory", s->path);
    int status = MS_OK;
    size_t capacity = 0;
    struct dirent *item;
    while (!status && (item = readdir(dir))) {
        int rank, length = 0;
        if (sscanf(item->d_name, "shard-%d.mdb%n", &rank, &length) != 1 ||
            item->d_name[length] != 0 || rank < 0)
            continue;
        if (l->count == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            int *ranks = realloc(l->ranks, capacity * sizeof *ranks);
            if (ranks)
                l->ranks = ranks;
            bool *held = realloc(l->held, capacity * sizeof *held);
            if (held)
                l->held = held;
            if (!ranks || !held) {
                status = MS_FAIL(MS_ERR_OOM, "store: out of memory");
                break;
            }
        }
        l->ranks[l->count] = rank;
        l->held[l->count] = (size_t)rank < s->shard_capacity && s->shards[rank];
        l->count++;
        store_env *e;
        status = store_shard(s, rank, true, &e);
    }
    closedir(dir);
    if (status)
        release_shards(s, l);
    return status;
}

/* Reclaim uncommitted chunks in every shard file of the list. */
static int reclaim_shards(ms_store *s, const shard_list *l)
{
    int64_t *committed;
    size_t count;
    MS_CHECK(store_committed_steps(s, &committed, &count));
    int status = MS_OK;
    for (size_t i = 0; i < l->count && !status; i++)
        status = reclaim_uncommitted(s->shards[l->ranks[i]], committed, count);
    free(committed);
    return status;
}

static int remove_manifests(ms_store *s, const int64_t *steps, size_t count)
{
    MDB_txn *txn;
    MS_CHECK(env_write_begin(s->index, &txn));
    for (size_t i = 0; i < count; i++) {
        uint8_t key_bytes[STEP_KEY_BYTES];
        step_key(key_bytes, steps[i]);
        MDB_val key = {STEP_KEY_BYTES, key_bytes};
        int rc = mdb_del(txn, s->index->data_dbi, &key, NULL);
        if (rc) {
            mdb_txn_abort(txn);
            if (rc == MDB_NOTFOUND)
                return MS_FAIL(MS_ERR_NOT_FOUND, "%s: step %lld is not committed", s->path,
                               (long long)steps[i]);
            return env_fail(s->index, rc, "deleting a manifest");
        }
    }
    int rc = mdb_txn_commit(txn);
    if (rc)
        return env_fail(s->index, rc, "committing deleted manifests");
    space_keep_spare(s->index);
    return MS_OK;
}

/* Run a maintenance step under writer.lock (held already, or taken for this call, the
 * holder line saying what it does). */
static int locked(ms_store *s, int (*op)(ms_store *, int64_t), int64_t arg, const char *doing)
{
    bool held = s->writer_lock_fd >= 0;
    if (!held)
        MS_CHECK(store_lock_writer(s, "retention", doing));
    int status = op(s, arg);
    if (!held)
        store_unlock_writer(s);
    return status;
}

/* Remove the manifests of steps, then reclaim their chunks in every shard file. A failure
 * before the manifests are removed leaves every step; one after names the steps deleted. */
static int remove_steps(ms_store *s, const int64_t *steps, size_t count)
{
    shard_list shards;
    MS_CHECK(open_shards(s, &shards));
    int status = count ? remove_manifests(s, steps, count) : MS_OK;
    if (!status && (status = reclaim_shards(s, &shards)) != MS_OK && count) {
        char message[1024];
        snprintf(message, sizeof message, "%s", ms_last_error());
        status = count == 1 ? MS_FAIL(status,
                                      "step %lld is deleted, but reclaiming its space failed "
                                      "(the next save or delete reclaims it): %s",
                                      (long long)steps[0], message)
                            : MS_FAIL(status,
                                      "steps %lld to %lld are deleted, but reclaiming their space "
                                      "failed (the next save or delete reclaims it): %s",
                                      (long long)steps[0], (long long)steps[count - 1], message);
    }
    release_shards(s, &shards);
    return status;
}

static int delete_step(ms_store *s, int64_t step)
{
    int64_t *committed;
    size_t count;
    MS_CHECK(store_committed_steps(s, &committed, &count));
    bool found = steps_contain(committed, count, step);
    free(committed);
    if (!found)
        return MS_FAIL(MS_ERR_NOT_FOUND, "%s: step %lld is not committed", s->path, (long long)step);
    return remove_steps(s, &step, 1);
}

int ms_store_delete(ms_store *s, int64_t step)
{
    MS_CHECK(check_maintenance(s, "store_delete"));
    char doing[48];
    snprintf(doing, sizeof doing, "deleting step %lld", (long long)step);
    return locked(s, delete_step, step, doing);
}

static int keep_last(ms_store *s, int64_t count)
{
    int64_t *committed;
    size_t total;
    MS_CHECK(store_committed_steps(s, &committed, &total));
    size_t removed = total > (uint64_t)count ? total - (size_t)count : 0;
    int status = remove_steps(s, committed, removed);
    free(committed);
    return status;
}

int ms_store_keep_last(ms_store *s, int64_t count)
{
    MS_CHECK(check_maintenance(s, "store_keep_last"));
    if (count < 0)
        return MS_FAIL(MS_ERR_INVALID, "store_keep_last: count %lld is negative", (long long)count);
    char doing[64];
    snprintf(doing, sizeof doing, "keeping the last %lld steps", (long long)count);
    return locked(s, keep_last, count, doing);
}
