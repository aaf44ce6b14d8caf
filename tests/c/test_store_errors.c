/* moonshard store tests: every failure names what is wrong - a flipped byte in a chunk or
 * in the manifest, missing entries, chunks and files, dtype and shape mismatches, a
 * directory that is not a store, a newer format, and calls out of order or with bad input. */
#include <sys/mman.h>

#include "test_store_util.h"

static const int64_t BIG_SHAPE[2] = {256, 256};
static const int64_t SMALL_SHAPE[1] = {5};

static void save_two_entries(const char *dir)
{
    ms_store *s;
    int64_t zeros[2] = {0, 0};
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    ms_tensor *big = new_tensor(MS_F32, 2, BIG_SHAPE), *small = new_tensor(MS_I64, 1, SMALL_SHAPE);
    fill_region(big, BIG_SHAPE, zeros, 11);
    fill_region(small, SMALL_SHAPE, zeros, 12);
    CHECK_OK(ms_store_put_tensor(s, "model.big", big, BIG_SHAPE, zeros));
    CHECK_OK(ms_store_put_tensor(s, "model.small", small, SMALL_SHAPE, zeros));
    CHECK_OK(ms_store_put_bytes(s, "meta.note", "hello", 5));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    ms_tensor_free(big);
    ms_tensor_free(small);
    ms_store_close(s);
}

/* Flip one byte of the first occurrence of needle in the file (no handle may be open). */
static bool flip_in_file(const char *path, const void *needle, size_t size, size_t which)
{
    int fd = open(path, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        return false;
    uint8_t *map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return false;
    uint8_t *at = memmem(map, (size_t)st.st_size, needle, size);
    if (at)
        at[which] ^= 0x40;
    munmap(map, (size_t)st.st_size);
    return at != NULL;
}

/* The stored bytes of elements [first, first + count) (row-major) of a pattern tensor. */
static void element_bytes(int dtype, int64_t first, int64_t count, uint64_t seed, uint8_t *out)
{
    ms_tensor *t = new_tensor(dtype, 1, &count);
    int64_t flat_shape[1] = {first + count};
    fill_region(t, flat_shape, &first, seed);
    memcpy(out, ms_tensor_data(t), ms_tensor_nbytes(t));
    ms_tensor_free(t);
}

static void test_corruption(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "corrupt");
    save_two_entries(dir);
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    uint8_t pattern[64];
    element_bytes(MS_F32, 40000, 16, 11, pattern);
    CHECK(flip_in_file(path, pattern, sizeof pattern, 5));

    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    ms_tensor *window = new_tensor(MS_F32, 2, (int64_t[]){2, 2});
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", window, NULL), MS_ERR_CORRUPT,
                "step 1: 'model.big': chunk [0:256, 0:256] in shard-0.mdb failed its checksum");
    ms_tensor_free(window);
    /* Whole cached chunks are hashed as they are copied out of the map (checksum_copy). */
    ms_tensor *cached = new_tensor(MS_F32, 2, BIG_SHAPE);
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", cached, NULL), MS_ERR_CORRUPT,
                "'model.big': chunk [0:256, 0:256] in shard-0.mdb failed its checksum");
    ms_tensor_free(cached);
    CHECK_FAILS(ms_store_verify_entry(s, 1, "model.big"), MS_ERR_CORRUPT, "'model.big'");
    CHECK_OK(ms_store_verify_entry(s, 1, "model.small"));
    CHECK_OK(ms_store_verify_entry(s, 1, "meta.note"));
    ms_tensor *small = read_full(s, 1, "model.small");
    int64_t zero[1] = {0};
    CHECK(small && region_mismatches(small, SMALL_SHAPE, zero, 12) == 0);
    ms_tensor_free(small);
    ms_store_close(s);

    /* The same, read from disk (whole chunks not in the page cache are read with pread). */
    evict_file(path);
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    ms_tensor *whole = new_tensor(MS_F32, 2, BIG_SHAPE);
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", whole, NULL), MS_ERR_CORRUPT,
                "'model.big': chunk [0:256, 0:256] in shard-0.mdb failed its checksum");
    ms_tensor_free(whole);
    ms_store_close(s);

    /* A small chunk lives inside an LMDB leaf page; flip one of its bytes too. */
    uint8_t small_bytes[40];
    element_bytes(MS_I64, 0, 5, 12, small_bytes);
    CHECK(flip_in_file(path, small_bytes, sizeof small_bytes, 17));
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    CHECK_FAILS(ms_store_verify_entry(s, 1, "model.small"), MS_ERR_CORRUPT, "'model.small'");
    ms_store_close(s);

    /* The manifest has its own checksum. */
    snprintf(path, sizeof path, "%s/index.mdb", dir);
    CHECK(flip_in_file(path, "model.small", 11, 3));
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    int64_t count;
    CHECK_FAILS(ms_store_entry_count(s, 1, &count), MS_ERR_CORRUPT,
                "step 1: manifest failed its checksum");
    ms_store_close(s);
}

