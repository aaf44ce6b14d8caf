/* moonshard store tests: saves by several forked ranks loaded on other layouts - 4 row
 * shards as 3 uneven shards and as 1 full tensor, 2-D chunks as slabs and windows,
 * replicated chunks written once, and what the manifest refuses to commit. */
#include "test_store_util.h"

enum { WORLD = 4 };

/* FSDP's dim-0 sharding: rank r holds rows [r*c, min((r+1)*c, n)), c = ceil(n / parts). */
static void row_shard(int64_t rows, int parts, int rank, int64_t *first, int64_t *count)
{
    int64_t c = (rows + parts - 1) / parts;
    *first = rank * c < rows ? rank * c : rows;
    int64_t end = (rank + 1) * c < rows ? (rank + 1) * c : rows;
    *count = end - *first;
}

static int put_region(ms_store *s, const char *fqn, int dtype, int ndim, const int64_t *gshape,
                      const int64_t *offsets, const int64_t *shape, uint64_t seed)
{
    ms_tensor *t = new_tensor(dtype, ndim, shape);
    fill_region(t, gshape, offsets, seed);
    int status = ms_store_put_tensor(s, fqn, t, gshape, offsets);
    ms_tensor_free(t);
    return status;
}

typedef struct entry_spec {
    const char *fqn;
    int dtype;
    int ndim;
    int64_t shape[3];
    uint64_t seed;
} entry_spec;

static const entry_spec ROW_ENTRIES[] = {
    {"model.w", MS_F32, 2, {10, 7}, 1},
    {"model.b", MS_I64, 1, {13}, 2},
    {"model.c", MS_BF16, 3, {5, 3, 4}, 3},
    {"model.tiny", MS_U8, 1, {2}, 4},
};
enum { ROW_ENTRY_COUNT = sizeof ROW_ENTRIES / sizeof ROW_ENTRIES[0] };

static int put_row_shards(ms_store *s, int rank, int world_size, void *arg)
{
    (void)arg;
    for (int i = 0; i < ROW_ENTRY_COUNT; i++) {
        const entry_spec *e = &ROW_ENTRIES[i];
        int64_t offsets[3] = {0}, shape[3];
        memcpy(shape, e->shape, sizeof shape);
        row_shard(e->shape[0], world_size, rank, &offsets[0], &shape[0]);
        int status = put_region(s, e->fqn, e->dtype, e->ndim, e->shape, offsets, shape, e->seed);
        if (status)
            return status;
    }
    int64_t step = 100;
    return rank == 0 ? ms_store_put_bytes(s, "step", &step, sizeof step) : MS_OK;
}

static void check_row_loads(ms_store *s, int64_t step)
{
    for (int i = 0; i < ROW_ENTRY_COUNT; i++) {
        const entry_spec *e = &ROW_ENTRIES[i];
        ms_store_entry info;
        CHECK_OK(ms_store_entry_find(s, step, e->fqn, &info));
        int64_t nonempty = e->shape[0] < WORLD ? e->shape[0] : WORLD;
        if (e->shape[0] == 5)
            nonempty = 3;
        CHECK(info.chunk_count == nonempty);
        for (int parts = 1; parts <= 3; parts++)
            for (int r = 0; r < parts; r++) {
                int64_t offsets[3] = {0}, shape[3];
                memcpy(shape, e->shape, sizeof shape);
                row_shard(e->shape[0], parts, r, &offsets[0], &shape[0]);
                ms_tensor *t = new_tensor(e->dtype, e->ndim, shape);
                CHECK_OK(ms_store_read_tensor(s, step, e->fqn, t, offsets));
                CHECK(region_mismatches(t, e->shape, offsets, e->seed) == 0);
                ms_tensor_free(t);
            }
    }
}

