/* moonshard store tests: single-rank round trips - every dtype, strided sources and
 * destinations, scalars, empty tensors, bytes values, inspection, chunks split in pieces,
 * map growth, many small chunks, background saves and steps listing. */
#include "test_store_util.h"

typedef struct put_spec {
    const char *fqn;
    int dtype;
    int ndim;
    int64_t shape[MS_MAX_DIMS];
    uint64_t seed;
} put_spec;

static int put_full(ms_store *s, const put_spec *spec)
{
    ms_tensor *t = new_tensor(spec->dtype, spec->ndim, spec->shape);
    int64_t zeros[MS_MAX_DIMS] = {0};
    fill_region(t, spec->shape, zeros, spec->seed);
    int status = ms_store_put_tensor(s, spec->fqn, t, spec->shape, zeros);
    ms_tensor_free(t);
    return status;
}

static void check_full(ms_store *s, int64_t step, const put_spec *spec)
{
    ms_tensor *t = read_full(s, step, spec->fqn);
    CHECK(t != NULL);
    if (!t) {
        fprintf(stderr, "  %s: %s\n", spec->fqn, ms_last_error());
        return;
    }
    int64_t zeros[MS_MAX_DIMS] = {0};
    CHECK(t->dtype == spec->dtype && t->ndim == spec->ndim);
    CHECK(region_mismatches(t, spec->shape, zeros, spec->seed) == 0);
    ms_tensor_free(t);
}

static void test_every_dtype(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "dtypes");
    put_spec specs[MS_DTYPE_COUNT + 3];
    int count = 0;
    for (int dtype = 0; dtype < MS_DTYPE_COUNT; dtype++) {
        static char names[MS_DTYPE_COUNT][32];
        snprintf(names[dtype], sizeof names[dtype], "model.%s.weight", ms_dtype_name(dtype));
        specs[count++] = (put_spec){names[dtype], dtype, 2, {37, 11}, 100 + (uint64_t)dtype};
    }
    specs[count++] = (put_spec){"optim.step", MS_I64, 0, {0}, 7};
    specs[count++] = (put_spec){"model.empty", MS_F32, 2, {0, 5}, 8};
    specs[count++] = (put_spec){"model.cube", MS_BF16, 4, {3, 4, 5, 6}, 9};

    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 100, 0, MS_STORE_FOREGROUND));
    for (int i = 0; i < count; i++)
        CHECK_OK(put_full(s, &specs[i]));
    const char blob[] = "{lr = 0.1, epoch = 3}";
    CHECK_OK(ms_store_put_bytes(s, "extra.hparams", blob, sizeof blob));
    CHECK_OK(ms_store_put_bytes(s, "extra.nothing", NULL, 0));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    ms_store_close(s);

    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    for (int i = 0; i < count; i++)
        check_full(s, 100, &specs[i]);

    int64_t entries = 0;
    CHECK_OK(ms_store_entry_count(s, 100, &entries));
    CHECK(entries == count + 2);
    const char *previous = "";
    for (int64_t i = 0; i < entries; i++) {
        ms_store_entry e;
        CHECK_OK(ms_store_entry_at(s, 100, i, &e));
        CHECK(strcmp(previous, e.fqn) < 0);
        previous = e.fqn;
    }
    ms_store_entry e;
    CHECK_OK(ms_store_entry_find(s, 100, "extra.hparams", &e));
    CHECK(e.kind == MS_STORE_BYTES && e.nbytes == sizeof blob &&
          !memcmp(e.bytes, blob, sizeof blob));
    CHECK_OK(ms_store_entry_find(s, 100, "extra.nothing", &e));
    CHECK(e.kind == MS_STORE_BYTES && e.nbytes == 0);
    CHECK_OK(ms_store_entry_find(s, 100, "model.f32.weight", &e));
    CHECK(e.kind == MS_STORE_TENSOR && e.dtype == MS_F32 && e.ndim == 2 && e.shape[0] == 37 &&
          e.shape[1] == 11 && e.chunk_count == 1 && e.nbytes == 37 * 11 * 4);
    CHECK_OK(ms_store_entry_find(s, 100, "model.empty", &e));
    CHECK(e.chunk_count == 0 && e.nbytes == 0);
    ms_store_chunk chunk;
    CHECK_OK(ms_store_chunk_at(s, 100, "model.f32.weight", 0, &chunk));
    CHECK(chunk.rank == 0 && chunk.ndim == 2 && chunk.sizes[0] == 37 &&
          chunk.nbytes == 37 * 11 * 4);
    CHECK_FAILS(ms_store_chunk_at(s, 100, "model.f32.weight", 1, &chunk), MS_ERR_INDEX, "1 chunks");
    CHECK_FAILS(ms_store_entry_at(s, 100, entries, &e), MS_ERR_INDEX, "entries");
    for (int64_t i = 0; i < entries; i++) {
        CHECK_OK(ms_store_entry_at(s, 100, i, &e));
        CHECK_OK(ms_store_verify_entry(s, 100, e.fqn));
    }
    ms_store_close(s);
}

