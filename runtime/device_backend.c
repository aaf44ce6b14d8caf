/* moonshard runtime: the one symbol libmoonshard_cuda.so exports (ops/backend.h), which
 * runtime/device.c finds with dlsym: the cuda place's ops, its pools and the nccl backend. */
#include "cuda/cuda_internal.h"
#include "version.h"

__attribute__((visibility("default"))) const ms_device_backend ms_cuda_backend = {
    .abi = MS_DEVICE_BACKEND_ABI,
    .version = MS_VERSION,
    .ops = &ms_cuda_ops,
    .device_count = ms_cuda_count_devices,
    .unavailable_reason = ms_cuda_probe_reason,
    .pool_available = ms_cuda_pool_available,
    .pool_unavailable_reason = ms_cuda_pool_reason,
    .synchronize = ms_cuda_sync_streams,
    .device_alloc = ms_cuda_raw_alloc,
    .device_free = ms_cuda_raw_free,
    .host_alloc = ms_cuda_host_alloc,
    .host_free = ms_cuda_host_free,
#ifdef MS_WITH_NCCL
    .nccl_init = ms_nccl_open,
    .nccl_finalize = ms_nccl_close,
#endif
};
