/* moonshard store tests: shared helpers - checks, temporary stores, deterministic tensor
 * contents by global element, and saves run by forked ranks that send their chunk tables. */
#ifndef TEST_STORE_UTIL_H
#define TEST_STORE_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <lmdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ms.h"

static int test_failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
            test_failures++;                                                                       \
        }                                                                                          \
    } while (0)

#define CHECK_OK(expr)                                                                             \
    do {                                                                                           \
        int check_status_ = (expr);                                                                \
        if (check_status_ != MS_OK) {                                                              \
            fprintf(stderr, "%s:%d: %s returned %d (%s): %s [%s]\n", __FILE__, __LINE__, #expr,    \
                    check_status_, ms_strerror(check_status_), ms_last_error(),                    \
                    ms_last_error_site());                                                         \
            test_failures++;                                                                       \
        }                                                                                          \
    } while (0)

/* expr fails with status and its message contains needle. */
#define CHECK_FAILS(expr, status, needle)                                                          \
    do {                                                                                           \
        int check_status_ = (expr);                                                                \
        if (check_status_ != (status) || !strstr(ms_last_error(), (needle))) {                     \
            fprintf(stderr, "%s:%d: %s returned %d (%s) \"%s\"; wanted %d with \"%s\"\n",          \
                    __FILE__, __LINE__, #expr, check_status_, ms_strerror(check_status_),          \
                    ms_last_error(), (status), (needle));                                          \
            test_failures++;                                                                       \
        }                                                                                          \
    } while (0)

static inline int test_report(const char *name)
{
    if (test_failures)
        fprintf(stderr, "%s: %d checks failed\n", name, test_failures);
    else
        printf("%s: all checks passed\n", name);
    return test_failures ? 1 : 0;
}

/* ---- temporary directories ---- */

