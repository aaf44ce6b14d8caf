/* C tests of the local backend's failure handling: crashed, exiting, failing, missing and
 * late ranks, a rank killed while the others read its tensors, mismatched collectives, and
 * that no process or /dev/shm entry is left behind. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_comm_cases.h"

static int64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

/* Rank r reports "<status> <elapsed ms> <message>" of its collective. */
static void finish_with(int status, int64_t elapsed)
{
    char text[512];
    int n = snprintf(text, sizeof text, "%d %lld %s", status, (long long)elapsed,
                     ms_last_error());
    ms_local_finish(0, text, (size_t)n);
}

typedef struct reported {
    int status;
    long long elapsed;
    char message[400];
} reported;

static int read_report(ms_spawn *job, int rank, reported *out)
{
    ms_rank_outcome outcome;
    if (ms_spawn_outcome(job, rank, &outcome) != MS_OK || outcome.state != MS_RANK_RETURNED)
        return 0;
    char text[512] = {0};
    memcpy(text, outcome.bytes, outcome.nbytes < 511 ? outcome.nbytes : 511);
    int used = 0;
    if (sscanf(text, "%d %lld %n", &out->status, &out->elapsed, &used) != 2)
        return 0;
    snprintf(out->message, sizeof out->message, "%s", text + used);
    return 1;
}

typedef enum fault { FAULT_SIGKILL, FAULT_SEGV, FAULT_EXIT, FAULT_ERROR, FAULT_RETURN } fault;

static void commit_fault(fault how)
{
    sleep_ms(100); /* let the peers block in their collective first */
    switch (how) {
    case FAULT_SIGKILL: kill(getpid(), SIGKILL); break;
    case FAULT_SEGV: {
        setrlimit(RLIMIT_CORE, &(struct rlimit){0, 0});
        volatile int *forbidden = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *forbidden = 1;
        break;
    }
    case FAULT_EXIT: _exit(3);
    case FAULT_ERROR: ms_local_finish(1, "boom", 4); break;
    case FAULT_RETURN: ms_local_finish(0, "0 0 gone", 8); break;
    }
}

/* World of 3: rank 1 faults while ranks 0 and 2 wait in an all_reduce. */
static void test_rank_fault(fault how, int state, int code, const char *reason)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 3, 30000, &rank));
    if (rank == 1)
        commit_fault(how);
    if (rank >= 0) {
        ms_tensor *t = new_tensor(MS_F32, 1000);
        int64_t start = now_ms();
        int status = ms_dist_all_reduce(NULL, t, MS_DIST_SUM);
        int64_t elapsed = now_ms() - start;
        if (status == MS_ERR_PEER_DIED) /* the group stays failed */
            status = ms_dist_all_reduce(NULL, t, MS_DIST_SUM) == status ? status : -1;
        finish_with(status, elapsed);
    }
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    ms_rank_outcome outcome;
    ms_spawn_outcome(job, 1, &outcome);
#ifdef __SANITIZE_ADDRESS__
    /* AddressSanitizer turns a segfault into its own report and exit status */
    if (how == FAULT_SEGV) {
        state = MS_RANK_EXITED;
        code = 1;
        reason = "exited with status 1";
    }
#endif
    EXPECT(outcome.state == state);
    if (state == MS_RANK_KILLED || state == MS_RANK_EXITED)
        EXPECT(outcome.code == code);
    if (state == MS_RANK_FAILED)
        EXPECT(outcome.nbytes == 4 && memcmp(outcome.bytes, "boom", 4) == 0);
    for (int r = 0; r <= 2; r += 2) {
        reported report;
        EXPECT(read_report(job, r, &report));
        EXPECT(report.status == MS_ERR_PEER_DIED);
        EXPECT(report.elapsed < 2000);
        EXPECT(strstr(report.message, "all_reduce") && strstr(report.message, "rank 1") &&
               strstr(report.message, reason));
        if (failures)
            fprintf(stderr, "  rank %d reported: %d %lld %s\n", r, report.status,
                    report.elapsed, report.message);
    }
    ms_spawn_free(job);
}

/* World of 3 running large all_reduce or reduce_scatter calls back to back (the ones that
 * read the peers' tensors where they are: in the shared heap, or through the kernel with the
 * heap switched off): rank 1 is killed by a timer wherever it is, often while the others read
 * its memory. Ranks 0 and 2 report the death, naming rank 1 and its signal,
 * within 2 s of the failing call's start; no survivor crashes or hangs. */
