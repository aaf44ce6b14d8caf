/* moonshard store: opening and closing store handles, the checks every call makes, shard
 * files by rank, listing the committed steps, and small helpers (buffers, saved errors). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store_internal.h"

int buffer_reserve(byte_buffer *b, size_t capacity)
{
    if (capacity <= b->capacity)
        return MS_OK;
    size_t grown = b->capacity ? b->capacity : 256;
    while (grown < capacity)
        grown *= 2;
    uint8_t *data = realloc(b->data, grown);
    if (!data)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory for a %zu-byte buffer", grown);
    b->data = data;
    b->capacity = grown;
    return MS_OK;
}

void buffer_free(byte_buffer *b)
{
    free(b->data);
    *b = (byte_buffer){0};
}

bool steps_contain(const int64_t *steps, size_t count, int64_t step)
{
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (steps[mid] == step)
            return true;
        if (steps[mid] < step)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

char *store_file_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = malloc(n);
    if (path)
        snprintf(path, n, "%s/%s", dir, name);
    return path;
}

void error_save(saved_error *saved, int status)
{
    saved->status = status;
    snprintf(saved->message, sizeof saved->message, "%s", ms_last_error());
    snprintf(saved->site, sizeof saved->site, "%s", ms_last_error_site());
}

int error_restore(const saved_error *saved)
{
    char file[sizeof saved->site];
    snprintf(file, sizeof file, "%s", saved->site);
    char *colon = strrchr(file, ':');
    int line = 0;
    if (colon) {
        *colon = 0;
        line = atoi(colon + 1);
    }
    return ms_fail_at(file, line, saved->status, "%s", saved->message);
}

static int make_directories(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory");
    int status = MS_OK;
    for (char *p = copy + 1;; p++) {
        bool last = *p == 0;
        if (*p != '/' && !last)
            continue;
        *p = 0;
        if (mkdir(copy, 0755) != 0 && errno != EEXIST) {
            status =
                MS_FAIL(errno, "%s: cannot create directory %s: %s", path, copy, strerror(errno));
            break;
        }
        if (last)
            break;
        *p = '/';
    }
    free(copy);
    if (status)
        return status;
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return MS_FAIL(ENOTDIR, "%s is not a directory", path);
    return MS_OK;
}

static int check_store_directory(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        if (errno == ENOENT)
            return MS_FAIL(MS_ERR_NOT_FOUND, "%s: no such checkpoint directory", path);
        return MS_FAIL(errno, "%s: %s", path, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode))
        return MS_FAIL(MS_ERR_CORRUPT, "%s is not a moonshard store (not a directory)", path);
    char *index = store_file_path(path, "index.mdb");
    if (!index)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory");
    int found = access(index, F_OK) == 0;
    free(index);
    if (!found)
        return MS_FAIL(MS_ERR_CORRUPT, "%s is not a moonshard store (it has no index.mdb)", path);
    return MS_OK;
}

int ms_store_open(ms_store **out, const char *path, int mode)
{
    if (!out)
        return MS_FAIL(MS_ERR_INVALID, "store_open: out must not be NULL");
    *out = NULL;
    if (!path || !*path)
        return MS_FAIL(MS_ERR_INVALID, "store_open: path must be a non-empty string");
    if (mode != MS_STORE_READ_ONLY && mode != MS_STORE_READ_WRITE)
        return MS_FAIL(MS_ERR_INVALID, "store_open: mode %d is neither read-only nor read-write",
                       mode);
    MS_CHECK(mode == MS_STORE_READ_WRITE ? make_directories(path) : check_store_directory(path));
    ms_store *s = calloc(1, sizeof *s);
    if (!s || !(s->path = strdup(path))) {
        free(s);
        return MS_FAIL(MS_ERR_OOM, "store_open: out of memory");
    }
    s->pid = getpid();
    s->mode = mode;
    s->writer_lock_fd = -1;
    s->shard_lock_fd = -1;
    s->max_chunk_bytes = STORE_DEFAULT_CHUNK_BYTES;
    int status = checksum_new(&s->hasher);
    char *index = status ? NULL : store_file_path(path, "index.mdb");
    if (!status && !index)
        status = MS_FAIL(MS_ERR_OOM, "store_open: out of memory");
    if (!status)
        status =
            env_acquire(index, "index.mdb", FILE_INDEX, -1, mode == MS_STORE_READ_WRITE, &s->index);
    free(index);
    if (status) {
        ms_store_close(s);
        return status;
    }
    *out = s;
    return MS_OK;
}

void ms_store_close(ms_store *s)
{
    if (!s)
        return;
    if (s->pid == getpid()) {
        ms_store_abort(s);
        store_unlock_writer(s);
    } else {
        save_reset(s);
        if (s->writer_lock_fd >= 0)
            close(s->writer_lock_fd); /* the lock is the parent's: only this copy goes */
    }
    for (size_t r = 0; r < s->shard_capacity; r++)
        env_release(s->shards[r]);
    env_release(s->index);
    while (s->manifests) {
        step_manifest *m = s->manifests;
        s->manifests = m->next;
        table_free(&m->table);
        free(m);
    }
    table_free(&s->own_table);
    table_free(&s->merged);
    table_free(&s->incoming);
    buffer_free(&s->table_bytes);
    buffer_free(&s->bounce);
    buffer_free(&s->scratch);
    checksum_free(s->hasher);
    free(s->shards);
    free(s->read_txns);
    free(s->committed);
    free(s->merged_ranks);
    free(s->pending);
    free(s->snapshots);
    free(s->path);
    free(s);
}