static void test_rows_4_to_3_to_1(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "rows");
    CHECK_OK(save_ranks(dir, 100, WORLD, put_row_shards, NULL));
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    check_row_loads(s, 100);
    ms_store_entry info;
    CHECK_OK(ms_store_entry_find(s, 100, "step", &info));
    CHECK(info.kind == MS_STORE_BYTES && *(const int64_t *)info.bytes == 100);
    ms_store_close(s);

    /* Three reader processes at once, each loading its own 3-way shard. */
    pid_t readers[3];
    for (int r = 0; r < 3; r++) {
        readers[r] = fork();
        if (readers[r] == 0) {
            ms_store *mine;
            if (ms_store_open(&mine, dir, MS_STORE_READ_ONLY))
                _exit(1);
            const entry_spec *e = &ROW_ENTRIES[0];
            int64_t offsets[2] = {0, 0}, shape[2] = {0, e->shape[1]};
            row_shard(e->shape[0], 3, r, &offsets[0], &shape[0]);
            ms_tensor *t = new_tensor(e->dtype, 2, shape);
            int ok = ms_store_read_tensor(mine, 100, e->fqn, t, offsets) == MS_OK &&
                     region_mismatches(t, e->shape, offsets, e->seed) == 0;
            ms_store_close(mine);
            _exit(ok ? 0 : 1);
        }
    }
    for (int r = 0; r < 3; r++) {
        int status = 0;
        waitpid(readers[r], &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
}

/* ---- a 2x2 grid of 2-D chunks ---- */

static const int64_t GRID_SHAPE[2] = {8, 12};

static int put_grid(ms_store *s, int rank, int world_size, void *arg)
{
    (void)world_size, (void)arg;
    int64_t offsets[2] = {(rank / 2) * 4, (rank % 2) * 6}, shape[2] = {4, 6};
    return put_region(s, "grid", MS_F16, 2, GRID_SHAPE, offsets, shape, 9);
}

static void read_window(ms_store *s, int64_t r0, int64_t c0, int64_t rows, int64_t cols,
                        bool transposed)
{
    int64_t offsets[2] = {r0, c0}, shape[2] = {rows, cols};
    ms_tensor *t;
    ms_tensor *base = NULL;
    if (transposed) {
        base = new_tensor(MS_F16, 2, (int64_t[]){cols, rows});
        CHECK_OK(ms_tensor_view(&t, base, 2, shape, (int64_t[]){1, rows}, 0));
    } else {
        t = new_tensor(MS_F16, 2, shape);
    }
    CHECK_OK(ms_store_read_tensor(s, 7, "grid", t, offsets));
    CHECK(region_mismatches(t, GRID_SHAPE, offsets, 9) == 0);
    ms_tensor_free(t);
    ms_tensor_free(base);
}

static void test_grid(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "grid");
    CHECK_OK(save_ranks(dir, 7, WORLD, put_grid, NULL));
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    read_window(s, 0, 0, 8, 12, false);
    for (int r = 0; r < 3; r++) {
        int64_t first, count;
        row_shard(8, 3, r, &first, &count);
        read_window(s, first, 0, count, 12, false);
        row_shard(12, 5, r, &first, &count);
        read_window(s, 0, first, 8, count, true);
    }
    read_window(s, 1, 2, 6, 9, true);
    read_window(s, 3, 5, 2, 2, false);
    read_window(s, 4, 6, 1, 1, false);
    ms_store_close(s);
}

/* ---- replicated chunks on a (replicate 2, shard 2) mesh ---- */

typedef enum {
    REPLICA_ZERO_WRITES,
    EVERY_REPLICA_WRITES,
    REPLICAS_DIFFER,
    PARTIAL_OVERLAP,
    GAP,
    DTYPES_DIFFER
} replica_layout;

static int put_hsdp(ms_store *s, int rank, int world_size, void *arg)
{
    (void)world_size;
    replica_layout layout = *(const replica_layout *)arg;
    int replica = rank / 2, shard = rank % 2;
    int64_t gshape[2] = {6, 4}, offsets[2] = {shard * 3, 0}, shape[2] = {3, 4};
    bool writes = replica == 0 || layout != REPLICA_ZERO_WRITES;
    uint64_t seed = layout == REPLICAS_DIFFER && replica == 1 ? 99 : 5;
    if (layout == PARTIAL_OVERLAP && rank == 3)
        offsets[0] = 2;
    if (layout == GAP && shard == 1) {
        offsets[0] = 4;
        shape[0] = 2;
    }
    int dtype = layout == DTYPES_DIFFER && rank == 1 ? MS_F64 : MS_F32;
    if (writes) {
        int status = put_region(s, "hsdp.w", dtype, 2, gshape, offsets, shape, seed);
        if (status)
            return status;
    }
    int64_t bias_shape[1] = {4}, zero[1] = {0};
    if (rank == 0 || layout == EVERY_REPLICA_WRITES)
        return put_region(s, "hsdp.bias", MS_F32, 1, bias_shape, zero, bias_shape, 6);
    return MS_OK;
}

