/* C tests of interrupts (ms_interrupt_*, ms.h) with real signals between forked ranks: a
 * wait stops at SIGINT, or finishes its collective when waits are not interruptible; the
 * parent stops every rank on SIGTERM; the same signal twice takes the default action. */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_comm_util.h"

static void sleep_ms(int ms)
{
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

static ms_tensor *ones(int64_t n)
{
    ms_tensor *t = NULL;
    int64_t shape[1] = {n};
    if (ms_tensor_new(&t, MS_F32, 1, shape, MS_POOL_CPU) != MS_OK)
        return NULL;
    float *p = ms_tensor_data(t);
    for (int64_t i = 0; i < n; i++)
        p[i] = 1.0f;
    return t;
}

/* Rank 1 arrives late; the parent sends SIGINT to rank 0 while it waits for rank 1. */
static int waits_for_late_peer(int rank, int world_size, void *context)
{
    (void)world_size;
    int interruptible = *(int *)context;
    ms_tensor *t = ones(1000);
    if (rank == 0) {
        ms_interrupt_set_waits(interruptible);
        int status = ms_dist_all_reduce(NULL, t, MS_DIST_SUM);
        if (interruptible) {
            EXPECT_STATUS(MS_ERR_INTERRUPTED, status);
            EXPECT(strstr(ms_last_error(), "all_reduce: interrupted by SIGINT") != NULL);
            /* the interrupted group is unusable, as after a timeout */
            EXPECT_STATUS(MS_ERR_INTERRUPTED, ms_dist_barrier(NULL));
            EXPECT(ms_interrupt_pending() == 0);
        } else {
            /* the started collective ran to its end; the next one's start takes the signal */
            EXPECT_STATUS(MS_OK, status);
            EXPECT(((float *)ms_tensor_data(t))[999] == 2.0f);
            EXPECT(ms_interrupt_pending() == SIGINT);
            EXPECT_STATUS(MS_ERR_INTERRUPTED, ms_dist_all_reduce(NULL, t, MS_DIST_SUM));
            EXPECT_STATUS(MS_OK, ms_dist_barrier(NULL)); /* nothing was posted: still in step */
            EXPECT_STATUS(MS_OK, ms_dist_all_reduce(NULL, t, MS_DIST_SUM));
            EXPECT(((float *)ms_tensor_data(t))[0] == 4.0f);
        }
    } else {
        sleep_ms(1500);
        int status = ms_dist_all_reduce(NULL, t, MS_DIST_SUM);
        if (!interruptible) {
            EXPECT_STATUS(MS_OK, status);
            EXPECT_STATUS(MS_OK, ms_dist_barrier(NULL));
            EXPECT_STATUS(MS_OK, ms_dist_all_reduce(NULL, t, MS_DIST_SUM));
        }
    }
    ms_tensor_free(t);
    return 0;
}

static void test_wait_interrupted(int interruptible)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 2, 20000, &rank));
    if (rank >= 0) {
        failures = 0;
        int wrong = waits_for_late_peer(rank, 2, &interruptible) + failures;
        char text[32];
        int n = snprintf(text, sizeof text, "%d", wrong);
        ms_local_finish(0, text, (size_t)n);
    }
    ms_rank_outcome outcome;
    sleep_ms(500);
    EXPECT_STATUS(MS_OK, ms_spawn_outcome(job, 0, &outcome));
    kill(outcome.pid, SIGINT);
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    EXPECT(reported_failures(job, 0) == 0);
    if (!interruptible)
        EXPECT(reported_failures(job, 1) == 0);
    ms_spawn_free(job);
}

/* Rank 0 sends SIGTERM to the parent and waits in a collective; rank 1 spins without
 * polling anything: the parent stops both and says so. */
static void test_parent_interrupted(void)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 2, 20000, &rank));
    /* Both ranks are running their own code (their handlers in place) before the signal:
     * a rank still starting up when the parent stops the job may end by SIGTERM itself. */
    if (rank >= 0)
        EXPECT_STATUS(MS_OK, ms_dist_barrier(NULL));
    if (rank == 0) {
        kill(getppid(), SIGTERM);
        ms_tensor *t = ones(10);
        int status = ms_dist_all_reduce(NULL, t, MS_DIST_SUM);
        ms_local_finish(1, ms_last_error(), strlen(ms_last_error()));
        (void)status;
    } else if (rank == 1) {
        for (volatile unsigned long i = 0;; i++) {
        }
    }
    EXPECT_STATUS(MS_ERR_INTERRUPTED, ms_spawn_wait(job));
    EXPECT(strstr(ms_last_error(), "interrupted by SIGTERM: every rank was stopped") != NULL);
    ms_rank_outcome outcome;
    EXPECT_STATUS(MS_OK, ms_spawn_outcome(job, 0, &outcome));
    EXPECT(outcome.state == MS_RANK_FAILED);
    EXPECT(outcome.nbytes > 0 && memmem(outcome.bytes, outcome.nbytes, "interrupted by SIGTERM", 22));
    EXPECT_STATUS(MS_OK, ms_spawn_outcome(job, 1, &outcome));
    EXPECT(outcome.state == MS_RANK_KILLED && outcome.code == SIGKILL);
    EXPECT(strstr(outcome.reason, "still running 500 ms after SIGTERM") != NULL);
    EXPECT(ms_interrupt_pending() == 0);
    ms_spawn_free(job);
    /* the parent's own disposition is back: SIGTERM is not moonshard's here */
    struct sigaction now;
    sigaction(SIGTERM, NULL, &now);
    EXPECT(now.sa_handler == SIG_DFL);
}

/* A process whose loop polls nothing: one SIGINT is only pending, a second ends it. */
static void test_second_signal(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        ms_interrupt_install();
        raise(SIGINT);
        if (ms_interrupt_pending() != SIGINT)
            _exit(3);
        raise(SIGINT);
        _exit(4); /* not reached: the default action ended the process */
    }
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT);
}

int main(void)
{
    test_wait_interrupted(1);
    test_wait_interrupted(0);
    test_parent_interrupted();
    test_second_signal();
    if (failures)
        fprintf(stderr, "test_comm_interrupt: %d failures\n", failures);
    return failures != 0;
}
