/* moonshard store: the process-wide registry of LMDB environments, their format records,
 * transactions that survive another process resizing the map, and LMDB error messages.
 *
 * LMDB forbids opening one file twice in a process (closing either copy drops the other's
 * locks), so every handle of a process shares one MDB_env per file; entries opened by
 * another process (inherited over fork) are never used or closed. Shard files opened for
 * writing use MDB_WRITEMAP (writes go straight into the shared map, no staging buffer);
 * every writer of a shard file must, so that is the only way this code opens one. Every
 * map is MDB_NORDAHEAD (MADV_RANDOM): a fault on a page of the map would otherwise read a
 * whole read-ahead window (8 MiB here) around it into the page cache as single pages - of
 * the holes a writer is about to fill, where the chunks pwritten afterwards stay in single
 * pages (read back about 1.5x slower than large folios), and of the chunks a reader is
 * about to pread, whose own sequential read-ahead would fetch them in large folios. Reads
 * through the map ask for read-ahead themselves (prefetch_chunk). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "store_internal.h"

static const char FORMAT_MAGIC[8] = {'M', 'S', 'H', 'D', 'S', 'T', 'O', 'R'};
static const char FORMAT_KEY[] = "format"; /* key of the format record in "meta" */
static const char *const FILE_KIND_NAMES[] = {"index", "shard"};

enum { MAX_READERS = 1024, READ_RETRIES = 8 };
static const size_t INDEX_MAP_BYTES = (size_t)16 << 30;
static const size_t INITIAL_SHARD_MAP_BYTES = (size_t)1 << 20;
static const uint64_t SHARD_HEADROOM_BYTES = (uint64_t)1 << 20;
static const uint64_t SHARD_MIN_HEADROOM_BYTES = (uint64_t)256 << 10; /* on a full disk */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static store_env *registry;

bool env_value_offset(const store_env *e, const void *value, uint64_t size, off_t *offset)
{
    enum { OVERFLOW_PAGE_FLAG = 0x04 };
    const uint8_t *page = (const uint8_t *)value - LMDB_PAGE_HEADER_BYTES;
    if ((uintptr_t)page % e->page_bytes)
        return false;
    uint64_t page_number;
    uint16_t flags;
    uint32_t page_count;
    memcpy(&page_number, page, 8);
    memcpy(&flags, page + 10, 2);
    memcpy(&page_count, page + 12, 4);
    MDB_envinfo info;
    mdb_env_info(e->env, &info);
    uint64_t expected = (size + LMDB_PAGE_HEADER_BYTES + e->page_bytes - 1) / e->page_bytes;
    if (!(flags & OVERFLOW_PAGE_FLAG) || page_count != expected ||
        (page_number + page_count) * e->page_bytes > info.me_mapsize)
        return false;
    *offset = (off_t)(page_number * e->page_bytes + LMDB_PAGE_HEADER_BYTES);
    return true;
}

/* Where LMDB mapped e's file in this process (lmdb.h tells only fixed addresses): the
 * mapping of /proc/self/maps whose device and inode are the file's. */
static void locate_map(store_env *e)
{
    e->map_begin = e->map_end = NULL;
    mdb_filehandle_t fd;
    struct stat st;
    if (!e->env || mdb_env_get_fd(e->env, &fd) || fstat(fd, &st))
        return;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps)
        return;
    char line[4096];
    while (fgets(line, sizeof line, maps)) {
        unsigned long begin, end, major, minor, inode;
        if (sscanf(line, "%lx-%lx %*s %*s %lx:%lx %lu", &begin, &end, &major, &minor, &inode) == 5 &&
            inode == (unsigned long)st.st_ino && makedev(major, minor) == st.st_dev &&
            end - begin > 65536) { /* not the lock file's map */
            e->map_begin = (const uint8_t *)begin;
            e->map_end = (const uint8_t *)end;
            break;
        }
    }
    fclose(maps);
}

