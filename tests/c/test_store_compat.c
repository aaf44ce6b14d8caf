/* moonshard store tests: a step written by store format version 1 (chunk data at the very
 * start of its LMDB value, no 48-byte lead) still loads and verifies, and a version-2 step
 * saved into the same store loads beside it. The version-1 store is made from a version-2
 * one by rewriting its records with plain LMDB calls and xxHash, as a version-1 build
 * would have written them. */
#include <xxhash.h>

#include "test_store_util.h"

enum { LEAD_BYTES = 48, MAX_CHUNKS = 64, TRAILER = 8 };
static const int64_t BIG_SHAPE[2] = {300, 1000}; /* 1.2 MB: a value in overflow pages */
static const int64_t SMALL_SHAPE[1] = {5};       /* a value inside a leaf page */

static void open_raw(const char *path, MDB_env **env, MDB_txn **txn, const char *db, MDB_dbi *dbi)
{
    mdb_env_create(env);
    mdb_env_set_maxdbs(*env, 2);
    CHECK(mdb_env_open(*env, path, MDB_NOSUBDIR | MDB_WRITEMAP, 0644) == 0);
    CHECK(mdb_txn_begin(*env, NULL, 0, txn) == 0);
    CHECK(mdb_dbi_open(*txn, db, 0, dbi) == 0);
}

/* A format record as version 1 wrote it: magic, version, file kind, rank. */
static void put_format_record(MDB_txn *txn, uint32_t kind, uint32_t rank)
{
    MDB_dbi meta;
    CHECK(mdb_dbi_open(txn, "meta", 0, &meta) == 0);
    uint8_t record[24] = {'M', 'S', 'H', 'D', 'S', 'T', 'O', 'R', 1};
    for (int i = 0; i < 4; i++) {
        record[12 + i] = (uint8_t)(kind >> (8 * i));
        record[16 + i] = (uint8_t)(rank >> (8 * i));
    }
    MDB_val k = {6, "format"}, v = {sizeof record, record};
    CHECK(mdb_put(txn, meta, &k, &v, 0) == 0);
}

/* Drop the lead bytes of every chunk value of the shard file; returns how many it saw. */
static int strip_chunk_leads(const char *path)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_cursor *cursor;
    MDB_val k, v;
    uint8_t keys[MAX_CHUNKS][12];
    int count = 0;
    open_raw(path, &env, &txn, "chunks", &dbi);
    CHECK(mdb_cursor_open(txn, dbi, &cursor) == 0);
    while (count < MAX_CHUNKS && mdb_cursor_get(cursor, &k, &v, MDB_NEXT) == 0) {
        CHECK(k.mv_size == 12);
        memcpy(keys[count++], k.mv_data, 12);
    }
    mdb_cursor_close(cursor);
    for (int i = 0; i < count; i++) {
        k = (MDB_val){12, keys[i]};
        CHECK(mdb_get(txn, dbi, &k, &v) == 0);
        CHECK(v.mv_size > LEAD_BYTES);
        const uint8_t *lead = v.mv_data;
        for (int b = 0; b < LEAD_BYTES; b++)
            CHECK(lead[b] == 0);
        size_t size = v.mv_size - LEAD_BYTES;
        uint8_t *data = malloc(size);
        memcpy(data, lead + LEAD_BYTES, size);
        MDB_val stripped = {size, data};
        CHECK(mdb_put(txn, dbi, &k, &stripped, 0) == 0);
        free(data);
    }
    put_format_record(txn, 1, 0);
    CHECK(mdb_txn_commit(txn) == 0);
    mdb_env_close(env);
    return count;
}

/* Stamp step's manifest with version 1 and recompute its trailer (XXH3-64, little endian). */
static void mark_manifest_version_1(const char *path, int64_t step)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_val v;
    open_raw(path, &env, &txn, "manifests", &dbi);
    uint8_t key[8] = {0};
    key[7] = (uint8_t)step;
    MDB_val k = {8, key};
    CHECK(mdb_get(txn, dbi, &k, &v) == 0);
    uint8_t *copy = malloc(v.mv_size);
    memcpy(copy, v.mv_data, v.mv_size);
    CHECK(copy[8] == 2 && copy[9] == 0);
    copy[8] = 1;
    uint64_t trailer = XXH3_64bits(copy, v.mv_size - TRAILER);
    for (int i = 0; i < TRAILER; i++)
        copy[v.mv_size - TRAILER + i] = (uint8_t)(trailer >> (8 * i));
    MDB_val rewritten = {v.mv_size, copy};
    CHECK(mdb_put(txn, dbi, &k, &rewritten, 0) == 0);
    put_format_record(txn, 0, 0xffffffffu);
    CHECK(mdb_txn_commit(txn) == 0);
    mdb_env_close(env);
    free(copy);
}

static void save_step(const char *dir, int64_t step, uint64_t seed)
{
    ms_store *s;
    int64_t zeros[2] = {0, 0};
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, step, 0, MS_STORE_FOREGROUND));
    ms_tensor *big = new_tensor(MS_F32, 2, BIG_SHAPE), *small = new_tensor(MS_I64, 1, SMALL_SHAPE);
    fill_region(big, BIG_SHAPE, zeros, seed);
    fill_region(small, SMALL_SHAPE, zeros, seed + 1);
    CHECK_OK(ms_store_put_tensor(s, "model.big", big, BIG_SHAPE, zeros));
    CHECK_OK(ms_store_put_tensor(s, "model.small", small, SMALL_SHAPE, zeros));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    ms_tensor_free(big);
    ms_tensor_free(small);
    ms_store_close(s);
}

static void check_step(const char *dir, int64_t step, uint64_t seed)
{
    ms_store *s;
    int64_t zeros[2] = {0, 0};
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    CHECK_OK(ms_store_verify_entry(s, step, "model.big"));
    ms_tensor *big = read_full(s, step, "model.big"), *small = read_full(s, step, "model.small");
    CHECK(big && region_mismatches(big, BIG_SHAPE, zeros, seed) == 0);
    CHECK(small && region_mismatches(small, SMALL_SHAPE, zeros, seed + 1) == 0);
    /* A window inside the big chunk goes through the map, not pread. */
    int64_t window_shape[2] = {7, 9}, window_offsets[2] = {100, 500};
    ms_tensor *window = new_tensor(MS_F32, 2, window_shape);
    CHECK_OK(ms_store_read_tensor(s, step, "model.big", window, window_offsets));
    CHECK(region_mismatches(window, BIG_SHAPE, window_offsets, seed) == 0);
    ms_tensor_free(window);
    ms_tensor_free(big);
    ms_tensor_free(small);
    ms_store_close(s);
}

static void test_version_1_step_loads(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "version1");
    save_step(dir, 1, 41);
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    CHECK(strip_chunk_leads(path) == 2);
    snprintf(path, sizeof path, "%s/index.mdb", dir);
    mark_manifest_version_1(path, 1);
    check_step(dir, 1, 41);
    save_step(dir, 2, 51);
    check_step(dir, 2, 51);
    check_step(dir, 1, 41);
}

int main(void)
{
    test_version_1_step_loads();
    remove_temp_root();
    return test_report("test_store_compat");
}
