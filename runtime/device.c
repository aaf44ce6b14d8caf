/* moonshard runtime: the device side, loaded on first use. A CUDA build puts it in
 * libmoonshard_cuda.so next to this library; a process that never uses a device never loads it. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "pool.h"
#include "cuda/gpu.h"
#include "ops/backend.h"

static struct {
    pthread_once_t once;
    const ms_device_backend *backend; /* written once, inside once */
    char reason[768];                 /* why there is no backend */
} device = {.once = PTHREAD_ONCE_INIT};

#ifdef MS_CUDA_BACKEND_FILE
/* The backend file in this library's folder (build/, the installed libdir, a rock's lib
 * folder), else by name on the loader's search path. */
static void *open_backend_file(void)
{
    Dl_info self;
    char path[4096];
    const char *slash = NULL;
    if (dladdr((void *)&ms_cuda_device_count, &self) && self.dli_fname)
        slash = strrchr(self.dli_fname, '/');
    if (slash && snprintf(path, sizeof path, "%.*s/%s", (int)(slash - self.dli_fname),
                          self.dli_fname, MS_CUDA_BACKEND_FILE) < (int)sizeof path) {
        void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (handle)
            return handle;
    }
    return dlopen(MS_CUDA_BACKEND_FILE, RTLD_NOW | RTLD_LOCAL);
}

static void load_backend(void)
{
    void *handle = open_backend_file();
    if (!handle) {
        const char *error = dlerror();
        snprintf(device.reason, sizeof device.reason, "the CUDA backend could not be loaded: %s",
                 error ? error : MS_CUDA_BACKEND_FILE);
        return;
    }
    const ms_device_backend *backend = dlsym(handle, MS_DEVICE_BACKEND_SYMBOL);
    if (!backend || backend->abi != MS_DEVICE_BACKEND_ABI ||
        strcmp(backend->version, MS_VERSION) != 0) {
        snprintf(device.reason, sizeof device.reason, "the CUDA backend %s is not the one of "
                 "moonshard %s", MS_CUDA_BACKEND_FILE, MS_VERSION);
        dlclose(handle);
        return;
    }
    __atomic_store_n(&device.backend, backend, __ATOMIC_RELEASE);
}
#else
static void load_backend(void)
{
    snprintf(device.reason, sizeof device.reason, "this build has no CUDA support (nvcc was "
             "not found when it was configured)");
}
#endif

/* The backend, loading it on the first call; NULL when there is none (device.reason says why). */
static const ms_device_backend *backend(void)
{
    pthread_once(&device.once, load_backend);
    return device.backend;
}

/* The backend if it is loaded already (never loads it). */
static const ms_device_backend *loaded(void)
{
    return __atomic_load_n(&device.backend, __ATOMIC_ACQUIRE);
}

const ms_ops_backend *ms_device_ops(void)
{
    const ms_device_backend *b = loaded();
    return b ? b->ops : NULL;
}

int ms_device_pool_available(int device_index)
{
    const ms_device_backend *b = backend();
    return b && b->pool_available(device_index);
}

const char *ms_device_unavailable_reason(void)
{
    const ms_device_backend *b = backend();
    return b ? b->pool_unavailable_reason() : device.reason;
}

/* Only ever called for a pool that ms_device_pool_available accepted (the backend is loaded). */
void *ms_device_raw_alloc(int device_index, size_t rounded)
{
    const ms_device_backend *b = backend();
    return b ? b->device_alloc(device_index, rounded) : NULL;
}

void ms_device_raw_free(int device_index, void *p)
{
    const ms_device_backend *b = loaded();
    if (b)
        b->device_free(device_index, p);
}

/* The host pool: ordinary memory until the backend is loaded; its free tells the kinds apart. */
void *ms_host_raw_alloc(size_t rounded)
{
    const ms_device_backend *b = loaded();
    if (b)
        return b->host_alloc(rounded);
    void *p = NULL;
    return posix_memalign(&p, 64, rounded) == 0 ? p : NULL;
}

void ms_host_raw_free(void *p)
{
    const ms_device_backend *b = loaded();
    if (b)
        b->host_free(p);
    else
        free(p);
}

int ms_cuda_device_count(int *count)
{
    if (!count)
        return MS_FAIL(MS_ERR_INVALID, "cuda_device_count: count must not be NULL");
    const ms_device_backend *b = backend();
    if (b)
        return b->device_count(count);
    *count = 0;
    return MS_OK;
}

const char *ms_cuda_unavailable_reason(void)
{
    const ms_device_backend *b = backend();
    return b ? b->unavailable_reason() : device.reason;
}

int ms_cuda_synchronize(int device_index)
{
    const ms_device_backend *b = backend();
    if (b)
        return b->synchronize(device_index);
    return MS_FAIL(MS_ERR_DEVICE, "cuda_synchronize: cuda:%d is not available (%s)",
                   device_index, device.reason);
}

int ms_nccl_init(void)
{
    const ms_device_backend *b = backend();
    if (b && b->nccl_init)
        return b->nccl_init();
    if (!b)
        return MS_FAIL(MS_ERR_UNSUPPORTED, "nccl_init: no NCCL without CUDA (%s)", device.reason);
    return MS_FAIL(MS_ERR_UNSUPPORTED, "nccl_init: this build has no NCCL support (it needs "
                                       "CUDA and nccl.h when configured)");
}

int ms_nccl_finalize(void)
{
    const ms_device_backend *b = loaded();
    return b && b->nccl_finalize ? b->nccl_finalize() : MS_OK;
}