int env_read_fd(store_env *e, int *fd)
{
    if (e->read_fd < 0) {
        e->read_fd = open(e->path, O_RDONLY | O_CLOEXEC);
        if (e->read_fd < 0)
            return MS_FAIL(errno, "%s: %s", e->path, strerror(errno));
        posix_fadvise(e->read_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    *fd = e->read_fd;
    return MS_OK;
}

int env_fail(const store_env *e, int rc, const char *doing)
{
    int status;
    switch (rc) {
    case MDB_NOTFOUND:
        status = MS_ERR_NOT_FOUND;
        break;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INVALID:
    case MDB_INCOMPATIBLE:
    case MDB_BAD_DBI:
        status = MS_ERR_CORRUPT;
        break;
    case MDB_VERSION_MISMATCH:
        status = MS_ERR_VERSION;
        break;
    case MDB_MAP_FULL:
        if (e->disk_full)
            return MS_FAIL(ENOSPC, "%s: %s: no free page is left in the file and it cannot grow: %s",
                           e->path, doing, strerror(ENOSPC));
        status = ENOSPC;
        break;
    case MDB_TXN_FULL:
        status = ENOSPC;
        break;
    case MDB_READERS_FULL:
        status = EAGAIN;
        break;
    default:
        status = rc > 0 ? rc : MS_ERR_STATE;
        break;
    }
    return MS_FAIL(status, "%s: %s: %s", e->path, doing, mdb_strerror(rc));
}

static void format_record(uint8_t record[FORMAT_RECORD_BYTES], int kind, int rank)
{
    memset(record, 0, FORMAT_RECORD_BYTES);
    memcpy(record, FORMAT_MAGIC, 8);
    uint32_t fields[3] = {MS_STORE_FORMAT_VERSION, (uint32_t)kind, (uint32_t)rank};
    for (int f = 0; f < 3; f++)
        for (int i = 0; i < 4; i++)
            record[8 + 4 * f + i] = (uint8_t)(fields[f] >> (8 * i));
}

static uint32_t record_field(const uint8_t *record, int field)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)record[8 + 4 * field + i] << (8 * i);
    return v;
}

static int not_a_store(const store_env *e, const char *why)
{
    return MS_FAIL(MS_ERR_CORRUPT, "%s is not a moonshard store file (%s)", e->path, why);
}

static int check_format_record(const store_env *e, const MDB_val *value)
{
    if (value->mv_size != FORMAT_RECORD_BYTES || memcmp(value->mv_data, FORMAT_MAGIC, 8) != 0)
        return not_a_store(e, "bad format record");
    const uint8_t *record = value->mv_data;
    uint32_t version = record_field(record, 0);
    if (version > MS_STORE_FORMAT_VERSION)
        return MS_FAIL(MS_ERR_VERSION,
                       "%s was written by store format version %u; this build reads up to %d",
                       e->path, version, MS_STORE_FORMAT_VERSION);
    if (version == 0)
        return not_a_store(e, "format version 0");
    uint32_t kind = record_field(record, 1), rank = record_field(record, 2);
    if (kind != (uint32_t)e->kind || (e->kind == FILE_SHARD && rank != (uint32_t)e->rank)) {
        char why[96];
        snprintf(why, sizeof why, "it is the %s file of rank %u",
                 kind < 2 ? FILE_KIND_NAMES[kind] : "unknown", rank);
        return not_a_store(e, why);
    }
    return MS_OK;
}

/* A new (empty) file gets the "meta" database and its format record; an LMDB file that
 * holds anything else is not ours to stamp. */
static int stamp_new_file(store_env *e, MDB_txn *txn, MDB_dbi *meta)
{
    MDB_dbi main_dbi;
    MDB_stat stat;
    int rc = mdb_dbi_open(txn, NULL, 0, &main_dbi);
    if (!rc)
        rc = mdb_stat(txn, main_dbi, &stat);
    if (rc)
        return env_fail(e, rc, "inspecting a new file");
    if (stat.ms_entries > 0)
        return not_a_store(e, "an LMDB file with other data");
    uint8_t record[FORMAT_RECORD_BYTES];
    format_record(record, e->kind, e->rank);
    MDB_val key = {sizeof FORMAT_KEY - 1, (void *)FORMAT_KEY};
    MDB_val value = {FORMAT_RECORD_BYTES, record};
    rc = mdb_dbi_open(txn, "meta", MDB_CREATE, meta);
    if (!rc)
        rc = mdb_put(txn, *meta, &key, &value, 0);
    return rc ? env_fail(e, rc, "writing the format record") : MS_OK;
}

