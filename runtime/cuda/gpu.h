/* moonshard runtime: CUDA devices and the nccl collectives backend (public part, in ms.h).
 * Every build has these functions; without CUDA or without a GPU they report that cleanly. */
#ifndef MS_GPU_H
#define MS_GPU_H

#include "../ms.h"

/* ffi-begin */
/* ---- CUDA devices ----
 * Tensors in pool "cuda:N" run every op of ops.h on device N (ops with operands on different
 * devices fail with MS_ERR_DEVICE); ms_copy also moves data between cpu/host and cuda:N.
 * Each device has a compute stream, which runs ops and copies, and a communication stream,
 * which runs NCCL collectives; events order the two. CUDA starts in a process when it first
 * uses a device (counting devices happens in a short-lived child), and a process where it
 * started cannot fork ranks that use CUDA: call dist.spawn before touching a device. */

/* [OUT] *count: usable CUDA devices; 0 (and MS_OK) in a build without CUDA or on a machine
 * without a GPU or driver. */
int ms_cuda_device_count(int *count);
/* Why no CUDA device is usable ("" when one is). Static storage. */
const char *ms_cuda_unavailable_reason(void);
/* Wait until the work queued on device's compute and communication streams has finished. */
int ms_cuda_synchronize(int device);

/* ---- the nccl backend ----
 * ms_nccl_init turns the process group this process already has (local from dist.spawn, or
 * mpi) into NCCL communicators: rank 0's unique id travels through that group's broadcast
 * (the local segment or MPI_Bcast), each rank uses device local_rank % device_count, and the
 * nccl world replaces the installed world until ms_nccl_finalize. Collectives then take
 * contiguous tensors on the rank's device and run on its communication stream: the host
 * does not wait, and later ops that touch the buffers wait for the collective on the device.
 * Members agree on each call through the bootstrap group first, so mismatched calls fail
 * with MS_ERR_MISMATCH and dead peers with MS_ERR_PEER_DIED instead of hanging the GPU.
 * MS_ERR_UNSUPPORTED in a build without NCCL; MS_ERR_DEVICE without a device. */
int ms_nccl_init(void);
/* Destroy the nccl communicators and reinstall the bootstrap world. */
int ms_nccl_finalize(void);
/* ffi-end */

#endif
