/* moonshard runtime: the foreign-write fence - one registered watcher (the store's lazy
 * staging), called by the collectives before a peer or the kernel writes their outputs. */
#include <stdatomic.h>

#include "fence.h"

static _Atomic(ms_fence_watcher) watcher;

void ms_fence_register(ms_fence_watcher w)
{
    atomic_store_explicit(&watcher, w, memory_order_release);
}

void ms_fence_before_foreign_write(const void *p, size_t n)
{
    ms_fence_watcher w = atomic_load_explicit(&watcher, memory_order_acquire);
    if (w && n)
        w(p, n);
}
