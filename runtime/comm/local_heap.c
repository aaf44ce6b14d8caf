/* moonshard runtime: each local rank's share of the segment, as a heap for CPU buffers.
 * Peers read and write buffers placed here directly, so collectives on them skip the ring. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "local.h"

enum { PAGE = 4096, LARGE = 64 * 1024 };

typedef struct heap_range {
    uintptr_t start;
    size_t size;
} heap_range;

/* Ranges sorted by start. */
typedef struct range_list {
    heap_range *items;
    int count, capacity;
} range_list;

/* Only this rank allocates in its region, so the bookkeeping is process-private. */
static struct {
    pthread_mutex_t lock;
    uintptr_t base, end;
    range_list free, used;
} heap = {.lock = PTHREAD_MUTEX_INITIALIZER};

static int find(const range_list *list, uintptr_t start)
{
    int lo = 0, hi = list->count;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (list->items[mid].start < start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int insert(range_list *list, int at, heap_range range)
{
    if (list->count == list->capacity) {
        int capacity = list->capacity ? 2 * list->capacity : 64;
        heap_range *grown = realloc(list->items, sizeof *grown * (size_t)capacity);
        if (!grown)
            return 0;
        list->items = grown;
        list->capacity = capacity;
    }
    memmove(list->items + at + 1, list->items + at,
            sizeof *list->items * (size_t)(list->count - at));
    list->items[at] = range;
    list->count++;
    return 1;
}

static void remove_at(range_list *list, int at)
{
    memmove(list->items + at, list->items + at + 1,
            sizeof *list->items * (size_t)(list->count - at - 1));
    list->count--;
}

void local_heap_attach(local_segment *seg, int rank)
{
    heap.base = (uintptr_t)seg + seg->heap_offset + (size_t)rank * seg->heap_bytes_per_rank;
    heap.end = heap.base + seg->heap_bytes_per_rank;
    heap.free.count = heap.used.count = 0;
    insert(&heap.free, 0, (heap_range){heap.base, seg->heap_bytes_per_rank});
}

int local_heap_holds(const local_segment *seg, const void *p, size_t nbytes)
{
    uintptr_t start = (uintptr_t)seg + seg->heap_offset;
    uintptr_t end = start + (size_t)seg->world_size * seg->heap_bytes_per_rank;
    return (uintptr_t)p >= start && (uintptr_t)p <= end && nbytes <= end - (uintptr_t)p;
}

/* First fit: large blocks start on a page, so peers' streaming copies stay aligned. */
void *ms_local_shared_alloc(size_t nbytes)
{
    if (!heap.base || nbytes == 0)
        return NULL;
    size_t align = nbytes >= LARGE ? PAGE : 64;
    size_t size = (nbytes + align - 1) / align * align;
    void *found = NULL;
    pthread_mutex_lock(&heap.lock);
    for (int i = 0; i < heap.free.count && !found; i++) {
        heap_range r = heap.free.items[i];
        uintptr_t start = (r.start + align - 1) / align * align;
        if (start + size > r.start + r.size)
            continue;
        if (!insert(&heap.used, find(&heap.used, start), (heap_range){start, size}))
            break;
        remove_at(&heap.free, i);
        /* a range whose bookkeeping cannot grow is lost, which only shrinks the heap */
        uintptr_t tail = start + size, end = r.start + r.size;
        if (tail < end)
            insert(&heap.free, i, (heap_range){tail, end - tail});
        if (start > r.start)
            insert(&heap.free, i, (heap_range){r.start, start - r.start});
        found = (void *)start;
    }
    pthread_mutex_unlock(&heap.lock);
    return found;
}

int ms_local_shared_free(void *p)
{
    uintptr_t start = (uintptr_t)p;
    if (!heap.base || start < heap.base || start >= heap.end)
        return 0;
    pthread_mutex_lock(&heap.lock);
    int at = find(&heap.used, start);
    if (at == heap.used.count || heap.used.items[at].start != start) {
        pthread_mutex_unlock(&heap.lock);
        return 0;
    }
    heap_range freed = heap.used.items[at];
    remove_at(&heap.used, at);
    int i = find(&heap.free, freed.start);
    if (i > 0 && heap.free.items[i - 1].start + heap.free.items[i - 1].size == freed.start) {
        freed.start = heap.free.items[i - 1].start;
        freed.size += heap.free.items[i - 1].size;
        remove_at(&heap.free, --i);
    }
    if (i < heap.free.count && freed.start + freed.size == heap.free.items[i].start) {
        freed.size += heap.free.items[i].size;
        remove_at(&heap.free, i);
    }
    insert(&heap.free, i, freed);
    /* Give the pages wholly inside the free range back to the system. */
    uintptr_t first = (freed.start + PAGE - 1) / PAGE * PAGE;
    uintptr_t last = (freed.start + freed.size) / PAGE * PAGE;
    if (last > first)
        madvise((void *)first, last - first, MADV_REMOVE);
    pthread_mutex_unlock(&heap.lock);
    return 1;
}
