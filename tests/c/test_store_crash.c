/* moonshard store tests: crash safety. A rank killed (SIGKILL) before any write, in the
 * middle of a chunk, after the map grew mid-save, in a background writer, or between its
 * data commit and the manifest must leave the previous step loadable and bit-identical, the
 * partial step invisible, and the next save working and reclaiming the orphaned chunks. */
#include <signal.h>
#include <sys/mman.h>

#include "test_store_util.h"

enum { WORLD = 2 };
static const int64_t GSHAPE[2] = {64, 1000};

static int put_half(ms_store *s, int rank, int world_size, void *arg)
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

/* Step 1 is there, bit-identical, and is the only committed step. */
static void check_only_step_one(const char *dir)
{
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    int64_t steps[4], count = 0;
    CHECK_OK(ms_store_steps(s, steps, 4, &count));
    CHECK(count == 1 && steps[0] == 1);
    int64_t entries;
    CHECK_FAILS(ms_store_entry_count(s, 2, &entries), MS_ERR_NOT_FOUND, "not committed");
    ms_tensor *w = read_full(s, 1, "w");
    int64_t zeros[2] = {0, 0};
    CHECK(w && region_mismatches(w, GSHAPE, zeros, 1) == 0);
    CHECK_OK(ms_store_verify_entry(s, 1, "w"));
    ms_tensor_free(w);
    ms_store_close(s);
}

/* ---- the ways a rank dies ---- */

typedef enum {
    BEFORE_ANY_WRITE,
    MID_CHUNK,
    MID_CHUNK_AFTER_GROWTH,
    IN_BACKGROUND_WRITER,
    AFTER_DATA_COMMIT
} crash_point;

static const char *const CRASH_NAMES[] = {
    "before any write", "mid-chunk", "mid-chunk after the map grew", "in the background writer",
    "between data commit and manifest"};

static void die(void)
{
    kill(getpid(), SIGKILL);
}

static void die_on_fault(int signal)
{
    (void)signal;
    die();
}

/* A source tensor whose storage ends in an inaccessible page: copying it into the store
 * faults part-way through the chunk, and the fault handler kills the process there. */
static ms_tensor *trap_tensor(ms_storage *storage, ms_tensor *t, int64_t rows)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t good = (size_t)rows * GSHAPE[1] * 4 / 2 / page * page;
    uint8_t *map =
        mmap(NULL, good + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(map, 7, good);
    mprotect(map + good, page, PROT_NONE);
    *storage = (ms_storage){
        .data = map, .nbytes = (size_t)rows * GSHAPE[1] * 4, .pool = MS_POOL_CPU, .refcount = 1};
    *t = (ms_tensor){.storage = storage,
                     .dtype = MS_F32,
                     .ndim = 2,
                     .numel = rows * GSHAPE[1],
                     .shape = {rows, GSHAPE[1]},
                     .strides = {GSHAPE[1], 1}};
    return t;
}

static void crashing_rank(const char *dir, int rank, crash_point point)
{
    signal(SIGSEGV, die_on_fault);
    ms_store *s;
    if (ms_store_open(&s, dir, MS_STORE_READ_WRITE))
        _exit(1);
    int mode = point == IN_BACKGROUND_WRITER ? MS_STORE_BACKGROUND : MS_STORE_FOREGROUND;
    if (ms_store_begin(s, 2, rank, mode))
        _exit(1);
    if (point == BEFORE_ANY_WRITE)
        die();
    uint64_t seed = 2;
    if (put_half(s, rank, WORLD, &seed))
        _exit(1);
    if (point == MID_CHUNK_AFTER_GROWTH || point == IN_BACKGROUND_WRITER) {
        int64_t big[2] = {24000, 1000}, zero[2] = {0, 0};
        ms_tensor *t = new_tensor(MS_F32, 2, big);
        memset(ms_tensor_data(t), 3, ms_tensor_nbytes(t));
        if (ms_store_put_tensor(s, "big", t, big, zero))
            _exit(1);
        ms_tensor_free(t);
    }
    if (point == IN_BACKGROUND_WRITER) {
        ms_store_commit_data(s);
        usleep(20000);
        die();
    }
    if (point == MID_CHUNK || point == MID_CHUNK_AFTER_GROWTH) {
        ms_storage storage;
        ms_tensor t;
        int64_t zero[2] = {0, 0};
        ms_store_put_tensor(s, "trap", trap_tensor(&storage, &t, 4096), (int64_t[]){4096, 1000},
                            zero);
        _exit(1); /* the put must have faulted */
    }
    if (ms_store_commit_data(s))
        _exit(1);
    die();
}