static void delete_key(const char *path, const char *db, const void *key, size_t size)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    mdb_env_create(&env);
    mdb_env_set_maxdbs(env, 2);
    CHECK(mdb_env_open(env, path, MDB_NOSUBDIR | MDB_WRITEMAP, 0644) == 0);
    CHECK(mdb_txn_begin(env, NULL, 0, &txn) == 0);
    CHECK(mdb_dbi_open(txn, db, 0, &dbi) == 0);
    MDB_val k = {size, (void *)key};
    CHECK(mdb_del(txn, dbi, &k, NULL) == 0);
    CHECK(mdb_txn_commit(txn) == 0);
    mdb_env_close(env);
}

static void test_missing(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "missing");
    save_two_entries(dir);
    ms_store *s;
    ms_store_entry entry;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    CHECK_FAILS(ms_store_entry_find(s, 1, "model.nope", &entry), MS_ERR_NOT_FOUND,
                "step 1 has no entry 'model.nope'");
    ms_tensor *t = new_tensor(MS_F32, 1, (int64_t[]){3});
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.nope", t, NULL), MS_ERR_NOT_FOUND,
                "has no entry 'model.nope'");
    CHECK_FAILS(ms_store_read_tensor(s, 9, "model.big", t, NULL), MS_ERR_NOT_FOUND,
                "step 9 is not committed");
    ms_tensor_free(t);
    ms_store_close(s);

    /* A chunk gone from its file (step 1, chunk 1: "model.small"). */
    uint8_t key[12] = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1};
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    delete_key(path, "chunks", key, sizeof key);
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    CHECK_FAILS(ms_store_verify_entry(s, 1, "model.small"), MS_ERR_NOT_FOUND,
                "'model.small': chunk [0:5] is missing from shard-0.mdb");
    t = new_tensor(MS_I64, 1, SMALL_SHAPE);
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.small", t, NULL), MS_ERR_NOT_FOUND,
                "is missing from shard-0.mdb");
    ms_tensor_free(t);
    CHECK_OK(ms_store_verify_entry(s, 1, "model.big"));
    ms_store_close(s);

    /* A whole shard file gone. */
    remove(path);
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    CHECK_FAILS(ms_store_verify_entry(s, 1, "model.big"), MS_ERR_NOT_FOUND,
                "shard-0.mdb is missing");
    ms_store_close(s);
}

static void test_mismatches(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "mismatch");
    save_two_entries(dir);
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    ms_tensor *f64 = new_tensor(MS_F64, 2, BIG_SHAPE);
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", f64, NULL), MS_ERR_DTYPE,
                "'model.big' is stored as f32, the destination is f64");
    ms_tensor_free(f64);
    ms_tensor *flat = new_tensor(MS_F32, 1, (int64_t[]){65536});
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", flat, NULL), MS_ERR_SHAPE,
                "'model.big' has global shape [256, 256]; the destination of shape [65536] asks "
                "for region [0:65536]");
    ms_tensor_free(flat);
    ms_tensor *rows = new_tensor(MS_F32, 2, (int64_t[]){100, 256});
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", rows, (int64_t[]){200, 0}), MS_ERR_SHAPE,
                "asks for region [200:300, 0:256]");
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.big", rows, (int64_t[]){-1, 0}), MS_ERR_SHAPE,
                "[-1:99, 0:256]");
    CHECK_FAILS(ms_store_read_tensor(s, 1, "meta.note", rows, NULL), MS_ERR_DTYPE,
                "'meta.note' is a non-tensor value");
    ms_storage device_storage = {
        .data = (void *)16, .nbytes = 4, .pool = MS_POOL_CUDA0, .refcount = 1};
    ms_tensor on_device = {.storage = &device_storage,
                           .dtype = MS_I64,
                           .ndim = 1,
                           .numel = 5,
                           .shape = {5},
                           .strides = {1}};
    CHECK_FAILS(ms_store_read_tensor(s, 1, "model.small", &on_device, NULL), MS_ERR_DEVICE,
                "read into a host tensor");
    ms_tensor_free(rows);
    ms_store_close(s);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static void put_raw_record(const char *path, const char *db, const char *key, const void *value,
                           size_t size)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    mdb_env_create(&env);
    mdb_env_set_maxdbs(env, 2);
    CHECK(mdb_env_open(env, path, MDB_NOSUBDIR, 0644) == 0);
    CHECK(mdb_txn_begin(env, NULL, 0, &txn) == 0);
    CHECK(mdb_dbi_open(txn, db, MDB_CREATE, &dbi) == 0);
    MDB_val k = {strlen(key), (void *)key}, v = {size, (void *)value};
    CHECK(mdb_put(txn, dbi, &k, &v, 0) == 0);
    CHECK(mdb_txn_commit(txn) == 0);
    mdb_env_close(env);
}

