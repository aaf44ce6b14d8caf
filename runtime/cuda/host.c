/* moonshard CUDA backend: the host pool's memory: page-locked (cudaHostAlloc) once this
 * process uses a device, so copies to and from the device run at full speed. */
#include <stdlib.h>

#include "cuda_internal.h"

void *ms_cuda_host_alloc(size_t rounded)
{
    void *p = NULL;
    if (ms_cuda_started()) {
        if (cudaHostAlloc(&p, rounded, cudaHostAllocPortable) == cudaSuccess)
            return p;
        cudaGetLastError();
        return NULL;
    }
    if (posix_memalign(&p, 64, rounded) != 0)
        return NULL;
    return p;
}

/* Blocks made before CUDA started are ordinary memory; CUDA tells the two kinds apart. */
void ms_cuda_host_free(void *p)
{
    if (ms_cuda_started()) {
        struct cudaPointerAttributes attributes;
        if (cudaPointerGetAttributes(&attributes, p) == cudaSuccess &&
            attributes.type == cudaMemoryTypeHost) {
            cudaFreeHost(p);
            return;
        }
        cudaGetLastError();
    }
    free(p);
}