static void test_replicated(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "hsdp");
    replica_layout layout = REPLICA_ZERO_WRITES;
    CHECK_OK(save_ranks(dir, 1, WORLD, put_hsdp, &layout));
    layout = EVERY_REPLICA_WRITES;
    CHECK_OK(save_ranks(dir, 2, WORLD, put_hsdp, &layout));
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    for (int64_t step = 1; step <= 2; step++) {
        ms_store_entry info;
        CHECK_OK(ms_store_entry_find(s, step, "hsdp.w", &info));
        CHECK(info.chunk_count == 2);
        for (int c = 0; c < info.chunk_count; c++) {
            ms_store_chunk chunk;
            CHECK_OK(ms_store_chunk_at(s, step, "hsdp.w", c, &chunk));
            CHECK(chunk.rank == c); /* the lowest replica's copy is the one named */
        }
        CHECK_OK(ms_store_entry_find(s, step, "hsdp.bias", &info));
        CHECK(info.chunk_count == 1);
        ms_tensor *w = read_full(s, step, "hsdp.w");
        int64_t zeros[2] = {0, 0}, gshape[2] = {6, 4};
        CHECK(w && region_mismatches(w, gshape, zeros, 5) == 0);
        ms_tensor_free(w);
        /* HSDP (2x2) to FSDP on 4 ranks. */
        for (int r = 0; r < 4; r++) {
            int64_t offsets[2] = {0, 0}, shape[2] = {0, 4};
            row_shard(6, 4, r, &offsets[0], &shape[0]);
            ms_tensor *t = new_tensor(MS_F32, 2, shape);
            CHECK_OK(ms_store_read_tensor(s, step, "hsdp.w", t, offsets));
            CHECK(region_mismatches(t, gshape, offsets, 5) == 0);
            ms_tensor_free(t);
        }
    }
    ms_store_close(s);

    layout = REPLICAS_DIFFER;
    CHECK(save_ranks(dir, 3, WORLD, put_hsdp, &layout) == MS_ERR_MISMATCH);
    CHECK(
        strstr(ms_last_error(), "'hsdp.w': replicas of [0:3, 0:4] saved by ranks 0 and 2 differ"));
    layout = PARTIAL_OVERLAP;
    CHECK(save_ranks(dir, 4, WORLD, put_hsdp, &layout) == MS_ERR_MISMATCH);
    CHECK(strstr(ms_last_error(), "overlap"));
    layout = GAP;
    CHECK(save_ranks(dir, 5, WORLD, put_hsdp, &layout) == MS_ERR_SHAPE);
    CHECK(strstr(ms_last_error(), "cover 20 of the 24 elements"));
    layout = DTYPES_DIFFER;
    CHECK(save_ranks(dir, 6, WORLD, put_hsdp, &layout) == MS_ERR_MISMATCH);
    CHECK(strstr(ms_last_error(),
                 "'hsdp.w': rank 1 saved it as f64 [6, 4], another rank as f32 [6, 4]"));
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    int64_t count;
    CHECK_OK(ms_store_steps(s, NULL, 0, &count));
    CHECK(count == 2);
    ms_store_close(s);
}