/* Open the "meta" and data databases and check the format record. */
static int open_databases(store_env *e, bool writable)
{
    const char *data_name = e->kind == FILE_INDEX ? "manifests" : "chunks";
    MDB_txn *txn;
    int rc = mdb_txn_begin(e->env, NULL, writable ? 0 : MDB_RDONLY, &txn);
    if (rc)
        return env_fail(e, rc, "beginning a transaction");
    guard_note_txn(e, txn, false);
    MDB_dbi meta;
    int status = MS_OK;
    rc = mdb_dbi_open(txn, "meta", 0, &meta);
    if (rc == MDB_NOTFOUND && writable)
        status = stamp_new_file(e, txn, &meta);
    else if (rc == MDB_NOTFOUND || rc == MDB_INCOMPATIBLE)
        status = not_a_store(e, "no format record");
    else if (rc)
        status = env_fail(e, rc, "opening the meta database");
    MDB_val key = {sizeof FORMAT_KEY - 1, (void *)FORMAT_KEY}, value;
    if (!status && (rc = mdb_get(txn, meta, &key, &value)))
        status = rc == MDB_NOTFOUND ? not_a_store(e, "no format record")
                                    : env_fail(e, rc, "reading the format record");
    /* (a writer's new record is in its dirty pages, not in the map) */
    if (!status && !writable && !space_value_in_file(e, &value))
        status = not_a_store(e, "the format record lies outside the file");
    if (!status)
        status = check_format_record(e, &value);
    if (!status && (rc = mdb_dbi_open(txn, data_name, writable ? MDB_CREATE : 0, &e->data_dbi)))
        status = rc == MDB_NOTFOUND ? not_a_store(e, "no data database")
                                    : env_fail(e, rc, "opening the data database");
    guard_forget_txn(txn);
    if (status) {
        mdb_txn_abort(txn);
        return status;
    }
    e->meta_dbi = meta;
    rc = mdb_txn_commit(txn);
    return rc ? env_fail(e, rc, "committing the format record") : MS_OK;
}

typedef struct open_args {
    store_env *e;
    bool writable;
} open_args;

static int open_databases_guarded(void *arg)
{
    open_args *a = arg;
    return open_databases(a->e, a->writable);
}

static int open_env(store_env *e, bool writable)
{
    int rc = mdb_env_create(&e->env);
    if (rc)
        return env_fail(e, rc, "creating an environment");
    mdb_env_set_maxdbs(e->env, 2);
    mdb_env_set_maxreaders(e->env, MAX_READERS);
    mdb_env_set_assert(e->env, guard_lmdb_assert);
    unsigned flags = MDB_NOSUBDIR | MDB_NOTLS | MDB_NORDAHEAD;
    size_t map_bytes = 0;
    int status = space_check_file(e);
    if (!status)
        status = space_reserve_lock_file(e);
    if (status) {
        mdb_env_close(e->env);
        e->env = NULL;
        return status;
    }
    if (writable && e->kind == FILE_SHARD) {
        /* A writable map sets the file's size; an existing file's map is the file (the
         * room earlier saves grew, which the meta page only records at the next commit), so
         * opening it asks the disk for nothing. A new file's map starts small. Maps grow with
         * the data (env_grow), each time over reserved file space. */
        struct stat st;
        flags |= MDB_WRITEMAP;
        map_bytes = INITIAL_SHARD_MAP_BYTES;
        if (stat(e->path, &st) == 0 && st.st_size > 0)
            map_bytes = (size_t)st.st_size;
    } else if (writable) {
        map_bytes = INDEX_MAP_BYTES;
    } else {
        flags |= MDB_RDONLY;
    }
    if (map_bytes)
        mdb_env_set_mapsize(e->env, map_bytes);
    rc = mdb_env_open(e->env, e->path, flags, 0644);
    if (!writable && (rc == EACCES || rc == EROFS)) {
        /* Read-only media: no lock file can be made, and no writer can be there. */
        mdb_env_close(e->env);
        mdb_env_create(&e->env);
        mdb_env_set_maxdbs(e->env, 2);
        rc = mdb_env_open(e->env, e->path, flags | MDB_NOLOCK, 0644);
    }
    if (rc)
        status = space_short_file(e);
    if (status)
        rc = 0; /* named by space_short_file */
    if (rc == ENOENT)
        status = MS_FAIL(MS_ERR_NOT_FOUND, "%s does not exist", e->path);
    else if (rc == MDB_INVALID)
        status = not_a_store(e, "not an LMDB file");
    else if (rc)
        status = env_fail(e, rc, "opening");
    if (!status && (flags & MDB_WRITEMAP)) {
        /* Every page the map may write has its file space allocated, so a full disk is
         * ENOSPC here, never SIGBUS on a store into the map. */
        MDB_envinfo info;
        mdb_env_info(e->env, &info);
        status = space_reserve(e, info.me_mapsize);
    }
    if (!status) {
        open_args a = {e, writable};
        MDB_stat stat;
        mdb_env_stat(e->env, &stat);
        e->page_bytes = stat.ms_psize;
        locate_map(e);
        status = guard_run(open_databases_guarded, &a);
    }
    if (status) {
        mdb_env_close(e->env);
        e->env = NULL;
        return status;
    }
    MDB_stat stat;
    mdb_env_stat(e->env, &stat);
    e->page_bytes = stat.ms_psize;
    e->writable = writable;
    locate_map(e);
    return MS_OK;
}