static void test_not_a_store(void)
{
    char dir[512], path[600];
    ms_store *s = NULL;
    temp_store(dir, sizeof dir, "absent");
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_ONLY), MS_ERR_NOT_FOUND,
                "no such checkpoint directory");
    temp_store(dir, sizeof dir, "empty");
    mkdir(dir, 0755);
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_ONLY), MS_ERR_CORRUPT,
                "is not a moonshard store (it has no index.mdb)");
    temp_store(dir, sizeof dir, "a-file");
    write_file(dir, "text");
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_ONLY), MS_ERR_CORRUPT, "not a directory");
    CHECK(ms_store_open(&s, dir, MS_STORE_READ_WRITE) != MS_OK);

    temp_store(dir, sizeof dir, "garbage");
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/index.mdb", dir);
    char junk[8192];
    memset(junk, 'x', sizeof junk);
    junk[sizeof junk - 1] = 0;
    write_file(path, junk);
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_ONLY), MS_ERR_CORRUPT,
                "index.mdb is not a moonshard store file (not an LMDB file)");
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_WRITE), MS_ERR_CORRUPT, "not an LMDB file");

    temp_store(dir, sizeof dir, "foreign-lmdb");
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/index.mdb", dir);
    put_raw_record(path, "theirs", "k", "v", 1);
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_ONLY), MS_ERR_CORRUPT, "no format record");
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_WRITE), MS_ERR_CORRUPT,
                "an LMDB file with other data");
    CHECK(s == NULL);
}

static void test_newer_version(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "newer");
    save_two_entries(dir);
    snprintf(path, sizeof path, "%s/index.mdb", dir);

    /* A manifest written by format version 3 in a version-2 store. */
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    mdb_env_create(&env);
    mdb_env_set_maxdbs(env, 2);
    CHECK(mdb_env_open(env, path, MDB_NOSUBDIR, 0644) == 0);
    CHECK(mdb_txn_begin(env, NULL, 0, &txn) == 0);
    CHECK(mdb_dbi_open(txn, "manifests", 0, &dbi) == 0);
    uint8_t step_key[8] = {0, 0, 0, 0, 0, 0, 0, 1};
    MDB_val k = {8, step_key}, v;
    CHECK(mdb_get(txn, dbi, &k, &v) == 0);
    uint8_t *copy = malloc(v.mv_size);
    memcpy(copy, v.mv_data, v.mv_size);
    copy[8] = 3;
    v.mv_data = copy;
    CHECK(mdb_put(txn, dbi, &k, &v, 0) == 0);
    CHECK(mdb_txn_commit(txn) == 0);
    mdb_env_close(env);
    free(copy);
    ms_store *s;
    int64_t count;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    CHECK_FAILS(ms_store_entry_count(s, 1, &count), MS_ERR_VERSION,
                "manifest was written by format version 3; this build reads up to 2");
    ms_store_close(s);

    /* A store stamped by format version 3. */
    uint8_t record[24] = {'M', 'S', 'H', 'D', 'S',  'T',  'O',  'R',  3, 0, 0, 0,
                          0,   0,   0,   0,   0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0};
    put_raw_record(path, "meta", "format", record, sizeof record);
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_ONLY), MS_ERR_VERSION,
                "written by store format version 3; this build reads up to 2");
    CHECK_FAILS(ms_store_open(&s, dir, MS_STORE_READ_WRITE), MS_ERR_VERSION, "version 3");
}

