/* moonshard CUDA backend: device discovery, per-device streams and cuBLAS handles, and the
 * raw cudaMalloc behind the cuda:N pools (alloc.c caches the blocks and keeps statistics). */
#include <pthread.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "gpu.h"
#include "pool.h"

enum { MAX_DEVICES = MS_MAX_POOLS - MS_POOL_CUDA0 };

typedef struct device_state {
    int ready;
    cudaStream_t compute, comm;
    cublasHandle_t blas;
} device_state;

static struct {
    pthread_once_t probe_once;
    int count;
    char reason[160];
    pthread_mutex_t lock;
    device_state devices[MAX_DEVICES];
} cuda = {.probe_once = PTHREAD_ONCE_INIT, .lock = PTHREAD_MUTEX_INITIALIZER};

/* Counting devices starts CUDA in this process, so it happens on the first request only. */
static void probe_devices(void)
{
    int count = 0;
    cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) {
        cudaGetLastError();
        snprintf(cuda.reason, sizeof cuda.reason,
                 "no usable CUDA device (cudaGetDeviceCount: %s)", cudaGetErrorString(error));
        count = 0;
    } else if (count == 0) {
        snprintf(cuda.reason, sizeof cuda.reason, "no CUDA device on this machine");
    }
    cuda.count = count < MAX_DEVICES ? count : MAX_DEVICES;
}

static int device_count(void)
{
    pthread_once(&cuda.probe_once, probe_devices);
    return cuda.count;
}

int ms_cuda_started(void)
{
    return __atomic_load_n(&cuda.count, __ATOMIC_ACQUIRE) > 0;
}

int ms_cuda_device_count(int *count)
{
    if (!count)
        return MS_FAIL(MS_ERR_INVALID, "cuda_device_count: count must not be NULL");
    *count = device_count();
    return MS_OK;
}

const char *ms_cuda_unavailable_reason(void)
{
    device_count();
    return cuda.reason;
}

int ms_device_pool_available(int device)
{
    return device >= 0 && device < device_count();
}

const char *ms_device_unavailable_reason(void)
{
    return cuda.reason[0] ? cuda.reason : "no such CUDA device on this machine";
}

int ms_cuda_status_at(const char *file, int line, cudaError_t error, const char *what)
{
    if (error == cudaSuccess)
        return MS_OK;
    cudaGetLastError(); /* clear the sticky copy of a non-fatal error */
    return ms_fail_at(file, line, MS_ERR_DEVICE, "%s: %s (%s)", what, cudaGetErrorString(error),
                      cudaGetErrorName(error));
}

int ms_cublas_status_at(const char *file, int line, cublasStatus_t status, const char *what)
{
    if (status == CUBLAS_STATUS_SUCCESS)
        return MS_OK;
    return ms_fail_at(file, line, status == CUBLAS_STATUS_ALLOC_FAILED ? MS_ERR_OOM : MS_ERR_DEVICE,
                      "%s: cuBLAS failed: %s", what, cublasGetStatusString(status));
}

int ms_cuda_launched(const char *op, int error)
{
    return MS_CUDA_STATUS((cudaError_t)error, op);
}

static int create_device_state(int device, device_state *state)
{
    MS_CUDA_CHECK(cudaStreamCreateWithFlags(&state->compute, cudaStreamNonBlocking),
                  "cuda: creating the compute stream");
    MS_CUDA_CHECK(cudaStreamCreateWithFlags(&state->comm, cudaStreamNonBlocking),
                  "cuda: creating the communication stream");
    MS_CUBLAS_CHECK(cublasCreate(&state->blas), "cuda: creating the cuBLAS handle");
    MS_CUBLAS_CHECK(cublasSetStream(state->blas, state->compute), "cuda: cublasSetStream");
    (void)device;
    state->ready = 1;
    return MS_OK;
}

int ms_cuda_use_device(int device)
{
    if (!ms_device_pool_available(device))
        return MS_FAIL(MS_ERR_DEVICE, "cuda: device %d is not available (%s)", device,
                       ms_device_unavailable_reason());
    MS_CUDA_CHECK(cudaSetDevice(device), "cuda: cudaSetDevice");
    device_state *state = &cuda.devices[device];
    if (__atomic_load_n(&state->ready, __ATOMIC_ACQUIRE))
        return MS_OK;
    pthread_mutex_lock(&cuda.lock);
    int status = state->ready ? MS_OK : create_device_state(device, state);
    pthread_mutex_unlock(&cuda.lock);
    return status;
}

cudaStream_t ms_cuda_compute_stream(int device) { return cuda.devices[device].compute; }

cudaStream_t ms_cuda_comm_stream(int device) { return cuda.devices[device].comm; }

cublasHandle_t ms_cuda_blas(int device) { return cuda.devices[device].blas; }

int ms_cuda_synchronize(int device)
{
    MS_CHECK(ms_cuda_use_device(device));
    MS_CUDA_CHECK(cudaStreamSynchronize(cuda.devices[device].comm),
                  "cuda_synchronize: communication stream");
    MS_CUDA_CHECK(cudaStreamSynchronize(cuda.devices[device].compute),
                  "cuda_synchronize: compute stream");
    return MS_OK;
}

/* alloc.c reuses freed blocks without telling us; work still queued on the compute stream
 * stays ordered before the block's next user, who runs on the same stream. */
void *ms_device_raw_alloc(int device, size_t rounded)
{
    if (ms_cuda_use_device(device) != MS_OK)
        return NULL;
    void *p = NULL;
    if (cudaMalloc(&p, rounded) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

void ms_device_raw_free(int device, void *p)
{
    if (cudaSetDevice(device) == cudaSuccess)
        cudaFree(p);
    cudaGetLastError();
}
