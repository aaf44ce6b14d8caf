/* moonshard runtime: the number of compute threads of this process, decided once. BLAS and
 * the CPU kernels' worker pool follow it; local ranks share the cores after fork. */
#include <cblas.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

static int num_threads; /* 0 until decided */

static int usable_cores(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        return CPU_COUNT(&set);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

/* A whole number >= 1 from the environment variable name, or 0 (unset, or not such a
 * number: then said on stderr, as OpenMP does for OMP_NUM_THREADS). */
static int env_count(const char *name)
{
    const char *text = getenv(name);
    if (!text || !*text)
        return 0;
    char *end;
    long n = strtol(text, &end, 10);
    if (*end == '\0' && n >= 1 && n <= 4096)
        return (int)n;
    static int warned; /* once per program: forked ranks inherit it */
    if (!warned++)
        fprintf(stderr, "moonshard: ignoring %s=%s (not a whole number from 1 to 4096)\n",
                name, text);
    return 0;
}

static void apply(int n)
{
    num_threads = n;
    if (openblas_get_num_threads() != n)
        openblas_set_num_threads(n);
}

void ms_threads_share_cores(int local_ranks)
{
    int n = env_count("MOONSHARD_NUM_THREADS");
    if (n == 0) {
        n = usable_cores() / (local_ranks > 0 ? local_ranks : 1);
        if (n < 1)
            n = 1;
    }
    apply(n);
}

int ms_set_num_threads(int n)
{
    if (n < 1)
        return MS_FAIL(MS_ERR_INVALID, "set_num_threads: %d threads (at least 1)", n);
    apply(n);
    return MS_OK;
}

/* Decided when the library loads, so BLAS calls made before any other op use it too. */
__attribute__((constructor)) static void decide_at_load(void) { ms_get_num_threads(); }

int ms_get_num_threads(void)
{
    if (num_threads == 0) { /* processes started by mpirun share the node's cores too */
        int local = env_count("OMPI_COMM_WORLD_LOCAL_SIZE");
        ms_threads_share_cores(local > 0 ? local : 1);
    }
    return num_threads;
}
