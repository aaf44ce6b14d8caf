/* moonshard runtime: the raw device allocation behind the cuda:N pools.
 * runtime/cuda/ provides these with CUDA; device_none.c provides them without. */
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

#endif