/* Transposed and sliced sources and destinations. */
static void test_strided(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "strided");
    int64_t gshape[2] = {6, 10};
    ms_tensor *base = new_tensor(MS_F64, 2, (int64_t[]){10, 6});
    int64_t transposed_strides[2] = {1, 6};
    ms_tensor *transposed;
    CHECK_OK(ms_tensor_view(&transposed, base, 2, gshape, transposed_strides, 0));
    int64_t zeros[2] = {0, 0};
    fill_region(transposed, gshape, zeros, 31);

    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    CHECK_OK(ms_store_put_tensor(s, "w", transposed, gshape, zeros));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));

    /* Every second column of rows 1..4, into a strided view of a larger buffer. */
    ms_tensor *big = new_tensor(MS_F64, 2, (int64_t[]){8, 12});
    memset(ms_tensor_data(big), 0, ms_tensor_nbytes(big));
    ms_tensor *window;
    int64_t window_shape[2] = {4, 5}, window_strides[2] = {12, 2};
    CHECK_OK(ms_tensor_view(&window, big, 2, window_shape, window_strides, 13));
    int64_t offsets[2] = {1, 5};
    CHECK_OK(ms_store_read_tensor(s, 1, "w", window, offsets));
    CHECK(region_mismatches(window, gshape, offsets, 31) == 0);
    double *raw = ms_tensor_data(big);
    CHECK(raw[0] == 0 && raw[14] == 0); /* untouched gaps */

    ms_tensor *column;
    int64_t column_shape[2] = {6, 1}, column_strides[2] = {6, 1};
    CHECK_OK(ms_tensor_view(&column, base, 2, column_shape, column_strides, 0));
    memset(ms_tensor_data(base), 0, ms_tensor_nbytes(base));
    int64_t column_offsets[2] = {0, 9};
    CHECK_OK(ms_store_read_tensor(s, 1, "w", column, column_offsets));
    CHECK(region_mismatches(column, gshape, column_offsets, 31) == 0);

    /* A large transposed chunk (written with pwrite through a bounce buffer). */
    int64_t large_shape[2] = {700, 1100}, large_strides[2] = {1, 700};
    ms_tensor *large_base = new_tensor(MS_F32, 2, (int64_t[]){1100, 700}), *large;
    CHECK_OK(ms_tensor_view(&large, large_base, 2, large_shape, large_strides, 0));
    fill_region(large, large_shape, zeros, 32);
    CHECK_OK(ms_store_begin(s, 2, 0, MS_STORE_FOREGROUND));
    CHECK_OK(ms_store_put_tensor(s, "large", large, large_shape, zeros));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    ms_tensor *large_back = read_full(s, 2, "large");
    CHECK(large_back && region_mismatches(large_back, large_shape, zeros, 32) == 0);

    ms_tensor_free(large_back);
    ms_tensor_free(large);
    ms_tensor_free(large_base);
    ms_tensor_free(column);
    ms_tensor_free(window);
    ms_tensor_free(big);
    ms_tensor_free(transposed);
    ms_tensor_free(base);
    ms_store_close(s);
}