static void test_killed_in_large_collectives(int scatter, const char *heap)
{
    setenv("MOONSHARD_SHARED_HEAP", heap, 1);
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 3, 30000, &rank));
    if (rank >= 0) {
        ms_tensor *t = new_tensor(MS_F32, 3 << 20), *block = new_tensor(MS_F32, 1 << 20);
        if (rank == 1)
            setitimer(ITIMER_REAL, &(struct itimerval){.it_value = {0, 150000}}, NULL);
        int status = MS_OK;
        int64_t elapsed = 0;
        for (int call = 0; status == MS_OK && call < 100000; call++) {
            int64_t start = now_ms();
            status = scatter ? ms_dist_reduce_scatter_tensor(NULL, block, t, MS_DIST_SUM)
                             : ms_dist_all_reduce(NULL, t, MS_DIST_SUM);
            elapsed = now_ms() - start;
        }
        finish_with(status, elapsed);
    }
    unsetenv("MOONSHARD_SHARED_HEAP");
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    ms_rank_outcome outcome;
    ms_spawn_outcome(job, 1, &outcome);
    EXPECT(outcome.state == MS_RANK_KILLED && outcome.code == SIGALRM);
    for (int r = 0; r <= 2; r += 2) {
        reported report;
        EXPECT(read_report(job, r, &report));
        EXPECT(report.status == MS_ERR_PEER_DIED);
        EXPECT(report.elapsed < 2000);
        EXPECT(strstr(report.message, "rank 1 died (signal 14)") != NULL);
        if (failures)
            fprintf(stderr, "  %s, heap %s: rank %d reported: %d %lld %s\n",
                    scatter ? "reduce_scatter" : "all_reduce", heap, r, report.status,
                    report.elapsed, report.message);
    }
    ms_spawn_free(job);
}

/* A crash outside the collective a rank waits in still stops that collective. */
static void test_unrelated_crash(void)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 3, 30000, &rank));
    if (rank == 2)
        commit_fault(FAULT_SIGKILL);
    if (rank >= 0) {
        ms_group *pair = NULL;
        ms_group_new(&pair, NULL, (int[]){0, 1}, 2);
        ms_tensor *t = new_tensor(MS_F32, 1000);
        int64_t start = now_ms();
        int status = MS_OK;
        while (status == MS_OK && now_ms() - start < 10000)
            status = ms_dist_all_reduce(pair, t, MS_DIST_SUM);
        finish_with(status, now_ms() - start);
    }
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    for (int r = 0; r < 2; r++) {
        reported report;
        EXPECT(read_report(job, r, &report) && report.status == MS_ERR_PEER_DIED &&
               strstr(report.message, "rank 2 died (signal 9)") && report.elapsed < 2100);
    }
    ms_spawn_free(job);
}

/* Rank 1 never calls the collective: rank 0 times out after the group's timeout. */
static void test_missing_rank(void)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 2, 30000, &rank));
    if (rank == 1) {
        sleep_ms(1500);
        ms_local_finish(0, "0 0 late", 8);
    }
    if (rank == 0) {
        EXPECT_STATUS(MS_ERR_INVALID, ms_group_set_timeout(NULL, 0));
        EXPECT_STATUS(MS_OK, ms_group_set_timeout(NULL, 300));
        ms_tensor *t = new_tensor(MS_I32, 10);
        int64_t start = now_ms();
        int status = ms_dist_broadcast(NULL, t, 1);
        finish_with(status, now_ms() - start);
    }
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    reported report;
    EXPECT(read_report(job, 0, &report));
    EXPECT(report.status == MS_ERR_TIMEOUT);
    EXPECT(report.elapsed >= 280 && report.elapsed < 1400);
    EXPECT(strstr(report.message, "broadcast: rank 1 did not arrive within 300 ms") != NULL);
    ms_spawn_free(job);
}

typedef enum late_kind { LATE_SMALL_ALL_REDUCE, LATE_LARGE_ALL_REDUCE, LATE_LARGE_ALL_GATHER } late_kind;

/* The last rank calls the collective after the others gave up on it (timeout 300 ms): its
 * collective fails too, naming the rank that gave up and why, rather than completing with
 * the data the others posted; every rank's tensor is left as it was, and the group stays
 * failed. Small and large (shared heap) all_reduce, and a multi-step all_gather. */
