/* moonshard store tests: retention (keep_last, delete) removes manifests and chunks and
 * lets later saves reuse the space; readers keep working while another process grows the
 * files, and while a background save of the same process writes. */
#include <signal.h>

#include "test_store_util.h"

enum { WORLD = 2 };
static const int64_t GSHAPE[2] = {512, 512};

static int put_rows(ms_store *s, int rank, int world_size, void *arg)
{
    uint64_t seed = *(const uint64_t *)arg;
    int64_t rows = GSHAPE[0] / world_size;
    int64_t offsets[2] = {rank * rows, 0}, shape[2] = {rows, GSHAPE[1]};
    ms_tensor *t = new_tensor(MS_F32, 2, shape);
    fill_region(t, GSHAPE, offsets, seed);
    int status = ms_store_put_tensor(s, "w", t, GSHAPE, offsets);
    ms_tensor_free(t);
    return status;
}

static void check_steps(ms_store *s, const int64_t *expected, int64_t count)
{
    int64_t steps[16], n = -1;
    CHECK_OK(ms_store_steps(s, steps, 16, &n));
    CHECK(n == count);
    for (int64_t i = 0; i < n && i < count; i++)
        CHECK(steps[i] == expected[i]);
}

static void test_keep_last_and_delete(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "retention");
    for (uint64_t step = 1; step <= 5; step++)
        CHECK_OK(save_ranks(dir, (int64_t)step, WORLD, put_rows, &step));
    CHECK(foreign_chunk_keys(dir, 0, -1) == 5);

    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_keep_last(s, 2));
    check_steps(s, (int64_t[]){4, 5}, 2);
    CHECK_OK(ms_store_keep_last(s, 3));
    check_steps(s, (int64_t[]){4, 5}, 2);
    ms_store_close(s);
    for (int rank = 0; rank < WORLD; rank++)
        CHECK(foreign_chunk_keys(dir, rank, -1) == 2);

    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_delete(s, 4));
    CHECK_FAILS(ms_store_delete(s, 4), MS_ERR_NOT_FOUND, "step 4 is not committed");
    check_steps(s, (int64_t[]){5}, 1);
    ms_tensor *w = read_full(s, 5, "w");
    int64_t zeros[2] = {0, 0};
    CHECK(w && region_mismatches(w, GSHAPE, zeros, 5) == 0);
    ms_tensor_free(w);
    ms_store_close(s);
    for (int rank = 0; rank < WORLD; rank++)
        CHECK(foreign_chunk_keys(dir, rank, 5) == 0);

    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_keep_last(s, 0));
    check_steps(s, NULL, 0);
    ms_store_close(s);
    for (int rank = 0; rank < WORLD; rank++)
        CHECK(foreign_chunk_keys(dir, rank, -1) == 0);
}

/* A deletion that cannot reach every shard file fails before it removes anything: with
 * rank 1's file damaged, deleting a step leaves every step there. */
static void test_delete_fails_whole(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "delete-whole");
    for (uint64_t step = 1; step <= 2; step++)
        CHECK_OK(save_ranks(dir, (int64_t)step, WORLD, put_rows, &step));
    snprintf(path, sizeof path, "%s/shard-1.mdb", dir);
    int fd = open(path, O_WRONLY);
    char zeros[4096] = {0};
    CHECK(fd >= 0 && pwrite(fd, zeros, sizeof zeros, 0) == (ssize_t)sizeof zeros);
    close(fd);
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_FAILS(ms_store_delete(s, 1), MS_ERR_CORRUPT, "shard-1.mdb");
    CHECK_FAILS(ms_store_keep_last(s, 1), MS_ERR_CORRUPT, "shard-1.mdb");
    check_steps(s, (int64_t[]){1, 2}, 2);
    ms_store_close(s);
}

/* Saving and keeping the last two, many times, reaches a steady file size. */
static void test_space_steady(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "steady");
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    struct stat st;
    blkcnt_t after_warmup = 0;
    for (uint64_t step = 1; step <= 12; step++) {
        CHECK_OK(save_ranks(dir, (int64_t)step, WORLD, put_rows, &step));
        ms_store *s;
        CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
        CHECK_OK(ms_store_keep_last(s, 2));
        ms_store_close(s);
        stat(path, &st);
        if (step == 4)
            after_warmup = st.st_blocks;
    }
    CHECK(st.st_blocks <= after_warmup + after_warmup / 8);
}

