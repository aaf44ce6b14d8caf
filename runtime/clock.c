/* moonshard runtime: the monotonic clock that benchmarks and FSDP's communication timers
 * read through the FFI. */
#include <time.h>

#include "ms.h"

double ms_clock_seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}
