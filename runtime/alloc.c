/* moonshard runtime: one caching allocator per memory pool, with exact statistics.
 * Blocks are rounded to size classes (4 per power of two) and kept on per-class free lists;
 * a device block's list link lives in a host node, since the host cannot write into it. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "arena.h"
#include "internal.h"
#include "pool.h"
#include "profile.h"

enum { CLASS_COUNT = 4 * 64, MIN_BLOCK = 64 };

typedef struct free_block {
    struct free_block *next;
    void *device_block; /* cuda pools: the cached block this host node stands for */
} free_block;

typedef struct pool {
    const char *name;
    pthread_mutex_t lock;
    ms_memory_stats stats;
    free_block *free_lists[CLASS_COUNT];
    int64_t cached_bytes;
    ms_arena *arena;        /* cpu: where blocks of at least arena_min_block come from */
    size_t arena_min_block;
} pool;

static pool pools[MS_MAX_POOLS] = {
    [MS_POOL_CPU] = {.name = "cpu", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_HOST] = {.name = "host", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 0] = {.name = "cuda:0", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 1] = {.name = "cuda:1", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 2] = {.name = "cuda:2", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 3] = {.name = "cuda:3", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 4] = {.name = "cuda:4", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 5] = {.name = "cuda:5", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 6] = {.name = "cuda:6", .lock = PTHREAD_MUTEX_INITIALIZER},
    [MS_POOL_CUDA0 + 7] = {.name = "cuda:7", .lock = PTHREAD_MUTEX_INITIALIZER},
};

/* Size class of n bytes: classes split each power of two into four steps, so a block
 * wastes at most a quarter of its size. */
static int size_class(size_t n, size_t *rounded)
{
    if (n <= MIN_BLOCK) {
        *rounded = MIN_BLOCK;
        return 0;
    }
    int msb = 63 - __builtin_clzll((unsigned long long)(n - 1));
    size_t step = (size_t)1 << (msb - 2 > 0 ? msb - 2 : 0);
    size_t r = (n + step - 1) / step * step;
    *rounded = r;
    int sub = (int)((r - ((size_t)1 << msb)) / step);
    if (sub > 3) { /* r reached the next power of two */
        msb += 1;
        sub = 0;
    }
    return msb * 4 + sub;
}

int ms_pool_find(const char *name, int *pool_id)
{
    if (!name || !pool_id)
        return MS_FAIL(MS_ERR_INVALID, "pool: name and pool_id must not be NULL");
    for (int i = 0; i < MS_MAX_POOLS; i++) {
        if (pools[i].name && strcmp(pools[i].name, name) == 0) {
            if (i >= MS_POOL_CUDA0 && !ms_device_pool_available(i - MS_POOL_CUDA0))
                return MS_FAIL(MS_ERR_DEVICE, "pool: %s is not available (%s)", name,
                               ms_device_unavailable_reason());
            *pool_id = i;
            return MS_OK;
        }
    }
    return MS_FAIL(MS_ERR_NOT_FOUND, "pool: no pool named '%s' (expected cpu, host or cuda:N)",
                   name);
}

const char *ms_pool_name(int pool_id)
{
    if (pool_id < 0 || pool_id >= MS_MAX_POOLS)
        return NULL;
    return pools[pool_id].name;
}

static int check_pool(const char *what, int pool_id)
{
    if (pool_id < 0 || pool_id >= MS_MAX_POOLS)
        return MS_FAIL(MS_ERR_INVALID, "%s: pool id %d out of range", what, pool_id);
    return MS_OK;
}

static void *raw_alloc(int pool_id, size_t rounded)
{
    if (pool_id >= MS_POOL_CUDA0)
        return ms_device_raw_alloc(pool_id - MS_POOL_CUDA0, rounded);
    if (pool_id == MS_POOL_HOST)
        return ms_host_raw_alloc(rounded);
    /* Blocks of 2 MiB and more sit on huge pages where the kernel has them: an async save
     * write-protects its sources (runtime/store/snapshot.c), one page-table entry per page. */
    enum { HUGE_PAGE_BYTES = 2 << 20, PAGE_BYTES = 4096 };
    pool *pl = &pools[pool_id];
    if (pl->arena && rounded >= pl->arena_min_block) {
        void *p = ms_arena_alloc(pl->arena, rounded,
                                 rounded >= HUGE_PAGE_BYTES ? HUGE_PAGE_BYTES : PAGE_BYTES);
        if (p && rounded >= HUGE_PAGE_BYTES) /* shared memory too, where the kernel allows */
            madvise(p, rounded, MADV_HUGEPAGE);
        if (p)
            return p;
    }
    void *p = NULL;
    if (posix_memalign(&p, rounded >= HUGE_PAGE_BYTES ? HUGE_PAGE_BYTES : 64, rounded) != 0)
        return NULL;
    if (rounded >= HUGE_PAGE_BYTES)
        madvise(p, rounded, MADV_HUGEPAGE);
    return p;
}

