/* moonshard runtime: what a build without CUDA (or without NCCL) has in place of
 * runtime/cuda/ and comm/nccl.c: no device exists, the host pool uses ordinary memory. */
#include <stdlib.h>

#include "internal.h"
#include "pool.h"
#include "cuda/gpu.h"

#ifndef MS_WITH_CUDA
static const char no_cuda[] = "this build has no CUDA support (nvcc was not found when it "
                              "was configured)";

int ms_device_pool_available(int device)
{
    (void)device;
    return 0;
}

const char *ms_device_unavailable_reason(void) { return no_cuda; }

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

void *ms_host_raw_alloc(size_t rounded)
{
    void *p = NULL;
    return posix_memalign(&p, 64, rounded) == 0 ? p : NULL;
}

void ms_host_raw_free(void *p) { free(p); }

int ms_cuda_device_count(int *count)
{
    if (!count)
        return MS_FAIL(MS_ERR_INVALID, "cuda_device_count: count must not be NULL");
    *count = 0;
    return MS_OK;
}

const char *ms_cuda_unavailable_reason(void) { return no_cuda; }

int ms_cuda_synchronize(int device)
{
    return MS_FAIL(MS_ERR_DEVICE, "cuda_synchronize: cuda:%d is not available (%s)", device,
                   no_cuda);
}
#endif

#ifndef MS_WITH_NCCL
int ms_nccl_init(void)
{
    return MS_FAIL(MS_ERR_UNSUPPORTED, "nccl_init: this build has no NCCL support (it needs "
                                       "CUDA and nccl.h when configured)");
}

int ms_nccl_finalize(void) { return MS_OK; }
#endif
