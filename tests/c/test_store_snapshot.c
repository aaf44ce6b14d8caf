/* moonshard store tests: ms_store_stage keeps the values a background save was given while
 * the caller overwrites its tensors at once - from this thread and from another one, on a
 * source that starts and ends inside a page, and on one staged twice - and an aborted save
 * leaves the sources writable. Writes announced with ms_fence_before_foreign_write (the
 * kernel's here) reach the source but not the checkpoint. A fault that is not a staged
 * write still kills the process. */
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>

#include "fence.h"
#include "internal.h"
#include "test_store_util.h"

static const int64_t BIG_SHAPE[2] = {1000, 1500}; /* 6 MB of f32: many 512 KiB blocks */
static const int64_t SMALL_SHAPE[1] = {300};        /* staged with a plain copy */
static const int64_t STORAGE_ELEMENTS = 1000 * 1500 + 8;

typedef struct overwrite_job {
    ms_tensor *t;
    uint8_t byte;
} overwrite_job;

static void *overwrite(void *arg)
{
    overwrite_job *job = arg;
    memset(ms_tensor_data(job->t), job->byte, ms_tensor_nbytes(job->t));
    return NULL;
}

/* A [1000, 1500] f32 view starting 3 elements into a larger storage (not page aligned). */
static ms_tensor *unaligned_big(ms_tensor **storage)
{
    *storage = new_tensor(MS_F32, 1, (int64_t[]){STORAGE_ELEMENTS});
    ms_tensor *view = NULL;
    CHECK_OK(ms_tensor_view(&view, *storage, 2, BIG_SHAPE, NULL, 3));
    return view;
}

static ms_tensor *staged(ms_store *s, const char *fqn, ms_tensor *src)
{
    ms_tensor *buffer = NULL;
    CHECK_OK(ms_tensor_new(&buffer, src->dtype, src->ndim, src->shape, MS_POOL_HOST));
    CHECK_OK(ms_store_stage(s, buffer, src));
    CHECK_OK(ms_store_put_tensor(s, fqn, buffer, src->shape, NULL));
    return buffer;
}

static int64_t stored_mismatches(ms_store *s, int64_t step, const char *fqn, int ndim,
                                 const int64_t *shape, uint64_t seed)
{
    ms_tensor *back = new_tensor(MS_F32, ndim, shape);
    int64_t zero[2] = {0, 0};
    CHECK_OK(ms_store_read_tensor(s, step, fqn, back, NULL));
    int64_t wrong = region_mismatches(back, shape, zero, seed);
    ms_tensor_free(back);
    return wrong;
}

static void test_writes_after_stage_do_not_reach_the_checkpoint(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "snapshot");
    int64_t zero[2] = {0, 0};
    ms_tensor *storage, *big = unaligned_big(&storage);
    ms_tensor *other = new_tensor(MS_F32, 2, BIG_SHAPE), *small = new_tensor(MS_F32, 1, SMALL_SHAPE);
    fill_region(big, BIG_SHAPE, zero, 1);
    fill_region(other, BIG_SHAPE, zero, 2);
    fill_region(small, SMALL_SHAPE, zero, 3);

    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_BACKGROUND));
    ms_tensor *buffers[4] = {staged(s, "big", big), staged(s, "other", other),
                             staged(s, "small", small), staged(s, "big_again", big)};
    CHECK_OK(ms_store_commit_data(s));
    /* Every byte of every source changes before the writer can have copied much. */
    overwrite_job job = {other, 0x7F};
    pthread_t helper;
    CHECK(pthread_create(&helper, NULL, overwrite, &job) == 0);
    memset(ms_tensor_data(storage), 0xEE, ms_tensor_nbytes(storage));
    memset(ms_tensor_data(small), 0xEE, ms_tensor_nbytes(small));
    pthread_join(helper, NULL);
    CHECK_OK(ms_store_wait(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));

    CHECK(stored_mismatches(s, 1, "big", 2, BIG_SHAPE, 1) == 0);
    CHECK(stored_mismatches(s, 1, "big_again", 2, BIG_SHAPE, 1) == 0);
    CHECK(stored_mismatches(s, 1, "other", 2, BIG_SHAPE, 2) == 0);
    CHECK(stored_mismatches(s, 1, "small", 1, SMALL_SHAPE, 3) == 0);
    const uint8_t *bytes = ms_tensor_data(other);
    CHECK(bytes[0] == 0x7F && bytes[ms_tensor_nbytes(other) - 1] == 0x7F);
    ms_store_close(s);
    for (int i = 0; i < 4; i++)
        ms_tensor_free(buffers[i]);
    ms_tensor_free(big);
    ms_tensor_free(storage);
    ms_tensor_free(other);
    ms_tensor_free(small);
}

