/* C tests of the mpi backend: the shared collective cases on groups of 1 to 4 processes,
 * mismatches, a process that exits while its peers wait (the job must end, not hang), and
 * one that never arrives (the others get MS_ERR_TIMEOUT).
 * Run plainly, it starts itself under mpirun -n 4 (skipped without MPI). */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_comm_cases.h"

static const char EARLY_EXIT[] = "--early-exit", STUCK_PEER[] = "--stuck-peer";
enum { NOT_BUILT = 77 }; /* exit status of a build without MPI (mpirun passes it on) */
enum { SAW_TIMEOUT = 3, MISSED_TIMEOUT = 4 }; /* exit statuses of the stuck-peer run */

static int64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Run this program under mpirun -n 4 with argument (or none); [OUT] *elapsed_ms.
 * Returns the wait status, or -1 when mpirun could not be started. mpirun is killed
 * after limit_ms. */
static int run_under_mpirun(const char *argument, int64_t limit_ms, int64_t *elapsed_ms)
{
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return -1;
    self[n] = '\0';
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
#ifdef __SANITIZE_ADDRESS__
    setenv("ASAN_OPTIONS", "detect_leaks=0", 1); /* OpenMPI keeps memory until exit */
#endif
    int64_t start = now_ms();
    pid_t pid = fork();
    if (pid == 0) {
        execlp("mpirun", "mpirun", "--oversubscribe", "-n", "4", self, argument, (char *)NULL);
        _exit(127);
    }
    if (pid < 0)
        return -1;
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
        if (now_ms() - start > limit_ms) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            break;
        }
        struct timespec pause = {0, 20 * 1000000};
        nanosleep(&pause, NULL);
    }
    *elapsed_ms = now_ms() - start;
    return status;
}

/* Process 1 exits at once; the others wait in a barrier that cannot complete. Process 1's
 * MPI_Finalize gives up after the world's timeout, so mpirun ends the job. */
static int early_exit(void)
{
    ms_group *world = NULL;
    if (ms_dist_world(&world) != MS_OK)
        return 2;
    ms_group_set_timeout(world, 500);
    if (ms_group_rank(world) == 1)
        exit(0);
    ms_dist_barrier(world);
    return 0;
}

/* Process 1 sleeps far longer than the timeout; the others' all-reduce must fail with
 * MS_ERR_TIMEOUT naming it, and so must every later collective, on any group. */
static int stuck_peer(void)
{
    ms_group *world = NULL;
    if (ms_dist_world(&world) != MS_OK)
        return 2;
    ms_group_set_timeout(world, 500);
    if (ms_group_rank(world) == 1) {
        struct timespec pause = {30, 0};
        nanosleep(&pause, NULL);
        return 0;
    }
    int64_t one = 1;
    ms_tensor *t = new_tensor(MS_F32, one);
    int first = ms_dist_all_reduce(world, t, MS_DIST_SUM);
    int named = strstr(ms_last_error(), "all_reduce: rank 1 did not arrive within 500 ms") != NULL;
    int again = ms_dist_barrier(world);
    ms_tensor_free(t);
    _exit(first == MS_ERR_TIMEOUT && named && again == MS_ERR_TIMEOUT ? SAW_TIMEOUT
                                                                      : MISSED_TIMEOUT);
}

static int run_from_outside(void)
{
    int64_t elapsed = 0;
    int status = run_under_mpirun(NULL, 240000, &elapsed);
    if (status == -1 || (WIFEXITED(status) && WEXITSTATUS(status) == 127)) {
        printf("test_comm_mpi: skipped (mpirun not found)\n");
        return 0;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == NOT_BUILT)
        return 0;
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    status = run_under_mpirun(EARLY_EXIT, 60000, &elapsed);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) != 0);
    EXPECT(elapsed < 30000);
    if (failures)
        fprintf(stderr, "test_comm_mpi: early exit: status %d after %lld ms\n", status,
                (long long)elapsed);
    int before = failures;
    status = run_under_mpirun(STUCK_PEER, 60000, &elapsed);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == SAW_TIMEOUT);
    EXPECT(elapsed < 20000); /* the job ends long before the stuck process wakes */
    if (failures != before)
        fprintf(stderr, "test_comm_mpi: stuck peer: status %d after %lld ms\n", status,
                (long long)elapsed);
    return failures != 0;
}

int main(int argc, char **argv)
{
    if (!ms_mpi_launched())
        return run_from_outside();
    int status = ms_mpi_init();
    if (status == MS_ERR_UNSUPPORTED) {
        printf("test_comm_mpi: skipped (%s)\n", ms_last_error());
        return NOT_BUILT;
    }
    if (argc > 1 && strcmp(argv[1], EARLY_EXIT) == 0)
        return early_exit();
    if (argc > 1 && strcmp(argv[1], STUCK_PEER) == 0)
        return stuck_peer();
    EXPECT_STATUS(MS_OK, status);
    EXPECT_STATUS(MS_OK, ms_mpi_init()); /* once is enough; later calls do nothing */
    ms_group *world = NULL;
    EXPECT_STATUS(MS_OK, ms_dist_world(&world));
    int rank = ms_group_rank(world), size = ms_group_size(world);
    EXPECT(strcmp(ms_group_backend(world), "mpi") == 0);
    ms_spawn *job = NULL;
    int spawned = 0;
    EXPECT_STATUS(MS_ERR_STATE, ms_local_spawn(&job, 2, 0, &spawned));

    collective_cases(NULL);
    for (int members = 1; members < size; members++) {
        int ranks[4] = {0, 1, 2, 3};
        ms_group *first = NULL;
        EXPECT_STATUS(MS_OK, ms_group_new(&first, NULL, ranks, members));
        EXPECT(ms_group_rank(first) == (rank < members ? rank : -1));
        if (rank < members)
            collective_cases(first);
        if (rank < members && members >= 2)
            mismatch_cases(first);
        ms_group_free(first);
    }
    mismatch_cases(NULL);

    int64_t one = 1;
    ms_tensor *count = new_tensor(MS_I32, one);
    *(int32_t *)ms_tensor_data(count) = failures;
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(NULL, count, MS_DIST_SUM));
    int total = *(int32_t *)ms_tensor_data(count);
    ms_tensor_free(count);
    EXPECT_STATUS(MS_OK, ms_mpi_finalize());
    EXPECT_STATUS(MS_ERR_STATE, ms_dist_world(&world));
    if (rank == 0 && total)
        fprintf(stderr, "test_comm_mpi: %d failures over %d processes\n", total, size);
    return total != 0 || failures != 0;
}
