/* moonshard runtime: the cuda:N pools of a build without CUDA.
 * Every device is absent; allocation on one never happens because ms_pool_find refuses. */
#ifndef MS_WITH_CUDA
#include "pool.h"

int ms_device_pool_available(int device)
{
    (void)device;
    return 0;
}

const char *ms_device_unavailable_reason(void) { return "this build has no CUDA support"; }

void *ms_device_raw_alloc(int device, size_t rounded)
{
    (void)device;
    (void)rounded;
    return NULL;
}

void ms_device_raw_free(int device, void *p)
{
    (void)device;
    (void)p;
}
#endif