/* Before commit_data no writer thread runs, so every staged page is still read-only: a
 * read() into one fails with EFAULT unless the write was announced first. */
static void test_announced_kernel_writes_keep_the_snapshot(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "snapshot-foreign");
    int64_t zero[2] = {0, 0};
    ms_tensor *big = new_tensor(MS_F32, 2, BIG_SHAPE);
    fill_region(big, BIG_SHAPE, zero, 6);
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_BACKGROUND));
    ms_tensor *buffer = staged(s, "big", big);
    enum { PIECE = 32768 };
    uint8_t *target = (uint8_t *)ms_tensor_data(big) + ms_tensor_nbytes(big) / 2 + 100;
    uint8_t incoming[PIECE];
    memset(incoming, 0xAB, sizeof incoming);
    int fds[2];
    CHECK(pipe(fds) == 0);
    CHECK(write(fds[1], incoming, sizeof incoming) == (ssize_t)sizeof incoming);
    ms_fence_before_foreign_write(target, PIECE);
    CHECK(read(fds[0], target, PIECE) == PIECE);
    close(fds[0]);
    close(fds[1]);
    CHECK(target[0] == 0xAB && target[PIECE - 1] == 0xAB);
    CHECK_OK(ms_store_commit_data(s));
    CHECK_OK(ms_store_wait(s));
    CHECK_OK(ms_store_commit_manifest(s, 1));
    CHECK(stored_mismatches(s, 1, "big", 2, BIG_SHAPE, 6) == 0);
    ms_store_close(s);
    ms_tensor_free(buffer);
    ms_tensor_free(big);
}

static void test_abort_leaves_sources_writable(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "snapshot-abort");
    int64_t zero[2] = {0, 0};
    ms_tensor *big = new_tensor(MS_F32, 2, BIG_SHAPE);
    fill_region(big, BIG_SHAPE, zero, 4);
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_BACKGROUND));
    ms_tensor *buffer = staged(s, "big", big);
    CHECK_OK(ms_store_abort(s));
    CHECK(region_mismatches(big, BIG_SHAPE, zero, 4) == 0);
    fill_region(big, BIG_SHAPE, zero, 5);
    CHECK(region_mismatches(big, BIG_SHAPE, zero, 5) == 0);
    ms_store_close(s);
    ms_tensor_free(buffer);
    ms_tensor_free(big);
}

static void test_stage_needs_a_background_save(void)
{
    char dir[512];
    temp_store(dir, sizeof dir, "snapshot-foreground");
    ms_tensor *small = new_tensor(MS_F32, 1, SMALL_SHAPE), *wrong = new_tensor(MS_F32, 1, (int64_t[]){7});
    ms_store *s;
    CHECK_OK(ms_store_open(&s, dir, MS_STORE_READ_WRITE));
    CHECK_FAILS(ms_store_stage(s, small, small), MS_ERR_STATE, "no background save in progress");
    CHECK_OK(ms_store_begin(s, 1, 0, MS_STORE_BACKGROUND));
    CHECK_FAILS(ms_store_stage(s, wrong, small), MS_ERR_SHAPE, "dst is f32 [7], src is f32 [300]");
    CHECK_OK(ms_store_abort(s));
    ms_store_close(s);
    ms_tensor_free(small);
    ms_tensor_free(wrong);
}

/* With the handler installed, a write to read-only memory that no save staged still ends the
 * process: by SIGSEGV (the default action the handler passes it on to), or under a sanitizer
 * by the sanitizer's own handler, which reports the fault and exits. */
static void test_other_faults_still_kill(void)
{
    pid_t child = fork();
    if (child == 0) {
        char dir[512];
        temp_store(dir, sizeof dir, "snapshot-fault");
        ms_tensor *big = new_tensor(MS_F32, 2, BIG_SHAPE);
        ms_store *s;
        if (ms_store_open(&s, dir, MS_STORE_READ_WRITE) || ms_store_begin(s, 1, 0, MS_STORE_BACKGROUND))
            _exit(3);
        ms_tensor *buffer = staged(s, "big", big);
        (void)buffer;
        int quiet = open("/dev/null", O_WRONLY);
        dup2(quiet, STDERR_FILENO);
        volatile uint8_t *page =
            mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        page[0] = 1;
        _exit(4);
    }
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child);
    bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV;
    bool reported = WIFEXITED(status) && WEXITSTATUS(status) != 0 && WEXITSTATUS(status) != 3 &&
                    WEXITSTATUS(status) != 4;
    CHECK(killed || reported);
}

int main(void)
{
    test_writes_after_stage_do_not_reach_the_checkpoint();
    test_announced_kernel_writes_keep_the_snapshot();
    test_abort_leaves_sources_writable();
    test_stage_needs_a_background_save();
    test_other_faults_still_kill();
    remove_temp_root();
    return test_report("test_store_snapshot");
}