static void raw_free(int pool_id, void *p, size_t rounded)
{
    if (pool_id >= MS_POOL_CUDA0)
        ms_device_raw_free(pool_id - MS_POOL_CUDA0, p);
    else if (pool_id == MS_POOL_HOST)
        ms_host_raw_free(p);
    else if (ms_arena_owns(pools[pool_id].arena, p))
        ms_arena_free(pools[pool_id].arena, p, rounded);
    else
        free(p);
}

/* The bytes of size class c (size_class's inverse). */
static size_t class_bytes(int c)
{
    if (c == 0)
        return MIN_BLOCK;
    int msb = c / 4;
    size_t step = (size_t)1 << (msb - 2 > 0 ? msb - 2 : 0);
    return ((size_t)1 << msb) + (size_t)(c % 4) * step;
}

static void release_cached(int pool_id, pool *pl)
{
    for (int c = 0; c < CLASS_COUNT; c++) {
        while (pl->free_lists[c]) {
            free_block *b = pl->free_lists[c];
            pl->free_lists[c] = b->next;
            if (pool_id >= MS_POOL_CUDA0) {
                raw_free(pool_id, b->device_block, class_bytes(c));
                free(b);
            } else {
                raw_free(pool_id, b, class_bytes(c));
            }
        }
    }
    pl->stats.reserved -= pl->cached_bytes;
    pl->cached_bytes = 0;
}

static int pool_alloc(int pool_id, size_t nbytes, void **ptr);
static int pool_free(int pool_id, void *ptr, size_t nbytes);

int ms_pool_alloc(int pool_id, size_t nbytes, void **ptr)
{
    if (__builtin_expect(!ms_profile_on, 1))
        return pool_alloc(pool_id, nbytes, ptr);
    ms_profile_frame frame;
    ms_profile_begin(&frame);
    int status = pool_alloc(pool_id, nbytes, ptr);
    ms_profile_end(&frame, MS_PROF_ALLOCATOR);
    return status;
}

int ms_pool_free(int pool_id, void *ptr, size_t nbytes)
{
    if (__builtin_expect(!ms_profile_on, 1))
        return pool_free(pool_id, ptr, nbytes);
    ms_profile_frame frame;
    ms_profile_begin(&frame);
    int status = pool_free(pool_id, ptr, nbytes);
    ms_profile_end(&frame, MS_PROF_ALLOCATOR);
    return status;
}

static int pool_alloc(int pool_id, size_t nbytes, void **ptr)
{
    MS_CHECK(check_pool("pool_alloc", pool_id));
    if (!ptr)
        return MS_FAIL(MS_ERR_INVALID, "pool_alloc: ptr must not be NULL");
    if (pool_id >= MS_POOL_CUDA0 && !ms_device_pool_available(pool_id - MS_POOL_CUDA0))
        return MS_FAIL(MS_ERR_DEVICE, "pool_alloc: %s is not available (%s)",
                       pools[pool_id].name, ms_device_unavailable_reason());
    pool *pl = &pools[pool_id];
    size_t rounded;
    int cls = size_class(nbytes, &rounded);
    pthread_mutex_lock(&pl->lock);
    void *p = NULL;
    if (nbytes > 0) {
        free_block *b = pl->free_lists[cls];
        if (b) {
            pl->free_lists[cls] = b->next;
            pl->cached_bytes -= (int64_t)rounded;
            p = b;
            if (pool_id >= MS_POOL_CUDA0) {
                p = b->device_block;
                free(b);
            }
        } else {
            p = raw_alloc(pool_id, rounded);
            if (!p && pl->cached_bytes > 0) {
                release_cached(pool_id, pl);
                p = raw_alloc(pool_id, rounded);
            }
            if (!p) {
                pthread_mutex_unlock(&pl->lock);
                return MS_FAIL(MS_ERR_OOM, "pool_alloc: %s could not allocate %zu bytes",
                               pl->name, nbytes);
            }
            pl->stats.reserved += (int64_t)rounded;
        }
    }
    pl->stats.allocated += (int64_t)nbytes;
    pl->stats.allocs += 1;
    pl->stats.active += 1;
    if (pl->stats.allocated > pl->stats.peak)
        pl->stats.peak = pl->stats.allocated;
    pthread_mutex_unlock(&pl->lock);
    *ptr = p;
    return MS_OK;
}

