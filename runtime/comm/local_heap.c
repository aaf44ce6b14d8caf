/* moonshard runtime: the local backend's shared heap. Before forking, the parent maps one
 * shared range of address space holding a slice per rank (MAP_NORESERVE: pages exist once
 * touched); each rank's cpu pool carves its large blocks from its own slice
 * (ms_pool_use_arena), so every rank sees every other rank's large tensors at the same
 * address, and reduce_scatter and all_reduce read them there (local_shared.c) instead of
 * staging them through the segment. Without the heap (MOONSHARD_SHARED_HEAP=0, the mapping
 * refused, an address-sanitizer build, whose checks need the allocator's own memory) every
 * collective stages as before. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "local.h"

enum {
    HEAP_MIN_BLOCK = 64 * 1024,        /* smaller blocks stay private: collectives stage them */
    HEAP_SLICE_ALIGN = 2 * 1024 * 1024,
};

static int heap_wanted(int *wanted)
{
    const char *text = getenv("MOONSHARD_SHARED_HEAP");
    *wanted = 1;
#if defined(__SANITIZE_ADDRESS__)
    *wanted = 0;
#endif
    if (!text || strcmp(text, "1") == 0)
        return MS_OK;
    if (strcmp(text, "0") == 0) {
        *wanted = 0;
        return MS_OK;
    }
    return MS_FAIL(MS_ERR_INVALID, "spawn: MOONSHARD_SHARED_HEAP is '%s'; expected 1 (the "
                   "default: ranks share their large tensors) or 0", text);
}

int local_heap_create(local_segment *seg, int world_size)
{
    int wanted;
    MS_CHECK(heap_wanted(&wanted));
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (!wanted || pages <= 0 || page <= 0)
        return MS_OK;
    /* A slice as large as the machine's memory: a rank cannot fill more. */
    size_t slice = ((size_t)pages * (size_t)page + HEAP_SLICE_ALIGN - 1) / HEAP_SLICE_ALIGN *
                   HEAP_SLICE_ALIGN;
    void *base = mmap(NULL, slice * (size_t)world_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) /* address space refused (a ulimit, strict overcommit): stage */
        return MS_OK;
    seg->heap_base = (uint64_t)(uintptr_t)base;
    seg->heap_slice_bytes = slice;
    return MS_OK;
}

void local_heap_destroy(local_segment *seg)
{
    if (seg->heap_base)
        munmap((void *)(uintptr_t)seg->heap_base, seg->heap_slice_bytes * (size_t)seg->world_size);
    seg->heap_base = 0;
}

int local_heap_attach(const local_segment *seg, int rank)
{
    if (!seg->heap_base)
        return MS_OK;
    return ms_pool_use_arena((void *)(uintptr_t)(seg->heap_base + seg->heap_slice_bytes *
                                                                      (uint64_t)rank),
                             seg->heap_slice_bytes, HEAP_MIN_BLOCK);
}

int local_heap_holds(const local_segment *seg, int world_rank, uint64_t addr, size_t bytes)
{
    if (!seg->heap_base || world_rank < 0 || world_rank >= seg->world_size)
        return 0;
    uint64_t first = seg->heap_base + seg->heap_slice_bytes * (uint64_t)world_rank;
    return addr >= first && bytes <= seg->heap_slice_bytes &&
           addr - first <= seg->heap_slice_bytes - bytes;
}