static store_env *find_open(const struct stat *st)
{
    for (store_env *e = registry; e; e = e->next)
        if (e->pid == getpid() && e->dev == st->st_dev && e->ino == st->st_ino && e->env)
            return e;
    return NULL;
}

/* Reopen a read-only environment for writing; the entry stays usable read-only when that
 * fails. Handles of this process never hold a transaction across calls, so no one can be
 * inside the environment now except readers of other threads, which the lock waits for. */
static int upgrade(store_env *e)
{
    pthread_rwlock_wrlock(&e->map_lock);
    mdb_env_close(e->env);
    e->env = NULL;
    int status = open_env(e, true);
    if (status) {
        saved_error saved;
        error_save(&saved, status);
        open_env(e, false);
        error_restore(&saved);
    }
    pthread_rwlock_unlock(&e->map_lock);
    return status;
}

int env_acquire(const char *path, const char *name, int kind, int rank, bool writable,
                store_env **out)
{
    pthread_mutex_lock(&registry_lock);
    struct stat st;
    int status = MS_OK;
    store_env *e = stat(path, &st) == 0 ? find_open(&st) : NULL;
    if (e) {
        if (writable && !e->writable)
            status = upgrade(e);
        if (!status)
            e->refcount++;
        goto done;
    }
    e = calloc(1, sizeof *e);
    if (!e || !(e->path = strdup(path)) || !(e->name = strdup(name))) {
        status = MS_FAIL(MS_ERR_OOM, "store: out of memory opening %s", path);
        goto undo;
    }
    e->pid = getpid();
    e->read_fd = -1;
    e->kind = kind;
    e->rank = rank;
    pthread_rwlock_init(&e->map_lock, NULL);
    status = open_env(e, writable);
    if (status)
        goto undo_lock;
    if (stat(path, &st) != 0) {
        status = MS_FAIL(errno, "%s: stat: %s", path, strerror(errno));
        mdb_env_close(e->env);
        goto undo_lock;
    }
    e->dev = st.st_dev;
    e->ino = st.st_ino;
    e->refcount = 1;
    e->next = registry;
    registry = e;
    goto done;
undo_lock:
    pthread_rwlock_destroy(&e->map_lock);
undo:
    if (e) {
        free(e->path);
        free(e->name);
        free(e);
    }
    e = NULL;
done:
    pthread_mutex_unlock(&registry_lock);
    *out = e;
    return status;
}

void env_release(store_env *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&registry_lock);
    if (--e->refcount == 0 && e->pid == getpid()) {
        for (store_env **link = &registry; *link; link = &(*link)->next)
            if (*link == e) {
                *link = e->next;
                break;
            }
        if (e->env)
            mdb_env_close(e->env);
        if (e->read_fd >= 0)
            close(e->read_fd);
        pthread_rwlock_destroy(&e->map_lock);
        free(e->path);
        free(e->name);
        free(e);
    }
    pthread_mutex_unlock(&registry_lock);
}

/* Another process grew the map: adopt its size (nothing of this process is mapped in). */
static int adopt_map_size(store_env *e)
{
    pthread_rwlock_wrlock(&e->map_lock);
    int rc = mdb_env_set_mapsize(e->env, 0);
    locate_map(e);
    pthread_rwlock_unlock(&e->map_lock);
    return rc ? env_fail(e, rc, "adopting the map size another process set") : MS_OK;
}

int env_read_begin(store_env *e, MDB_txn **txn)
{
    if (!e->env)
        return MS_FAIL(MS_ERR_STATE, "%s could not be reopened earlier", e->path);
    for (int attempt = 0;; attempt++) {
        pthread_rwlock_rdlock(&e->map_lock);
        int rc = mdb_txn_begin(e->env, NULL, MDB_RDONLY, txn);
        if (!rc) {
            guard_note_txn(e, *txn, true);
            return MS_OK;
        }
        pthread_rwlock_unlock(&e->map_lock);
        if (rc != MDB_MAP_RESIZED || attempt == READ_RETRIES)
            return env_fail(e, rc, "beginning a read transaction");
        MS_CHECK(adopt_map_size(e));
    }
}