static void test_late_rank_refused(int world, late_kind kind)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, world, 300, &rank));
    if (rank >= 0) {
        int64_t count = kind == LATE_SMALL_ALL_REDUCE ? 1000 : 1 << 20; /* 4 MiB of f32 */
        ms_tensor *t = new_tensor(MS_F32, count), *out = new_tensor(MS_F32, count * world);
        fill_pattern(t, rank, 0);
        if (rank == world - 1)
            sleep_ms(800);
        int64_t start = now_ms();
        int status = kind == LATE_LARGE_ALL_GATHER ? ms_dist_all_gather_into_tensor(NULL, out, t)
                                                   : ms_dist_all_reduce(NULL, t, MS_DIST_SUM);
        int64_t elapsed = now_ms() - start;
        char message[400];
        snprintf(message, sizeof message, "%s", ms_last_error());
        int kept = count_wrong(ms_tensor_data(t), MS_F32, count, 0, root_pattern, &rank) == 0;
        ms_tensor *u = new_tensor(MS_F32, 4);
        int again = ms_dist_all_reduce(NULL, u, MS_DIST_SUM) == status;
        char text[512];
        int n = snprintf(text, sizeof text, "%d %lld %s%s%s", status, (long long)elapsed,
                         kept ? "" : "[changed] ", again ? "" : "[usable] ", message);
        ms_local_finish(0, text, (size_t)n);
    }
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    for (int r = 0; r < world; r++) {
        reported report;
        EXPECT(read_report(job, r, &report));
        EXPECT(report.status == MS_ERR_TIMEOUT);
        EXPECT(!strstr(report.message, "[changed]") && !strstr(report.message, "[usable]"));
        if (r == world - 1)
            EXPECT(strstr(report.message, "gave up on this collective, so it fails on every "
                                          "member") &&
                   strstr(report.message, "did not arrive within 300 ms") &&
                   report.elapsed < 500);
        else
            EXPECT(strstr(report.message, "did not arrive within 300 ms") ||
                   strstr(report.message, "gave up on this collective"));
        if (failures)
            fprintf(stderr, "  late rank, world %d, kind %d: rank %d reported: %d %lld %s\n",
                    world, (int)kind, r, report.status, report.elapsed, report.message);
    }
    ms_spawn_free(job);
}

static int mismatched_calls(int rank, int n, void *context)
{
    (void)rank;
    (void)n;
    (void)context;
    mismatch_cases(NULL);
    return 0;
}

/* Freeing a job whose ranks still run kills and reaps them. */
static void test_free_running(void)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 2, 0, &rank));
    if (rank >= 0) {
        sleep_ms(20000);
        ms_local_finish(0, "", 0);
    }
    pid_t pids[2];
    for (int r = 0; r < 2; r++) {
        ms_rank_outcome outcome;
        ms_spawn_outcome(job, r, &outcome);
        EXPECT(outcome.state == MS_RANK_RUNNING);
        pids[r] = outcome.pid;
    }
    int64_t start = now_ms();
    ms_spawn_free(job);
    EXPECT(now_ms() - start < 1000);
    for (int r = 0; r < 2; r++)
        EXPECT(kill(pids[r], 0) == -1 && errno == ESRCH);
}

/* A rank that keeps running after a peer failed is stopped a timeout later. */
static void test_straggler_stopped(void)
{
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 2, 300, &rank));
    if (rank == 0)
        ms_local_finish(1, "boom", 4);
    if (rank == 1) {
        sleep_ms(20000);
        ms_local_finish(0, "", 0);
    }
    int64_t start = now_ms();
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    int64_t elapsed = now_ms() - start;
    EXPECT(elapsed >= 250 && elapsed < 5000);
    ms_rank_outcome outcome;
    EXPECT_STATUS(MS_OK, ms_spawn_outcome(job, 1, &outcome));
    EXPECT(outcome.state == MS_RANK_KILLED && outcome.code == SIGKILL);
    EXPECT(strstr(outcome.reason, "was stopped (signal 9): still running 300 ms after rank 0 "
                                  "failed") != NULL);
    pid_t pid = outcome.pid;
    ms_spawn_free(job);
    EXPECT(kill(pid, 0) == -1 && errno == ESRCH);
}

