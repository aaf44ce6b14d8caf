/* moonshard store: reclaiming the space of chunks no committed manifest names (crashed or
 * deleted steps), deleting steps, and keeping only the newest ones. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

enum { DELETES_PER_TXN = 4096 };

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
 * the save that follows can then put its chunks in the reclaimed space. */
static int note_reclaimed(store_env *e, size_t deleted)
{
    MDB_txn *txn;
    MS_CHECK(env_write_begin(e, &txn));
    uint64_t count = deleted;
    MDB_val key = {9, "reclaimed"}, value = {sizeof count, &count};
    int rc = mdb_put(txn, e->meta_dbi, &key, &value, 0);
    if (rc) {
        mdb_txn_abort(txn);
        return env_fail(e, rc, "noting reclaimed chunks");
    }
    rc = mdb_txn_commit(txn);
    return rc ? env_fail(e, rc, "noting reclaimed chunks") : MS_OK;
}

int reclaim_uncommitted(store_env *e, const int64_t *committed, size_t count)
{
    /* A reader killed mid-read leaves its slot behind, and its snapshot would keep every
     * page freed since from being reused: clear slots of dead processes first. */
    int dead_readers;
    mdb_reader_check(e->env, &dead_readers);
    MDB_txn *txn;
    MDB_cursor *cursor;
    MS_CHECK(env_write_begin(e, &txn));
    int rc = mdb_cursor_open(txn, e->data_dbi, &cursor);
    if (rc) {
        mdb_txn_abort(txn);
        return env_fail(e, rc, "opening a cursor");
    }
    MDB_val key, value;
    size_t deleted = 0;
    int64_t step = 0;
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
        if ((rc = mdb_cursor_del(cursor, 0)))
            break;
        if (++deleted % DELETES_PER_TXN == 0) {
            if ((rc = mdb_txn_commit(txn)))
                return env_fail(e, rc, "committing reclaimed chunks");
            MS_CHECK(env_write_begin(e, &txn));
            if ((rc = mdb_cursor_open(txn, e->data_dbi, &cursor))) {
                mdb_txn_abort(txn);
                return env_fail(e, rc, "opening a cursor");
            }
        }
    }
    if (rc && rc != MDB_NOTFOUND) {
        mdb_txn_abort(txn);
        return env_fail(e, rc, "reclaiming chunks of uncommitted steps");
    }
    rc = mdb_txn_commit(txn);
    if (rc)
        return env_fail(e, rc, "committing reclaimed chunks");
    MS_CHECK(deleted ? note_reclaimed(e, deleted) : MS_OK);
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

/* Reclaim uncommitted chunks in every shard file of the directory. Files of other ranks
 * are released again at once, so this process holds no writable map of them later. */
static int sweep_shards(ms_store *s)
{
    int64_t *committed;
    size_t count;
    MS_CHECK(store_committed_steps(s, &committed, &count));
    DIR *dir = opendir(s->path);
    if (!dir) {
        free(committed);
        return MS_FAIL(MS_ERR_NOT_FOUND, "%s: cannot list the directory", s->path);
    }
    int status = MS_OK;
    struct dirent *item;
    while (!status && (item = readdir(dir))) {
        int rank, length = 0;
        if (sscanf(item->d_name, "shard-%d.mdb%n", &rank, &length) != 1 ||
            item->d_name[length] != 0 || rank < 0)
            continue;
        bool held = (size_t)rank < s->shard_capacity && s->shards[rank];
        store_env *e;
        status = store_shard(s, rank, true, &e);
        if (!status)
            status = reclaim_uncommitted(e, committed, count);
        if (!held && (size_t)rank < s->shard_capacity && s->shards[rank]) {
            env_release(s->shards[rank]);
            s->shards[rank] = NULL;
        }
    }
    closedir(dir);
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
    return rc ? env_fail(s->index, rc, "committing deleted manifests") : MS_OK;
}

/* Run a maintenance step under writer.lock (held already, or taken for this call). */
static int locked(ms_store *s, int (*op)(ms_store *, int64_t), int64_t arg)
{
    bool held = s->writer_lock_fd >= 0;
    if (!held)
        MS_CHECK(store_lock_writer(s, "retention", -1));
    int status = op(s, arg);
    if (!held)
        store_unlock_writer(s);
    return status;
}

static int delete_step(ms_store *s, int64_t step)
{
    MS_CHECK(remove_manifests(s, &step, 1));
    return sweep_shards(s);
}

int ms_store_delete(ms_store *s, int64_t step)
{
    MS_CHECK(check_maintenance(s, "store_delete"));
    return locked(s, delete_step, step);
}

static int keep_last(ms_store *s, int64_t count)
{
    int64_t *committed;
    size_t total;
    MS_CHECK(store_committed_steps(s, &committed, &total));
    int status = MS_OK;
    if (total > (uint64_t)count)
        status = remove_manifests(s, committed, total - (size_t)count);
    free(committed);
    MS_CHECK(status);
    return sweep_shards(s);
}

int ms_store_keep_last(ms_store *s, int64_t count)
{
    MS_CHECK(check_maintenance(s, "store_keep_last"));
    if (count < 0)
        return MS_FAIL(MS_ERR_INVALID, "store_keep_last: count %lld is negative", (long long)count);
    return locked(s, keep_last, count);
}