void env_read_end(store_env *e, MDB_txn *txn)
{
    guard_forget_txn(txn);
    env_read_end_unguarded(e, txn);
}

void env_read_end_unguarded(store_env *e, MDB_txn *txn)
{
    mdb_txn_abort(txn);
    pthread_rwlock_unlock(&e->map_lock);
}

const store_env *env_mapping(const void *address)
{
    const uint8_t *a = address;
    for (const store_env *e = registry; e; e = e->next) {
        if (e->pid != getpid())
            continue;
        if (e->map_begin && a >= e->map_begin && a < e->map_end)
            return e;
    }
    return NULL;
}

/* Before a write transaction on a shard: a map with room for the pages a transaction copies
 * or adds besides its values (the tree, the free list), which callers do not count, all of
 * it over allocated file space (the file may have been trimmed below the map). On a disk
 * without room for the whole map, the map shrinks to the used pages and a little more; on a
 * disk without even that, to the space the file has (its free pages, the spare past its used
 * pages): a transaction that only deletes fits there, and one that needs more fails with
 * ENOSPC (MDB_MAP_FULL). [OUT] *reserved: the map size now backed. */
static int prepare_shard_map(store_env *e, uint64_t *reserved)
{
    MDB_envinfo info;
    mdb_env_info(e->env, &info);
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * e->page_bytes;
    uint64_t headroom = used / 16 > SHARD_HEADROOM_BYTES ? used / 16 : SHARD_HEADROOM_BYTES;
    uint64_t target = info.me_mapsize, least = used + SHARD_MIN_HEADROOM_BYTES;
    if (target < least)
        target = (used + 2 * headroom) / SHARD_HEADROOM_BYTES * SHARD_HEADROOM_BYTES;
    int status = space_reserve(e, target);
    if (status == ENOSPC && least < target) {
        target = least;
        status = space_reserve(e, target);
    }
    bool full = status == ENOSPC;
    if (full)
        status = space_in_file(e, &target);
    MS_CHECK(status);
    *reserved = target;
    if (target != info.me_mapsize)
        MS_CHECK(env_grow(e, target, target));
    if (full)
        e->disk_full = true;
    return MS_OK;
}

int env_write_begin(store_env *e, MDB_txn **txn)
{
    if (!e->env || !e->writable)
        return MS_FAIL(MS_ERR_STATE, "%s is not open for writing", e->path);
    uint64_t reserved = 0;
    if (e->kind == FILE_SHARD)
        MS_CHECK(prepare_shard_map(e, &reserved));
    for (int attempt = 0;; attempt++) {
        int rc = mdb_txn_begin(e->env, NULL, 0, txn);
        if (!rc && e->kind == FILE_SHARD) {
            /* Another process may have grown the map meanwhile (adopted below). */
            MDB_envinfo info;
            mdb_env_info(e->env, &info);
            int status = info.me_mapsize > reserved ? space_reserve(e, info.me_mapsize) : MS_OK;
            if (status)
                mdb_txn_abort(*txn);
            return status;
        }
        if (!rc)
            return MS_OK;
        if (rc != MDB_MAP_RESIZED || attempt == READ_RETRIES)
            return env_fail(e, rc, "beginning a write transaction");
        MS_CHECK(adopt_map_size(e));
    }
}

int env_grow(store_env *e, size_t bytes, size_t at_least)
{
    if (e->kind == FILE_SHARD && e->writable) {
        int status = space_reserve(e, bytes);
        if (status == ENOSPC && at_least < bytes) {
            bytes = at_least;
            status = space_reserve(e, bytes);
        }
        MS_CHECK(status);
    }
    pthread_rwlock_wrlock(&e->map_lock);
    int rc = mdb_env_set_mapsize(e->env, bytes);
    locate_map(e);
    pthread_rwlock_unlock(&e->map_lock);
    return rc ? env_fail(e, rc, "growing the map") : MS_OK;
}

void step_key(uint8_t key[STEP_KEY_BYTES], int64_t step)
{
    for (int i = 0; i < 8; i++)
        key[i] = (uint8_t)((uint64_t)step >> (56 - 8 * i));
}

int64_t step_from_key(const uint8_t *key)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | key[i];
    return (int64_t)v;
}

void chunk_key(uint8_t key[CHUNK_KEY_BYTES], int64_t step, uint32_t seq)
{
    step_key(key, step);
    for (int i = 0; i < 4; i++)
        key[8 + i] = (uint8_t)(seq >> (24 - 8 * i));
}
