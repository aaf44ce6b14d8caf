/* moonshard runtime: the number of compute threads of this process.
 * BLAS follows it; local ranks set it after fork to cores / local_world_size. */
#include <cblas.h>

#include "internal.h"

static int num_threads; /* 0 until set: BLAS's own default applies */

int ms_set_num_threads(int n)
{
    if (n < 1)
        return MS_FAIL(MS_ERR_INVALID, "set_num_threads: %d threads (at least 1)", n);
    num_threads = n;
    openblas_set_num_threads(n);
    return MS_OK;
}

int ms_get_num_threads(void)
{
    return num_threads > 0 ? num_threads : openblas_get_num_threads();
}
