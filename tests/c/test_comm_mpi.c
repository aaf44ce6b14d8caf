/* C tests of the mpi backend: the shared collective cases on groups of 1 to 4 processes
 * and mismatches. Run plainly, it starts itself under mpirun -n 4 (skipped without MPI). */
#include <unistd.h>

#include "test_comm_cases.h"

static int run_under_mpirun(void)
{
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return 1;
    self[n] = '\0';
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
#ifdef __SANITIZE_ADDRESS__
    setenv("ASAN_OPTIONS", "detect_leaks=0", 1); /* OpenMPI keeps memory until exit */
#endif
    execlp("mpirun", "mpirun", "--oversubscribe", "-n", "4", self, (char *)NULL);
    printf("test_comm_mpi: skipped (mpirun not found)\n");
    return 0;
}

int main(void)
{
    if (!ms_mpi_launched())
        return run_under_mpirun();
    if (ms_mpi_init() == MS_ERR_UNSUPPORTED) {
        printf("test_comm_mpi: skipped (%s)\n", ms_last_error());
        return 0;
    }
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
        EXPECT_STATUS(MS_OK, ms_dist_new_group(&first, NULL, ranks, members));
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