/* Puts larger than the chunk limit are split into pieces along their outermost dims; reads
 * of any window cross the pieces' boundaries. */
static void test_split_chunks(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "split");
    int64_t gshape[2] = {50, 33};
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_FAILS(ms_store_set_max_chunk_bytes(s, 10), MS_ERR_INVALID, "outside [64, 2^31]");
    CHECK_OK(ms_store_set_max_chunk_bytes(s, 64));
    CHECK_OK(ms_store_begin(s, 5, 0, MS_STORE_FOREGROUND));
    for (int dtype = 0; dtype < MS_DTYPE_COUNT; dtype++) {
        char name[32];
        snprintf(name, sizeof name, "split.%s", ms_dtype_name(dtype));
        put_spec spec = {name, dtype, 2, {50, 33}, 40 + (uint64_t)dtype};
        CHECK_OK(put_full(s, &spec));
    }
    put_spec cube = {"split.cube", MS_F32, 3, {3, 4, 5}, 60};
    CHECK_OK(put_full(s, &cube));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    ms_store_entry e;
    CHECK_OK(ms_store_entry_find(s, 5, "split.u8", &e));
    CHECK(e.chunk_count == 50); /* a 33-byte row fits: one row per piece */
    CHECK_OK(ms_store_entry_find(s, 5, "split.f32", &e));
    CHECK(e.chunk_count == 150); /* 132-byte rows: 16 elements per piece, 3 per row */
    CHECK_OK(ms_store_entry_find(s, 5, "split.cube", &e));
    CHECK(e.chunk_count == 6); /* 20-byte rows, 3 of them per piece, 2 pieces per slab */
    check_full(s, 5, &cube);
    for (int dtype = 0; dtype < MS_DTYPE_COUNT; dtype++) {
        char name[32];
        snprintf(name, sizeof name, "split.%s", ms_dtype_name(dtype));
        put_spec spec = {name, dtype, 2, {50, 33}, 40 + (uint64_t)dtype};
        check_full(s, 5, &spec);
        int64_t offsets[2] = {7, 3};
        ms_tensor *window = new_tensor(dtype, 2, (int64_t[]){31, 29});
        CHECK_OK(ms_store_read_tensor(s, 5, name, window, offsets));
        CHECK(region_mismatches(window, gshape, offsets, 40 + (uint64_t)dtype) == 0);
        ms_tensor_free(window);
        CHECK_OK(ms_store_verify_entry(s, 5, name));
    }
    ms_store_close(s);
}

/* Reads of chunks that are not in the page cache: whole chunks into contiguous destinations
 * (read with pread) and windows across them (read through the map, with read-ahead). */
static void test_cold_reads(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "cold");
    put_spec spec = {"w", MS_F32, 2, {3000, 1000}, 21};
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    CHECK_OK(put_full(s, &spec));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    ms_store_close(s);
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    evict_file(path);
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    check_full(s, 1, &spec);
    ms_store_close(s);
    evict_file(path);
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    int64_t offsets[2] = {1000, 7};
    ms_tensor *window = new_tensor(MS_F32, 2, (int64_t[]){1500, 900});
    CHECK_OK(ms_store_read_tensor(s, 1, "w", window, offsets));
    CHECK(region_mismatches(window, spec.shape, offsets, 21) == 0);
    ms_tensor_free(window);
    ms_store_close(s);
}