/* 1 while pid is a live process (not a zombie waiting for init to reap it). */
static int process_alive(pid_t pid)
{
    char path[64], stat[256] = {0};
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    const char *state = strrchr(stat, ')');
    return n > 0 && state && state[2] != 'Z' && state[2] != 'X';
}

/* Ranks die with their parent. */
static void test_parent_death(void)
{
    int fds[2];
    EXPECT(pipe(fds) == 0);
    pid_t middle = fork();
    if (middle == 0) {
        ms_spawn *job = NULL;
        int rank = -1;
        if (ms_spawn_new(&job, 2, 0, &rank) != MS_OK)
            _exit(1);
        if (rank >= 0) {
            sleep_ms(20000);
            _exit(0);
        }
        for (int r = 0; r < 2; r++) {
            ms_rank_outcome outcome;
            ms_spawn_outcome(job, r, &outcome);
            if (write(fds[1], &outcome.pid, sizeof outcome.pid) != sizeof outcome.pid)
                _exit(1);
        }
        sleep_ms(20000);
        _exit(0);
    }
    close(fds[1]);
    int32_t pids[2] = {0, 0};
    size_t received = 0; /* the middle writes one pid at a time */
    while (received < sizeof pids) {
        ssize_t n = read(fds[0], (char *)pids + received, sizeof pids - received);
        if (n <= 0)
            break;
        received += (size_t)n;
    }
    EXPECT(received == sizeof pids);
    close(fds[0]);
    kill(middle, SIGKILL);
    waitpid(middle, NULL, 0);
    int64_t start = now_ms();
    while ((process_alive(pids[0]) || process_alive(pids[1])) && now_ms() - start < 2000)
        sleep_ms(10);
    EXPECT(!process_alive(pids[0]) && !process_alive(pids[1]));
}

/* With SIGCHLD ignored the system reaps ranks itself; their finish records still count. */
static int returns_rank(int rank, int n, void *context)
{
    (void)rank;
    (void)n;
    (void)context;
    EXPECT_STATUS(MS_OK, ms_dist_barrier(NULL));
    return 0;
}

static void test_sigchld_ignored(void)
{
    signal(SIGCHLD, SIG_IGN);
    expect_clean_run(2, returns_rank, NULL, "sigchld_ignored");
    signal(SIGCHLD, SIG_DFL);
}

/* Entries in /dev/shm, except those programs running beside this test make: OpenMPI's
 * segments and POSIX named semaphores. */
static int count_dev_shm(void)
{
    DIR *dir = opendir("/dev/shm");
    if (!dir)
        return 0;
    int n = 0;
    for (struct dirent *e; (e = readdir(dir));)
        n += e->d_name[0] != '.' && strncmp(e->d_name, "vader_segment.", 14) != 0 &&
             strncmp(e->d_name, "sem.", 4) != 0;
    closedir(dir);
    return n;
}

int main(void)
{
    int shm_before = count_dev_shm();
    test_rank_fault(FAULT_SIGKILL, MS_RANK_KILLED, SIGKILL, "died (signal 9)");
    test_rank_fault(FAULT_SEGV, MS_RANK_KILLED, SIGSEGV, "died (signal 11)");
    test_rank_fault(FAULT_EXIT, MS_RANK_EXITED, 3, "exited with status 3");
    test_rank_fault(FAULT_ERROR, MS_RANK_FAILED, 0, "raised an error");
    test_rank_fault(FAULT_RETURN, MS_RANK_RETURNED, 0, "returned without joining");
    for (int scatter = 0; scatter < 2; scatter++) {
        test_killed_in_large_collectives(scatter, "1");
        test_killed_in_large_collectives(scatter, "0");
    }
    test_unrelated_crash();
    test_missing_rank();
    test_late_rank_refused(2, LATE_SMALL_ALL_REDUCE);
    test_late_rank_refused(2, LATE_LARGE_ALL_REDUCE);
    test_late_rank_refused(3, LATE_LARGE_ALL_GATHER);
    expect_clean_run(3, mismatched_calls, NULL, "mismatched_calls");
    test_free_running();
    test_straggler_stopped();
    test_parent_death();
    test_sigchld_ignored();
    EXPECT(count_dev_shm() == shm_before);
    if (failures)
        fprintf(stderr, "test_comm_faults: %d failures\n", failures);
    return failures != 0;
}