/* A reader killed inside a read transaction does not keep the space from being reused. */
static void test_dead_reader(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "dead-reader");
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    uint64_t seed = 1;
    CHECK_OK(save_ranks(dir, 1, WORLD, put_rows, &seed));
    /* Another process keeps the file open throughout, so LMDB never resets its lock table
     * (as the first process to open a file does). */
    int keeper_pipe[2];
    CHECK(pipe(keeper_pipe) == 0);
    pid_t keeper = fork();
    if (keeper == 0) {
        MDB_env *env;
        char byte;
        close(keeper_pipe[1]);
        mdb_env_create(&env);
        mdb_env_set_maxdbs(env, 2);
        if (mdb_env_open(env, path, MDB_NOSUBDIR | MDB_RDONLY | MDB_NOTLS, 0644))
            _exit(1);
        _exit(read(keeper_pipe[0], &byte, 1) < 0);
    }
    close(keeper_pipe[0]);
    usleep(100000);
    pid_t reader = fork();
    if (reader == 0) {
        MDB_env *env;
        MDB_txn *txn;
        mdb_env_create(&env);
        mdb_env_set_maxdbs(env, 2);
        if (mdb_env_open(env, path, MDB_NOSUBDIR | MDB_RDONLY | MDB_NOTLS, 0644) ||
            mdb_txn_begin(env, NULL, MDB_RDONLY, &txn))
            _exit(1);
        kill(getpid(), SIGKILL);
    }
    int status = 0;
    waitpid(reader, &status, 0);
    CHECK(WIFSIGNALED(status));
    struct stat st;
    blkcnt_t after_warmup = 0;
    for (uint64_t step = 2; step <= 9; step++) {
        CHECK_OK(save_ranks(dir, (int64_t)step, WORLD, put_rows, &step));
        ms_store *s;
        CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
        CHECK_OK(ms_store_keep_last(s, 1));
        ms_store_close(s);
        stat(path, &st);
        if (step == 4)
            after_warmup = st.st_blocks;
    }
    CHECK(st.st_blocks <= after_warmup + after_warmup / 8);
    close(keeper_pipe[1]);
    waitpid(keeper, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* A reader opened before another process grows the file follows it. */
static void test_reader_follows_growth(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "growth-reader");
    uint64_t seed = 1;
    CHECK_OK(save_ranks(dir, 1, WORLD, put_rows, &seed));
    ms_store *reader;
    CHECK_OK(ms_store_open(&reader, dir, MS_STORE_READ_ONLY));
    ms_tensor *w = read_full(reader, 1, "w");
    CHECK(w != NULL);
    ms_tensor_free(w);

    pid_t writer = fork();
    if (writer == 0) {
        ms_store *s;
        int64_t big[2] = {10000, 1000}, zeros[2] = {0, 0};
        ms_tensor *t = new_tensor(MS_I64, 2, big);
        fill_region(t, big, zeros, 8);
        int ok = ms_store_open(&s, dir, MS_STORE_READ_WRITE) == MS_OK &&
                 ms_store_begin(s, 2, 0, MS_STORE_FOREGROUND) == MS_OK &&
                 ms_store_put_tensor(s, "big", t, big, zeros) == MS_OK &&
                 ms_store_commit_data(s) == MS_OK && ms_store_commit_manifest(s, 1) == MS_OK;
        ms_store_close(s);
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    waitpid(writer, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ms_tensor *big = read_full(reader, 2, "big");
    int64_t big_shape[2] = {10000, 1000}, zeros[2] = {0, 0};
    CHECK(big && region_mismatches(big, big_shape, zeros, 8) == 0);
    ms_tensor_free(big);
    ms_store_close(reader);
}

/* In one process: a background save grows the shard file while another handle reads it. */
static void test_read_during_background_save(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "background-reader");
    ms_store *writer, *reader;
    int64_t small[2] = {64, 64}, big[2] = {10000, 1000}, zeros[2] = {0, 0};
    CHECK_OK(ms_store_open(&writer, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(writer, 1, 0, MS_STORE_FOREGROUND));
    ms_tensor *t = new_tensor(MS_F64, 2, small);
    fill_region(t, small, zeros, 3);
    CHECK_OK(ms_store_put_tensor(writer, "small", t, small, zeros));
    ms_tensor_free(t);
    CHECK_OK(ms_store_commit_data(writer));
    CHECK_OK(ms_store_commit_manifest(writer, 1));

    CHECK_OK(ms_store_open(&reader, dir, MS_STORE_READ_ONLY));
    CHECK_OK(ms_store_begin(writer, 2, 0, MS_STORE_BACKGROUND));
    t = new_tensor(MS_I64, 2, big);
    fill_region(t, big, zeros, 4);
    CHECK_OK(ms_store_put_tensor(writer, "big", t, big, zeros));
    ms_tensor_free(t);
    CHECK_OK(ms_store_commit_data(writer));
    int reads = 0;
    ms_tensor *back = new_tensor(MS_F64, 2, small);
    for (; reads < 200; reads++) {
        CHECK_OK(ms_store_read_tensor(reader, 1, "small", back, NULL));
        CHECK_OK(ms_store_verify_entry(reader, 1, "small"));
    }
    CHECK(region_mismatches(back, small, zeros, 3) == 0);
    ms_tensor_free(back);
    CHECK_OK(ms_store_wait(writer));
    CHECK_OK(ms_store_commit_manifest(writer, 1));
    ms_tensor *read_big = read_full(reader, 2, "big");
    CHECK(read_big && region_mismatches(read_big, big, zeros, 4) == 0);
    ms_tensor_free(read_big);
    ms_store_close(reader);
    ms_store_close(writer);
}

int main(void)
{
    test_keep_last_and_delete();
    test_delete_fails_whole();
    test_space_steady();
    test_dead_reader();
    test_reader_follows_growth();
    test_read_during_background_save();
    remove_temp_root();
    return test_report("test_store_retention");
}
