/* moonshard runtime: the foreign-write fence. Code about to let something other than this
 * process's own stores write memory (a peer rank, the kernel, a device) announces it here. */
#ifndef MS_FENCE_H
#define MS_FENCE_H

#include <stddef.h>

/* A watcher of writes this process's page faults cannot see (the store's copy-on-write
 * staging registers one): called before [p, p + n) is written by something foreign. */
typedef void (*ms_fence_watcher)(const void *p, size_t n);

/* Register watcher (at most one; registering the same one again is harmless). */
void ms_fence_register(ms_fence_watcher watcher);

/* [p, p + n) is about to be written by a peer rank through shared memory, the kernel
 * (MPI's single-copy transfers) or a device: the registered watcher runs first. Costs one
 * atomic load when no watcher is registered. */
void ms_fence_before_foreign_write(const void *p, size_t n);

#endif
