/* moonshard runtime: the raw allocation behind the cuda:N pools and the host pool.
 * runtime/device.c provides them, through the device side once it is loaded. */
#ifndef MS_POOL_H
#define MS_POOL_H

#include <stddef.h>

/* 1 when device N exists and can allocate. */
int ms_device_pool_available(int device);
/* Why no device is usable (static text). */
const char *ms_device_unavailable_reason(void);
/* Device memory of rounded bytes, or NULL. */
void *ms_device_raw_alloc(int device, size_t rounded);
void ms_device_raw_free(int device, void *p);
/* Memory of rounded bytes (64-byte aligned) for the host pool, or NULL: page-locked
 * (cudaHostAlloc) once this process has initialised a CUDA device, ordinary otherwise. */
void *ms_host_raw_alloc(size_t rounded);
void ms_host_raw_free(void *p);

#endif