int store_check(ms_store *s, const char *op)
{
    if (!s)
        return MS_FAIL(MS_ERR_INVALID, "%s: store must not be NULL", op);
    if (s->pid != getpid())
        return MS_FAIL(MS_ERR_STATE,
                       "%s: the handle of store %s was opened by process %d and is used by "
                       "process %d: open stores inside each rank, after fork",
                       op, s->path, (int)s->pid, (int)getpid());
    if (s->save_state == SAVE_FLUSHING)
        return MS_FAIL(MS_ERR_STATE,
                       "%s: %s: a background save of step %lld is in flight; call "
                       "ms_store_wait first",
                       op, s->path, (long long)s->save_step);
    return MS_OK;
}

static int grow_shard_slots(ms_store *s, size_t count)
{
    if (count <= s->shard_capacity)
        return MS_OK;
    size_t capacity = s->shard_capacity ? s->shard_capacity : 8;
    while (capacity < count)
        capacity *= 2;
    store_env **shards = realloc(s->shards, capacity * sizeof *shards);
    if (shards)
        s->shards = shards;
    MDB_txn **txns = realloc(s->read_txns, capacity * sizeof *txns);
    if (txns)
        s->read_txns = txns;
    if (!shards || !txns)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory for %zu shard files", capacity);
    for (size_t r = s->shard_capacity; r < capacity; r++) {
        s->shards[r] = NULL;
        s->read_txns[r] = NULL;
    }
    s->shard_capacity = capacity;
    return MS_OK;
}

int store_shard(ms_store *s, int rank, bool writable, store_env **out)
{
    if (rank < 0)
        return MS_FAIL(MS_ERR_INVALID, "store: rank %d is negative", rank);
    MS_CHECK(grow_shard_slots(s, (size_t)rank + 1));
    store_env *have = s->shards[rank];
    if (have && (have->writable || !writable)) {
        *out = have;
        return MS_OK;
    }
    char name[32];
    snprintf(name, sizeof name, "shard-%d.mdb", rank);
    char *path = store_file_path(s->path, name);
    if (!path)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory");
    store_env *e;
    int status = env_acquire(path, name, FILE_SHARD, rank, writable, &e);
    free(path);
    if (status == MS_ERR_NOT_FOUND)
        return MS_FAIL(MS_ERR_NOT_FOUND, "%s: %s is missing", s->path, name);
    MS_CHECK(status);
    env_release(have);
    s->shards[rank] = e;
    *out = e;
    return MS_OK;
}