static void test_crash(crash_point point)
{
    char dir[512], name[64];
    snprintf(name, sizeof name, "crash-%d", (int)point);
    temp_store(dir, sizeof dir, name);
    uint64_t seed = 1;
    CHECK_OK(save_ranks(dir, 1, WORLD, put_half, &seed));

    /* Rank 1 dies at the crash point; rank 0 commits its data and waits for a table that
     * never comes, like the collective that would fail. */
    pid_t pids[WORLD];
    for (int rank = 0; rank < WORLD; rank++) {
        pids[rank] = fork();
        if (pids[rank] == 0)
            crashing_rank(dir, rank, rank == 1 ? point : AFTER_DATA_COMMIT);
    }
    for (int rank = 0; rank < WORLD; rank++) {
        int status = 0;
        waitpid(pids[rank], &status, 0);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
            fprintf(stderr, "crash %s: rank %d ended with status %#x\n", CRASH_NAMES[point], rank,
                    status);
            test_failures++;
        }
    }
    check_only_step_one(dir);
    /* Rank 0 committed its data; what rank 1 left depends on where it died. */
    CHECK(foreign_chunk_keys(dir, 0, 1) == 1);
    int64_t orphans = foreign_chunk_keys(dir, 1, 1);
    if (point == BEFORE_ANY_WRITE)
        CHECK(orphans == 0);
    if (point == MID_CHUNK) /* what was written before the fault, committed where the map grew */
        CHECK(orphans <= 3);
    if (point == MID_CHUNK_AFTER_GROWTH)
        CHECK(orphans >= 2); /* committed when the map grew, before the fatal chunk */
    if (point == AFTER_DATA_COMMIT)
        CHECK(orphans == 1);

    seed = 3;
    CHECK_OK(save_ranks(dir, 2, WORLD, put_half, &seed));
    CHECK(foreign_chunk_keys(dir, 0, 2) == 1 && foreign_chunk_keys(dir, 1, 2) == 1);
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_ONLY));
    int64_t zeros[2] = {0, 0};
    ms_tensor *one = read_full(s, 1, "w"), *two = read_full(s, 2, "w");
    CHECK(one && region_mismatches(one, GSHAPE, zeros, 1) == 0);
    CHECK(two && region_mismatches(two, GSHAPE, zeros, 3) == 0);
    int64_t entries = 0;
    CHECK_OK(ms_store_entry_count(s, 2, &entries));
    CHECK(entries == 1);
    ms_tensor_free(one);
    ms_tensor_free(two);
    ms_store_close(s);
    if (test_failures)
        fprintf(stderr, "after the crash %s\n", CRASH_NAMES[point]);
}

/* Reclaimed pages are reused: saving again after a crash that left a big orphan does not
 * grow the file by another copy of it. */
static void test_space_is_reused(void)
{
    char dir[512], path[600];
    temp_store(dir, sizeof dir, "crash-reuse");
    uint64_t seed = 1;
    CHECK_OK(save_ranks(dir, 1, WORLD, put_half, &seed));
    pid_t pid = fork();
    if (pid == 0)
        crashing_rank(dir, 0, MID_CHUNK_AFTER_GROWTH);
    waitpid(pid, NULL, 0);
    snprintf(path, sizeof path, "%s/shard-0.mdb", dir);
    struct stat before, after;
    stat(path, &before);
    for (int round = 0; round < 3; round++) {
        pid = fork();
        if (pid == 0)
            crashing_rank(dir, 0, MID_CHUNK_AFTER_GROWTH);
        waitpid(pid, NULL, 0);
    }
    stat(path, &after);
    CHECK(after.st_blocks <= before.st_blocks + before.st_blocks / 4);
    check_only_step_one(dir);
}

int main(void)
{
    for (int point = BEFORE_ANY_WRITE; point <= AFTER_DATA_COMMIT; point++)
        test_crash((crash_point)point);
    test_space_is_reused();
    remove_temp_root();
    return test_report("test_store_crash");
}