static inline int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static inline void remove_tree(const char *path)
{
    nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A fresh directory under $TMPDIR (or /tmp) in buf; the store goes in buf/name. */
static inline const char *temp_store(char *buf, size_t size, const char *name)
{
    static char root[256];
    if (!root[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(root, sizeof root, "%s/ms-store-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(root)) {
            perror("mkdtemp");
            exit(2);
        }
    }
    snprintf(buf, size, "%s/%s", root, name);
    return buf;
}

static inline void remove_temp_root(void)
{
    char buf[512];
    temp_store(buf, sizeof buf, "x");
    *strrchr(buf, '/') = 0;
    remove_tree(buf);
}

/* ---- tensors whose every element is a function of its global index ---- */

static inline uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint8_t *element_at(const ms_tensor *t, const int64_t *index)
{
    int64_t offset = 0;
    for (int d = 0; d < t->ndim; d++)
        offset += index[d] * t->strides[d];
    return (uint8_t *)ms_tensor_data(t) + offset * (int64_t)ms_dtype_size(t->dtype);
}

/* Visit every element of t (holding region offsets of a tensor of global shape gshape):
 * write the pattern (check == 0) or count elements that differ from it. */
static inline int64_t visit_region(ms_tensor *t, const int64_t *gshape, const int64_t *offsets,
                                   uint64_t seed, int check)
{
    if (t->numel == 0)
        return 0;
    size_t esize = ms_dtype_size(t->dtype);
    int64_t index[MS_MAX_DIMS] = {0}, wrong = 0;
    for (;;) {
        int64_t global = 0;
        for (int d = 0; d < t->ndim; d++)
            global = global * gshape[d] + offsets[d] + index[d];
        uint64_t value = mix64(seed * 1000003u + (uint64_t)global);
        uint8_t *at = element_at(t, index);
        if (check)
            wrong += memcmp(at, &value, esize) != 0;
        else
            memcpy(at, &value, esize);
        int d = t->ndim - 1;
        while (d >= 0 && ++index[d] == t->shape[d])
            index[d--] = 0;
        if (d < 0)
            return wrong;
    }
}

static inline void fill_region(ms_tensor *t, const int64_t *gshape, const int64_t *offsets,
                               uint64_t seed)
{
    visit_region(t, gshape, offsets, seed, 0);
}

static inline int64_t region_mismatches(ms_tensor *t, const int64_t *gshape, const int64_t *offsets,
                                        uint64_t seed)
{
    return visit_region(t, gshape, offsets, seed, 1);
}

static inline ms_tensor *new_tensor(int dtype, int ndim, const int64_t *shape)
{
    ms_tensor *t = NULL;
    if (ms_tensor_new(&t, dtype, ndim, shape, MS_POOL_CPU) != MS_OK) {
        fprintf(stderr, "ms_tensor_new failed: %s\n", ms_last_error());
        exit(2);
    }
    return t;
}

/* ---- saves run by forked ranks ----
 * Rank 0 runs in the calling process; ranks 1.. run in children that open the store
 * themselves and send their chunk table through a pipe. put_rank puts one rank's chunks. */
typedef int (*put_rank_fn)(ms_store *s, int rank, int world_size, void *arg);

static inline int write_all(int fd, const void *data, size_t n)
{
    const char *p = data;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static inline int read_all(int fd, void *data, size_t n)
{
    char *p = data;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static inline void run_child_rank(const char *dir, int64_t step, int rank, int world_size,
                                  put_rank_fn put, void *arg, int fd)
{
    ms_store *s;
    int status = ms_store_open(&s, dir, MS_STORE_READ_WRITE);
    if (!status)
        status = ms_store_begin(s, step, rank, MS_STORE_FOREGROUND);
    if (!status)
        status = put(s, rank, world_size, arg);
    if (!status)
        status = ms_store_commit_data(s);
    const void *table = NULL;
    int64_t size = 0;
    if (!status)
        status = ms_store_chunk_table(s, &table, &size);
    if (status) {
        fprintf(stderr, "rank %d: %s: %s\n", rank, ms_strerror(status), ms_last_error());
        _exit(1);
    }
    if (write_all(fd, &size, sizeof size) || write_all(fd, table, (size_t)size))
        _exit(1);
    ms_store_close(s);
    _exit(0);
}

/* Save step on world_size ranks; returns the first failing status (MS_OK when all ok). */
static inline int save_ranks(const char *dir, int64_t step, int world_size, put_rank_fn put,
                             void *arg)
{
    pid_t pids[64];
    int fds[64];
    for (int r = 1; r < world_size; r++) {
        int pipe_fds[2];
        if (pipe(pipe_fds) != 0)
            return errno;
        pids[r] = fork();
        if (pids[r] == 0) {
            close(pipe_fds[0]);
            run_child_rank(dir, step, r, world_size, put, arg, pipe_fds[1]);
        }
        close(pipe_fds[1]);
        fds[r] = pipe_fds[0];
    }
    ms_store *s = NULL;
    int status = ms_store_open(&s, dir, MS_STORE_READ_WRITE);
    if (!status)
        status = ms_store_begin(s, step, 0, MS_STORE_FOREGROUND);
    if (!status)
        status = put(s, 0, world_size, arg);
    if (!status)
        status = ms_store_commit_data(s);
    for (int r = 1; r < world_size; r++) {
        int64_t size;
        void *table = NULL;
        int child_status = 0;
        if (read_all(fds[r], &size, sizeof size) == 0 && (table = malloc((size_t)size + 1)) &&
            read_all(fds[r], table, (size_t)size) == 0) {
            if (!status)
                status = ms_store_merge_chunk_table(s, table, size);
        } else if (!status) {
            status = MS_ERR_PEER_DIED;
        }
        free(table);
        close(fds[r]);
        waitpid(pids[r], &child_status, 0);
        if (!status && !(WIFEXITED(child_status) && WEXITSTATUS(child_status) == 0))
            status = MS_ERR_PEER_DIED;
    }
    if (!status)
        status = ms_store_commit_manifest(s, world_size);
    ms_store_close(s);
    return status;
}

/* Chunk keys in shard-<rank>.mdb whose step is not step_kept (no store handle may be open
 * on the file in this process). */
static inline int64_t foreign_chunk_keys(const char *dir, int rank, int64_t step_kept)
{
    char path[600];
    snprintf(path, sizeof path, "%s/shard-%d.mdb", dir, rank);
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_cursor *cursor;
    int64_t count = 0;
    mdb_env_create(&env);
    mdb_env_set_maxdbs(env, 2);
    if (mdb_env_open(env, path, MDB_NOSUBDIR | MDB_RDONLY, 0644) ||
        mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)) {
        mdb_env_close(env);
        return -1;
    }
    if (!mdb_dbi_open(txn, "chunks", 0, &dbi) && !mdb_cursor_open(txn, dbi, &cursor)) {
        MDB_val key, value;
        for (int op = MDB_FIRST; !mdb_cursor_get(cursor, &key, &value, op); op = MDB_NEXT) {
            const uint8_t *k = key.mv_data;
            int64_t step = 0;
            for (int i = 0; i < 8; i++)
                step = step << 8 | k[i];
            count += step != step_kept;
        }
        mdb_cursor_close(cursor);
    }
    mdb_txn_abort(txn);
    mdb_env_close(env);
    return count;
}

/* Drop a file's pages from the page cache (no handle may map it), so the next read is
 * served from disk. */
static inline void evict_file(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

/* Read the whole entry fqn of step into a new tensor. */
static inline ms_tensor *read_full(ms_store *s, int64_t step, const char *fqn)
{
    ms_store_entry entry;
    if (ms_store_entry_find(s, step, fqn, &entry) != MS_OK)
        return NULL;
    ms_tensor *t = new_tensor(entry.dtype, entry.ndim, entry.shape);
    if (ms_store_read_tensor(s, step, fqn, t, NULL) != MS_OK) {
        ms_tensor_free(t);
        return NULL;
    }
    return t;
}

#endif