static int list_steps(ms_store *s, int64_t **steps, size_t *count)
{
    MDB_txn *txn;
    MDB_cursor *cursor = NULL;
    MS_CHECK(env_read_begin(s->index, &txn));
    int rc = mdb_cursor_open(txn, s->index->data_dbi, &cursor);
    if (rc)
        cursor = NULL;
    size_t capacity = 0, n = 0;
    int64_t *list = NULL;
    int status = MS_OK;
    MDB_val key, value;
    for (int op = MDB_FIRST; !rc && !(rc = mdb_cursor_get(cursor, &key, &value, op));
         op = MDB_NEXT) {
        if (key.mv_size != STEP_KEY_BYTES) {
            status = MS_FAIL(MS_ERR_CORRUPT, "%s: a manifest key has %zu bytes", s->index->path,
                             key.mv_size);
            break;
        }
        if (n == capacity) {
            capacity = capacity ? 2 * capacity : 64;
            int64_t *grown = realloc(list, capacity * sizeof *grown);
            if (!grown) {
                status = MS_FAIL(MS_ERR_OOM, "store: out of memory listing steps");
                break;
            }
            list = grown;
        }
        list[n++] = step_from_key(key.mv_data);
    }
    if (!status && rc && rc != MDB_NOTFOUND)
        status = env_fail(s->index, rc, "listing the steps");
    if (cursor)
        mdb_cursor_close(cursor);
    env_read_end(s->index, txn);
    if (status) {
        free(list);
        return status;
    }
    *steps = list;
    *count = n;
    return MS_OK;
}

typedef struct steps_args {
    ms_store *s;
    int64_t **steps;
    size_t *count;
} steps_args;

static int list_steps_guarded(void *arg)
{
    steps_args *a = arg;
    return list_steps(a->s, a->steps, a->count);
}

int store_committed_steps(ms_store *s, int64_t **steps, size_t *count)
{
    steps_args a = {s, steps, count};
    return guard_run(list_steps_guarded, &a);
}

int ms_store_steps(ms_store *s, int64_t *steps, int64_t capacity, int64_t *count)
{
    MS_CHECK(store_check(s, "store_steps"));
    if (!count || capacity < 0 || (capacity > 0 && !steps))
        return MS_FAIL(MS_ERR_INVALID, "store_steps: needs count, and steps when capacity > 0");
    int64_t *list;
    size_t n;
    MS_CHECK(store_committed_steps(s, &list, &n));
    for (size_t i = 0; i < n && (int64_t)i < capacity; i++)
        steps[i] = list[i];
    *count = (int64_t)n;
    free(list);
    return MS_OK;
}

int ms_store_latest_step(ms_store *s, int64_t *step)
{
    MS_CHECK(store_check(s, "store_latest_step"));
    if (!step)
        return MS_FAIL(MS_ERR_INVALID, "store_latest_step: step must not be NULL");
    int64_t *list;
    size_t n;
    MS_CHECK(store_committed_steps(s, &list, &n));
    int status = n ? MS_OK : MS_FAIL(MS_ERR_NOT_FOUND, "%s has no committed step", s->path);
    if (n)
        *step = list[n - 1];
    free(list);
    return status;
}

int ms_store_set_max_chunk_bytes(ms_store *s, int64_t bytes)
{
    MS_CHECK(store_check(s, "store_set_max_chunk_bytes"));
    if (bytes < STORE_MIN_CHUNK_BYTES || bytes > STORE_MAX_CHUNK_BYTES)
        return MS_FAIL(MS_ERR_INVALID, "store_set_max_chunk_bytes: %lld is outside [64, 2^31]",
                       (long long)bytes);
    s->max_chunk_bytes = bytes;
    return MS_OK;
}
