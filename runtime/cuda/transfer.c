/* moonshard CUDA backend: bytes between host memory and a device, and between devices, for
 * the copies runtime/ops/copy.c stages across places. Each finishes before returning. */
#include "cuda_internal.h"

/* Bytes between host memory and a dense device block, after the compute stream's work. */
static int transfer(int device, void *to, const void *from, size_t nbytes,
                    enum cudaMemcpyKind kind)
{
    if (nbytes == 0)
        return MS_OK;
    cudaStream_t stream = ms_cuda_compute_stream(device);
    MS_CUDA_CHECK(cudaMemcpyAsync(to, from, nbytes, kind, stream), "copy: cudaMemcpyAsync");
    MS_CUDA_CHECK(cudaStreamSynchronize(stream), "copy: waiting for the transfer");
    return MS_OK;
}

int ms_cuda_to_device(int device, void *dst, const void *src, size_t nbytes)
{
    return transfer(device, dst, src, nbytes, cudaMemcpyHostToDevice);
}

int ms_cuda_to_host(int device, void *dst, const void *src, size_t nbytes)
{
    return transfer(device, dst, src, nbytes, cudaMemcpyDeviceToHost);
}

int ms_cuda_between_devices(void *dst, int dst_device, const void *src, int src_device,
                            size_t nbytes)
{
    MS_CUDA_CHECK(cudaMemcpyPeer(dst, dst_device, src, src_device, nbytes),
                  "copy: cudaMemcpyPeer");
    return MS_OK;
}