/* More data than the initial map, and more chunks than one transaction may dirty. */
static void test_growth_and_many_chunks(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "growth");
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_FOREGROUND));
    put_spec big = {"big", MS_F32, 2, {5000, 5000}, 77};
    CHECK_OK(put_full(s, &big));
    enum { SMALL = 70000 };
    int64_t one[1] = {SMALL}, offset[1];
    ms_tensor *element = new_tensor(MS_I32, 1, (int64_t[]){1});
    for (int64_t i = 0; i < SMALL; i++) {
        offset[0] = i;
        fill_region(element, one, offset, 5);
        CHECK_OK(ms_store_put_tensor(s, "many", element, one, offset));
    }
    ms_tensor_free(element);
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    check_full(s, 1, &big);
    ms_tensor *many = read_full(s, 1, "many");
    int64_t zero[1] = {0};
    CHECK(many && region_mismatches(many, one, zero, 5) == 0);
    ms_store_entry e;
    CHECK_OK(ms_store_entry_find(s, 1, "many", &e));
    CHECK(e.chunk_count == SMALL);
    ms_tensor_free(many);
    ms_store_close(s);
}

static void test_background_and_steps(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "background");
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    int64_t steps[4] = {30, 10, 20, 40};
    for (int i = 0; i < 4; i++) {
        CHECK_OK(ms_store_begin(s, steps[i], 0, MS_STORE_BACKGROUND));
        put_spec spec = {"w", MS_F32, 2, {300, 200}, (uint64_t)steps[i]};
        CHECK_OK(put_full(s, &spec)); /* the tensor is freed at once: the store keeps it */
        CHECK_OK(ms_store_put_bytes(s, "step", &steps[i], sizeof steps[i]));
        CHECK_OK(ms_store_commit_data(s));
        int64_t count;
        CHECK_FAILS(ms_store_steps(s, NULL, 0, &count), MS_ERR_STATE, "in flight");
        CHECK_OK(ms_store_wait(s));
        CHECK_OK(ms_store_commit_manifest(s, 1));
        CHECK_OK(ms_store_wait(s));
    }
    int64_t listed[8], count = 0, latest = -1;
    CHECK_OK(ms_store_steps(s, NULL, 0, &count));
    CHECK(count == 4);
    CHECK_OK(ms_store_steps(s, listed, 2, &count));
    CHECK(count == 4 && listed[0] == 10 && listed[1] == 20);
    CHECK_OK(ms_store_steps(s, listed, 8, &count));
    CHECK(listed[2] == 30 && listed[3] == 40);
    CHECK_OK(ms_store_latest_step(s, &latest));
    CHECK(latest == 40);
    for (int i = 0; i < 4; i++) {
        put_spec spec = {"w", MS_F32, 2, {300, 200}, (uint64_t)steps[i]};
        check_full(s, steps[i], &spec);
    }
    CHECK_FAILS(ms_store_begin(s, 20, 0, MS_STORE_FOREGROUND), MS_ERR_STATE, "already committed");

    /* A background save abandoned in flight stays invisible. */
    CHECK_OK(ms_store_begin(s, 50, 0, MS_STORE_BACKGROUND));
    put_spec spec = {"w", MS_F32, 2, {300, 200}, 50};
    CHECK_OK(put_full(s, &spec));
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_abort(s));
    CHECK_OK(ms_store_latest_step(s, &latest));
    CHECK(latest == 40);
    ms_store_close(s);

    char empty[512];
    temp_store(empty, sizeof empty, "no-steps");
    CHECK_OK(ms_store_open(&s, empty, MS_STORE_READ_WRITE));
    CHECK_FAILS(ms_store_latest_step(s, &latest), MS_ERR_NOT_FOUND, "no committed step");
    CHECK_FAILS(ms_store_entry_count(s, 3, &count), MS_ERR_NOT_FOUND, "step 3 is not committed");
    ms_store_close(s);
}

int main(void)
{
    test_every_dtype();
    test_strided();
    test_split_chunks();
    test_cold_reads();
    test_growth_and_many_chunks();
    test_background_and_steps();
    remove_temp_root();
    return test_report("test_store_roundtrip");
}