static int pool_free(int pool_id, void *ptr, size_t nbytes)
{
    MS_CHECK(check_pool("pool_free", pool_id));
    pool *pl = &pools[pool_id];
    size_t rounded;
    int cls = size_class(nbytes, &rounded);
    pthread_mutex_lock(&pl->lock);
    if (ptr) {
        free_block *b = pool_id >= MS_POOL_CUDA0 ? malloc(sizeof *b) : ptr;
        if (b) {
            if (pool_id >= MS_POOL_CUDA0)
                b->device_block = ptr;
            b->next = pl->free_lists[cls];
            pl->free_lists[cls] = b;
            pl->cached_bytes += (int64_t)rounded;
        } else { /* no host memory for the node: give the device block back instead */
            raw_free(pool_id, ptr, rounded);
            pl->stats.reserved -= (int64_t)rounded;
        }
    }
    pl->stats.allocated -= (int64_t)nbytes;
    pl->stats.frees += 1;
    pl->stats.active -= 1;
    pthread_mutex_unlock(&pl->lock);
    return MS_OK;
}

int ms_pool_stats(int pool_id, ms_memory_stats *stats)
{
    MS_CHECK(check_pool("pool_stats", pool_id));
    if (!stats)
        return MS_FAIL(MS_ERR_INVALID, "pool_stats: stats must not be NULL");
    pthread_mutex_lock(&pools[pool_id].lock);
    *stats = pools[pool_id].stats;
    pthread_mutex_unlock(&pools[pool_id].lock);
    return MS_OK;
}

int ms_pool_reset_peak(int pool_id)
{
    MS_CHECK(check_pool("pool_reset_peak", pool_id));
    pthread_mutex_lock(&pools[pool_id].lock);
    pools[pool_id].stats.peak = pools[pool_id].stats.allocated;
    pthread_mutex_unlock(&pools[pool_id].lock);
    return MS_OK;
}

int ms_pool_empty_cache(int pool_id)
{
    MS_CHECK(check_pool("pool_empty_cache", pool_id));
    pthread_mutex_lock(&pools[pool_id].lock);
    release_cached(pool_id, &pools[pool_id]);
    pthread_mutex_unlock(&pools[pool_id].lock);
    return MS_OK;
}

int ms_pool_use_arena(void *base, size_t bytes, size_t min_block)
{
    pool *pl = &pools[MS_POOL_CPU];
    ms_arena *arena = ms_arena_new(base, bytes);
    if (!arena)
        return MS_FAIL(MS_ERR_OOM, "pool: out of host memory for the cpu pool's arena");
    pthread_mutex_lock(&pl->lock);
    int had_one = pl->arena != NULL;
    if (!had_one) {
        pl->arena = arena;
        pl->arena_min_block = min_block;
    }
    pthread_mutex_unlock(&pl->lock);
    if (had_one) { /* its blocks may still be live: it stays */
        ms_arena_delete(arena);
        return MS_FAIL(MS_ERR_STATE, "pool: the cpu pool already carves from an arena");
    }
    return MS_OK;
}

int ms_pool_in_arena(const void *p, size_t bytes)
{
    pool *pl = &pools[MS_POOL_CPU];
    pthread_mutex_lock(&pl->lock);
    int inside = ms_arena_owns(pl->arena, p) && (bytes == 0 || ms_arena_owns(pl->arena,
                                                              (const uint8_t *)p + bytes - 1));
    pthread_mutex_unlock(&pl->lock);
    return inside;
}