static void test_bad_calls(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "bad-calls");
    ms_store *s = NULL, *reader = NULL;
    CHECK_FAILS(ms_store_open(NULL, dir, MS_STORE_READ_WRITE), MS_ERR_INVALID, "out");
    CHECK_FAILS(ms_store_open(&s, "", MS_STORE_READ_WRITE), MS_ERR_INVALID, "path");
    CHECK_FAILS(ms_store_open(&s, dir, 7), MS_ERR_INVALID, "mode 7");
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    ms_tensor *t = new_tensor(MS_F32, 1, (int64_t[]){4});
    int64_t shape[1] = {4};
    CHECK_FAILS(ms_store_put_tensor(s, "x", t, shape, NULL), MS_ERR_STATE,
                "call ms_store_begin first");
    CHECK_FAILS(ms_store_commit_data(s), MS_ERR_STATE, "no save in progress");
    CHECK_FAILS(ms_store_commit_manifest(s, 1), MS_ERR_STATE, "has not committed");
    CHECK_FAILS(ms_store_begin(s, -1, 0, MS_STORE_FOREGROUND), MS_ERR_INVALID, "out of range");
    CHECK_FAILS(ms_store_begin(s, 1, 0, 9), MS_ERR_INVALID, "mode 9");
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    CHECK_FAILS(ms_store_begin(s, 2, 0, MS_STORE_FOREGROUND), MS_ERR_STATE, "still in progress");
    CHECK_FAILS(ms_store_put_tensor(s, "", t, shape, NULL), MS_ERR_INVALID, "non-empty");
    CHECK_FAILS(ms_store_put_tensor(s, "x", t, NULL, NULL), MS_ERR_INVALID, "global_shape");
    CHECK_FAILS(ms_store_put_tensor(s, "x", NULL, shape, NULL), MS_ERR_INVALID, "chunk");
    CHECK_FAILS(ms_store_put_bytes(s, "y", NULL, 3), MS_ERR_INVALID, "'y'");
    CHECK_FAILS(ms_store_delete(s, 1), MS_ERR_STATE, "unfinished");
    CHECK_OK(ms_store_put_tensor(s, "x", t, shape, NULL));
    CHECK_OK(ms_store_abort(s));
    CHECK_FAILS(ms_store_put_tensor(s, "x", t, shape, NULL), MS_ERR_STATE, "no save in progress");

    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    CHECK_OK(ms_store_put_tensor(s, "x", t, shape, NULL));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    CHECK_OK(ms_store_open(&reader, dir, MS_STORE_READ_ONLY));
    CHECK_FAILS(ms_store_begin(reader, 2, 0, MS_STORE_FOREGROUND), MS_ERR_STATE, "read-only");
    CHECK_FAILS(ms_store_keep_last(reader, 1), MS_ERR_STATE, "read-only");
    CHECK_FAILS(ms_store_keep_last(s, -1), MS_ERR_INVALID, "negative");
    ms_tensor *back = read_full(reader, 1, "x");
    CHECK(back != NULL);
    ms_tensor_free(back);

    /* A handle used in a forked child. */
    pid_t child = fork();
    if (child == 0) {
        int64_t count;
        int status = ms_store_steps(reader, NULL, 0, &count);
        bool named = strstr(ms_last_error(), "open stores inside each rank, after fork") != NULL;
        ms_store_close(reader);
        ms_store_close(s);
        _exit(status == MS_ERR_STATE && named ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    int64_t count = 0;
    CHECK_OK(ms_store_steps(reader, NULL, 0, &count));
    CHECK(count == 1);
    ms_tensor_free(t);
    ms_store_close(reader);
    ms_store_close(s);
    ms_store_close(NULL);
}

/* Another writer is told who holds writer.lock and, once chosen, for which step, in the
 * words of DESIGN 7: "DIR is being written by another job (pid P on host H, step S holds
 * writer.lock)". */
static void test_busy_names_the_holder(void)
{
    char dir[512], host[128] = "?", want[1024];
    temp_store(dir, sizeof dir, "busy");
    save_two_entries(dir);
    gethostname(host, sizeof host - 1);
    ms_store *writer, *other;
    CHECK_OK(ms_store_open(&writer, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_open(&other, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_lock(writer));
    snprintf(want, sizeof want, "%s is being written by another job (pid %d on host %s holds writer.lock)",
             dir, (int)getpid(), host);
    CHECK_FAILS(ms_store_delete(other, 1), EBUSY, want);
    CHECK(strcmp(ms_last_error(), want) == 0);
    CHECK_OK(ms_store_begin(writer, 7, 0, MS_STORE_FOREGROUND));
    snprintf(want, sizeof want,
             "%s is being written by another job (pid %d on host %s, step 7 holds writer.lock)", dir,
             (int)getpid(), host);
    CHECK_FAILS(ms_store_keep_last(other, 1), EBUSY, want);
    CHECK(strcmp(ms_last_error(), want) == 0);
    CHECK_FAILS(ms_store_lock(other), EBUSY, want);
    ms_store_close(writer);
    CHECK_OK(ms_store_delete(other, 1));
    ms_store_close(other);
}

int main(void)
{
    test_corruption();
    test_missing();
    test_mismatches();
    test_not_a_store();
    test_newer_version();
    test_bad_calls();
    test_busy_names_the_holder();
    remove_temp_root();
    return test_report("test_store_errors");
}