/* What commit_manifest and merge_chunk_table refuse. */
static void test_manifest_refusals(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "refusals");
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    int64_t gshape[1] = {4}, zero[1] = {0}, two[1] = {2}, half[1] = {2};
    CHECK_OK(put_region(s, "v", MS_F32, 1, gshape, zero, half, 3));
    CHECK_FAILS(ms_store_chunk_table(s, &(const void *){0}, &(int64_t){0}), MS_ERR_STATE,
                "has not committed");
    CHECK_OK(ms_store_commit_data(s));
    CHECK_FAILS(ms_store_commit_manifest(s, 2), MS_ERR_STATE, "1 of 2 ranks are missing (rank 1");

    /* Rank 1's table for another step, then the right one twice. */
    pid_t child = fork();
    if (child == 0) {
        ms_store *mine;
        const void *table;
        int64_t size;
        int ok = ms_store_open(&mine, dir, MS_STORE_READ_WRITE) == MS_OK &&
                 ms_store_begin(mine, 2, 1, MS_STORE_FOREGROUND) == MS_OK &&
                 put_region(mine, "v", MS_F32, 1, gshape, two, half, 3) == MS_OK &&
                 ms_store_commit_data(mine) == MS_OK &&
                 ms_store_chunk_table(mine, &table, &size) == MS_OK;
        char path[600];
        snprintf(path, sizeof path, "%s/table-2", dir);
        FILE *f = fopen(path, "wb");
        ok = ok && f && fwrite(table, 1, (size_t)size, f) == (size_t)size;
        if (f)
            fclose(f);
        ok = ok && ms_store_begin(mine, 1, 1, MS_STORE_FOREGROUND) == MS_OK &&
             put_region(mine, "v", MS_F32, 1, gshape, two, half, 3) == MS_OK &&
             ms_store_commit_data(mine) == MS_OK &&
             ms_store_chunk_table(mine, &table, &size) == MS_OK;
        snprintf(path, sizeof path, "%s/table-1", dir);
        f = fopen(path, "wb");
        ok = ok && f && fwrite(table, 1, (size_t)size, f) == (size_t)size;
        if (f)
            fclose(f);
        ms_store_close(mine);
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char path[600], table[4096];
    size_t sizes[3];
    for (int step = 1; step <= 2; step++) {
        snprintf(path, sizeof path, "%s/table-%d", dir, step);
        FILE *f = fopen(path, "rb");
        sizes[step] = f ? fread(table + 2048 * (step - 1), 1, 2048, f) : 0;
        if (f)
            fclose(f);
    }
    CHECK_FAILS(ms_store_merge_chunk_table(s, table + 2048, (int64_t)sizes[2]), MS_ERR_MISMATCH,
                "is for step 2, this save is step 1");
    CHECK_FAILS(ms_store_merge_chunk_table(s, table, 10), MS_ERR_CORRUPT, "too short");
    table[20] ^= 1;
    CHECK_FAILS(ms_store_merge_chunk_table(s, table, (int64_t)sizes[1]), MS_ERR_CORRUPT,
                "failed its checksum");
    table[20] ^= 1;
    CHECK_OK(ms_store_merge_chunk_table(s, table, (int64_t)sizes[1]));
    CHECK_FAILS(ms_store_merge_chunk_table(s, table, (int64_t)sizes[1]), MS_ERR_MISMATCH,
                "merged already");
    CHECK_FAILS(ms_store_commit_manifest(s, 1), MS_ERR_MISMATCH, "world size is 1");
    CHECK_OK(ms_store_commit_manifest(s, 2));
    ms_tensor *v = read_full(s, 1, "v");
    CHECK(v && region_mismatches(v, gshape, zero, 3) == 0);
    ms_tensor_free(v);

    /* Puts that disagree with earlier ones on the same rank. */
    CHECK_OK(ms_store_begin(s, 3, 0, MS_STORE_FOREGROUND));
    CHECK_OK(put_region(s, "v", MS_F32, 1, gshape, zero, half, 3));
    CHECK_FAILS(put_region(s, "v", MS_F64, 1, gshape, two, half, 3), MS_ERR_DTYPE,
                "'v' was put as f32 [4], now as f64 [4]");
    CHECK_FAILS(put_region(s, "v", MS_F32, 1, (int64_t[]){5}, two, half, 3), MS_ERR_SHAPE,
                "now as f32 [5]");
    CHECK_FAILS(put_region(s, "v", MS_F32, 1, gshape, (int64_t[]){3}, half, 3), MS_ERR_SHAPE,
                "chunk [3:5] lies outside the global shape [4]");
    CHECK_FAILS(ms_store_put_bytes(s, "v", "x", 1), MS_ERR_INVALID, "was put already");
    CHECK_OK(ms_store_commit_data(s));
    ms_store_close(s);
}

int main(void)
{
    test_rows_4_to_3_to_1();
    test_grid();
    test_replicated();
    test_manifest_refusals();
    remove_temp_root();
    return test_report("test_store_reshard");
}
