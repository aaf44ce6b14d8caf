/* moonshard CUDA backend: device discovery, per-device streams and cuBLAS handles, and the
 * raw cudaMalloc behind the cuda:N pools (alloc.c caches the blocks and keeps statistics). */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cuda_internal.h"

enum { MAX_DEVICES = MS_MAX_POOLS - MS_POOL_CUDA0 };

typedef struct device_state {
    int ready;
    cudaStream_t compute, comm;
    cublasHandle_t blas;
} device_state;

static struct {
    pthread_once_t probe_once;
    int count;
    int started; /* this process has made a device current */
    char reason[160];
    pthread_mutex_t lock;
    device_state devices[MAX_DEVICES];
} cuda = {.probe_once = PTHREAD_ONCE_INIT, .lock = PTHREAD_MUTEX_INITIALIZER};

/* Counting devices with the CUDA runtime starts CUDA in the calling process, and a process
 * that started CUDA cannot fork ranks that use it (dist.spawn). So a short-lived child
 * counts them; this process starts CUDA only when it first uses a device. */
typedef struct probe_result {
    int count;
    char reason[160];
} probe_result;

static void count_with_cuda_runtime(probe_result *result)
{
    int count = 0;
    cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) {
        snprintf(result->reason, sizeof result->reason,
                 "no usable CUDA device (cudaGetDeviceCount: %s)", cudaGetErrorString(error));
        count = 0;
    } else if (count == 0) {
        snprintf(result->reason, sizeof result->reason, "no CUDA device on this machine");
    }
    result->count = count;
}

enum { PROBE_TIMEOUT_MS = 20000 };

static void probe_devices(void)
{
    probe_result result = {0, ""};
    int fds[2];
    pid_t child = -1;
    if (pipe(fds) == 0) {
        child = fork();
        if (child == 0) {
            close(fds[0]);
            count_with_cuda_runtime(&result);
            ssize_t written = write(fds[1], &result, sizeof result);
            _exit(written == (ssize_t)sizeof result ? 0 : 1);
        }
        close(fds[1]);
    }
    if (child < 0) {
        snprintf(result.reason, sizeof result.reason, "no usable CUDA device (could not fork "
                 "the device probe: %s)", strerror(errno));
    } else {
        struct pollfd ready = {.fd = fds[0], .events = POLLIN};
        ssize_t got = poll(&ready, 1, PROBE_TIMEOUT_MS) == 1
                          ? read(fds[0], &result, sizeof result) : -1;
        if (got != (ssize_t)sizeof result) {
            kill(child, SIGKILL);
            result = (probe_result){0, "no usable CUDA device (the device probe did not "
                                       "answer)"};
        }
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {
        }
        close(fds[0]);
    }
    result.reason[sizeof result.reason - 1] = '\0';
    memcpy(cuda.reason, result.reason, sizeof cuda.reason);
    cuda.count = result.count < MAX_DEVICES ? result.count : MAX_DEVICES;
}

static int device_count(void)
{
    pthread_once(&cuda.probe_once, probe_devices);
    return cuda.count;
}

int ms_cuda_started(void)
{
    return __atomic_load_n(&cuda.started, __ATOMIC_ACQUIRE);
}

int ms_cuda_count_devices(int *count)
{
    if (!count)
        return MS_FAIL(MS_ERR_INVALID, "cuda_device_count: count must not be NULL");
    *count = device_count();
    return MS_OK;
}

const char *ms_cuda_probe_reason(void)
{
    device_count();
    return cuda.reason;
}

int ms_cuda_pool_available(int device)
{
    return device >= 0 && device < device_count();
}

const char *ms_cuda_pool_reason(void)
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
    if (!ms_cuda_pool_available(device))
        return MS_FAIL(MS_ERR_DEVICE, "cuda: device %d is not available (%s)", device,
                       ms_cuda_pool_reason());
    MS_CUDA_CHECK(cudaSetDevice(device), "cuda: cudaSetDevice");
    __atomic_store_n(&cuda.started, 1, __ATOMIC_RELEASE);
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

int ms_cuda_sync_streams(int device)
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
void *ms_cuda_raw_alloc(int device, size_t rounded)
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

void ms_cuda_raw_free(int device, void *p)
{
    if (cudaSetDevice(device) == cudaSuccess)
        cudaFree(p);
    cudaGetLastError();
}
