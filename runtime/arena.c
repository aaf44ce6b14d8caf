/* moonshard runtime: an arena that a pool's large blocks are carved from (ms_pool_use_arena):
 * a fixed range of address space, first fit over a free list kept sorted by address, freed
 * extents merged with their neighbours and their whole pages given back to the system. The
 * local backend gives each forked rank's cpu pool its slice of a heap shared by every rank,
 * so the ranks' large tensors can be read where they are. Called under the pool's lock. */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "arena.h"

typedef struct extent {
    uintptr_t start;
    size_t bytes;
    struct extent *next;
} extent;

struct ms_arena {
    uintptr_t base;
    size_t bytes;
    extent *free; /* sorted by start, never adjacent */
};

ms_arena *ms_arena_new(void *base, size_t bytes)
{
    ms_arena *a = calloc(1, sizeof *a);
    extent *all = malloc(sizeof *all);
    if (!a || !all) {
        free(a);
        free(all);
        return NULL;
    }
    *all = (extent){(uintptr_t)base, bytes, NULL};
    *a = (ms_arena){(uintptr_t)base, bytes, all};
    return a;
}

void ms_arena_delete(ms_arena *a)
{
    if (!a)
        return;
    for (extent *e = a->free, *next; e; e = next) {
        next = e->next;
        free(e);
    }
    free(a);
}

int ms_arena_owns(const ms_arena *a, const void *p)
{
    uintptr_t at = (uintptr_t)p;
    return a && at >= a->base && at - a->base < a->bytes;
}

void *ms_arena_alloc(ms_arena *a, size_t bytes, size_t align)
{
    for (extent **link = &a->free; *link; link = &(*link)->next) {
        extent *e = *link;
        uintptr_t start = (e->start + align - 1) / align * align;
        if (start - e->start > e->bytes || e->bytes - (start - e->start) < bytes)
            continue;
        uintptr_t end = start + bytes, e_end = e->start + e->bytes;
        extent *after = NULL;
        if (end < e_end) {
            if (start > e->start && !(after = malloc(sizeof *after)))
                return NULL; /* no node for the split: the caller falls back */
        }
        if (start > e->start) { /* e keeps the part before; after (if any) the part after */
            e->bytes = start - e->start;
            if (after) {
                *after = (extent){end, e_end - end, e->next};
                e->next = after;
            }
        } else if (end < e_end) { /* e keeps the part after */
            e->start = end;
            e->bytes = e_end - end;
        } else { /* all of e */
            *link = e->next;
            free(e);
        }
        return (void *)start;
    }
    return NULL;
}

/* Give the whole pages of [start, start + bytes) back: a shared mapping keeps its pages
 * until they are removed. */
static void release_pages(uintptr_t start, size_t bytes)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t first = (start + page - 1) / page * page, last = (start + bytes) / page * page;
    if (last > first)
        madvise((void *)first, last - first, MADV_REMOVE);
}

void ms_arena_free(ms_arena *a, void *p, size_t bytes)
{
    uintptr_t start = (uintptr_t)p, end = start + bytes;
    extent **link = &a->free, *before = NULL;
    while (*link && (*link)->start < start) {
        before = *link;
        link = &(*link)->next;
    }
    extent *after = *link;
    release_pages(start, bytes);
    if (before && before->start + before->bytes == start) {
        before->bytes += bytes;
        if (after && end == after->start) {
            before->bytes += after->bytes;
            before->next = after->next;
            free(after);
        }
        return;
    }
    if (after && end == after->start) {
        after->start = start;
        after->bytes += bytes;
        return;
    }
    extent *e = malloc(sizeof *e);
    if (!e)
        return; /* the extent stays out of the free list: address space lost, not memory */
    *e = (extent){start, bytes, after};
    *link = e;
}
