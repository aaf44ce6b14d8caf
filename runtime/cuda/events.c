/* moonshard CUDA backend: ordering between each device's compute and communication streams.
 * Buffers of collectives in flight are listed with the event recorded after them; an op that
 * touches one makes the compute stream wait for that event, and only then. */
#include <pthread.h>

#include "cuda_internal.h"

enum { MAX_PENDING = 256 };

typedef struct pending_range {
    int device;
    uintptr_t begin, end;
    cudaEvent_t done;
} pending_range;

static struct {
    pthread_mutex_t lock;
    int count;
    pending_range ranges[MAX_PENDING];
} pending = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Caller holds the lock: the compute stream of the range's device waits, the entry goes. */
static int settle(int index)
{
    pending_range range = pending.ranges[index];
    pending.ranges[index] = pending.ranges[--pending.count];
    int status = MS_CUDA_STATUS(cudaStreamWaitEvent(ms_cuda_compute_stream(range.device),
                                                    range.done, 0),
                                "cuda: waiting for a collective");
    cudaEventDestroy(range.done);
    return status;
}

int ms_cuda_comm_wait_compute(int device)
{
    cudaEvent_t ready;
    MS_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming),
                  "cuda: creating an event");
    int status = MS_CUDA_STATUS(cudaEventRecord(ready, ms_cuda_compute_stream(device)),
                                "cuda: recording the compute stream");
    if (status == MS_OK)
        status = MS_CUDA_STATUS(cudaStreamWaitEvent(ms_cuda_comm_stream(device), ready, 0),
                                "cuda: ordering the communication stream");
    cudaEventDestroy(ready);
    return status;
}

int ms_cuda_mark_pending(int device, const void *begin, size_t nbytes)
{
    cudaEvent_t own;
    MS_CUDA_CHECK(cudaEventCreateWithFlags(&own, cudaEventDisableTiming),
                  "cuda: creating an event");
    int status = MS_CUDA_STATUS(cudaEventRecord(own, ms_cuda_comm_stream(device)),
                                "cuda: recording the communication stream");
    if (status != MS_OK) {
        cudaEventDestroy(own);
        return status;
    }
    pthread_mutex_lock(&pending.lock);
    if (pending.count == MAX_PENDING) /* full: the oldest entries' waits happen now */
        status = settle(0);
    pending.ranges[pending.count++] = (pending_range){device, (uintptr_t)begin,
                                                      (uintptr_t)begin + nbytes, own};
    pthread_mutex_unlock(&pending.lock);
    return status;
}

int ms_cuda_await(const ms_tensor *t)
{
    if (!t || !t->storage || !t->storage->data || __atomic_load_n(&pending.count,
                                                                  __ATOMIC_ACQUIRE) == 0)
        return MS_OK;
    uintptr_t begin = (uintptr_t)t->storage->data, end = begin + t->storage->nbytes;
    int status = MS_OK;
    pthread_mutex_lock(&pending.lock);
    for (int i = pending.count - 1; i >= 0 && status == MS_OK; i--)
        if (pending.ranges[i].begin < end && begin < pending.ranges[i].end)
            status = settle(i);
    pthread_mutex_unlock(&pending.lock);
    return status;
}
