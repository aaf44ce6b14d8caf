/* moonshard runtime: the local backend's segment, its group registry and departures.
 * Groups are found by their member list, so ranks that disagree never share an area. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "local.h"

enum { PAGE = 4096, DEFAULT_CHUNK_BYTES = 512 * 1024, ARENA_WORLDS = 64 };
/* The segment reserves address space in whole GiB (MAP_NORESERVE: pages exist once touched),
 * which leaves room for many more group areas than the worlds' reserve. */
static const size_t SEGMENT_ALIGN = (size_t)1 << 30;

int ms_local_world_rank = -1;

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

static size_t buffer_stride(const local_segment *seg)
{
    return LOCAL_HEADER_BYTES + seg->chunk_bytes;
}

/* The members' progress words and the failure record at the start of a group's area. */
static size_t members_bytes(int nmembers)
{
    return round_up(sizeof(local_member) * (size_t)nmembers + sizeof(local_failure), PAGE);
}

static size_t area_bytes(const local_segment *seg, int nmembers)
{
    return members_bytes(nmembers) + (size_t)nmembers * LOCAL_RING_DEPTH * buffer_stride(seg);
}

static int init_registry_lock(pthread_mutex_t *lock)
{
    pthread_mutexattr_t attr;
    int status = pthread_mutexattr_init(&attr);
    if (!status)
        status = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!status)
        status = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (!status)
        status = pthread_mutex_init(lock, &attr);
    pthread_mutexattr_destroy(&attr);
    return status;
}

/* A rank that died holding the lock left at most an unpublished entry behind. */
static void lock_registry(local_segment *seg)
{
    if (pthread_mutex_lock(&seg->registry_lock) == EOWNERDEAD)
        pthread_mutex_consistent(&seg->registry_lock);
}

/* Register a group under the registry lock: the live entry of these members and occurrence
 * (one more member attached to it), else a free slot whose area holds them, else a new slot;
 * a new group starts with its members' progress and failure record at zero. [OUT] *index. */
static int register_group(local_segment *seg, const int *members, int nmembers,
                          int occurrence, int *index)
{
    uint32_t count = atomic_load(&seg->group_count);
    int reusable = -1, free_slot = -1;
    for (uint32_t i = 0; i < count; i++) {
        local_group_entry *e = &seg->groups[i];
        if (e->attached == 0) {
            if (reusable < 0 && atomic_load(&e->capacity) >= nmembers)
                reusable = (int)i;
            if (free_slot < 0)
                free_slot = (int)i;
            continue;
        }
        if (e->nmembers == nmembers && e->occurrence == occurrence &&
            !memcmp(e->members, members, sizeof *members * (size_t)nmembers)) {
            e->attached++;
            *index = (int)i;
            return MS_OK;
        }
    }
    int slot = reusable;
    if (slot < 0) {
        /* a new area: in a new slot, or in a free one whose area is too small (left unused) */
        size_t bytes = area_bytes(seg, nmembers);
        slot = count < LOCAL_MAX_GROUPS ? (int)count : free_slot;
        if (slot < 0 || seg->arena_used + bytes > seg->total_bytes - seg->arena_offset)
            return MS_FAIL(MS_ERR_OOM, "new_group: the local segment has no room for another "
                                       "group (%u groups in use; a group's slot is freed when "
                                       "every member destroyed it: dist.destroy_process_group"
                                       "(group), or the collector)", count);
        local_group_entry *e = &seg->groups[slot];
        atomic_store(&e->capacity, 0); /* the parent stops reading the old area first */
        e->area_offset = seg->arena_offset + seg->arena_used;
        seg->arena_used += bytes;
        atomic_store(&e->capacity, nmembers);
        if (slot == (int)count)
            atomic_store(&seg->group_count, count + 1);
    }
    local_group_entry *e = &seg->groups[slot];
    e->nmembers = nmembers;
    e->occurrence = occurrence;
    memcpy(e->members, members, sizeof *members * (size_t)nmembers);
    memset((uint8_t *)seg + e->area_offset, 0, members_bytes(nmembers));
    e->attached = 1;
    *index = slot;
    return MS_OK;
}

/* Data bytes of one ring buffer: MOONSHARD_COMM_CHUNK_KB (16 to 65536) or the default. */
static size_t chunk_bytes_setting(void)
{
    const char *text = getenv("MOONSHARD_COMM_CHUNK_KB");
    long kb = text ? strtol(text, NULL, 10) : 0;
    return kb >= 16 && kb <= 65536 ? (size_t)kb * 1024 : DEFAULT_CHUNK_BYTES;
}

int local_segment_create(local_segment **out, int world_size)
{
    size_t header = round_up(sizeof(local_segment), PAGE);
    local_segment probe = {.chunk_bytes = chunk_bytes_setting()};
    size_t world_area = area_bytes(&probe, world_size);
    size_t total = round_up(header + world_area * ARENA_WORLDS, SEGMENT_ALIGN);
    local_segment *seg = mmap(NULL, total, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (seg == MAP_FAILED)
        return MS_FAIL(errno, "spawn: cannot map a %zu MiB shared segment: %s", total >> 20,
                       strerror(errno));
    seg->world_size = world_size;
    seg->chunk_bytes = probe.chunk_bytes;
    seg->total_bytes = total;
    seg->arena_offset = header;
    atomic_store(&seg->abort_rank, -1);
    int status = init_registry_lock(&seg->registry_lock);
    if (status) {
        munmap(seg, total);
        return MS_FAIL(status, "spawn: cannot make the registry lock: %s", strerror(status));
    }
    status = local_heap_create(seg, world_size);
    if (status != MS_OK) {
        munmap(seg, total);
        return status;
    }
    int members[LOCAL_MAX_RANKS];
    for (int r = 0; r < world_size; r++)
        members[r] = r;
    int world;
    register_group(seg, members, world_size, -1, &world);
    /* Fault the world's pages in once here rather than in every rank's first collective. */
    memset((char *)seg + seg->groups[world].area_offset, 0, world_area);
    *out = seg;
    return MS_OK;
}

void local_segment_destroy(local_segment *seg)
{
    if (!seg)
        return;
    local_heap_destroy(seg);
    munmap(seg, seg->total_bytes);
}

static int attach(ms_group **out, local_segment *seg, int index, int rank, int64_t timeout_ms)
{
    const local_group_entry *entry = &seg->groups[index];
    local_group *lg = calloc(1, sizeof *lg);
    if (!lg)
        return MS_FAIL(MS_ERR_OOM, "new_group: out of host memory for the handle");
    int status = ms_group_alloc(out, &ms_local_backend, rank, entry->members,
                                entry->nmembers, timeout_ms);
    if (status != MS_OK) {
        free(lg);
        return status;
    }
    uint8_t *area = (uint8_t *)seg + entry->area_offset;
    lg->seg = seg;
    lg->entry = index;
    lg->members = (local_member *)area;
    lg->failure = (local_failure *)(area + sizeof(local_member) * (size_t)entry->nmembers);
    lg->ring = area + members_bytes(entry->nmembers);
    lg->buffer_stride = buffer_stride(seg);
    (*out)->impl = lg;
    return MS_OK;
}

int local_world_group(ms_group **out, local_segment *seg, int64_t timeout_ms)
{
    MS_CHECK(attach(out, seg, 0, -1, timeout_ms));
    ((local_group *)(*out)->impl)->entry = -1; /* the world's slot is never released */
    return MS_OK;
}

/* How many groups with exactly these members this process made before (same on every
 * rank that makes the same calls); -1 when out of memory. */
static int next_occurrence(const int *members, int nmembers)
{
    typedef struct member_list_count {
        uint64_t key;
        int count;
    } member_list_count;
    static member_list_count *made;
    static int lists, capacity;
    uint64_t key = 1469598103934665603ull; /* FNV-1a over the member count and list */
    key = (key ^ (uint64_t)nmembers) * 1099511628211ull;
    for (int i = 0; i < nmembers; i++)
        key = (key ^ (uint64_t)members[i]) * 1099511628211ull;
    for (int i = 0; i < lists; i++)
        if (made[i].key == key)
            return made[i].count++;
    if (lists == capacity) {
        int grown = capacity ? capacity * 2 : LOCAL_MAX_GROUPS;
        member_list_count *more = realloc(made, sizeof *more * (size_t)grown);
        if (!more)
            return -1;
        made = more;
        capacity = grown;
    }
    made[lists++] = (member_list_count){.key = key, .count = 1};
    return 0;
}

int local_new_group(ms_group *parent, const int *ranks, int nranks, ms_group **out)
{
    local_group *plg = parent->impl;
    int members[LOCAL_MAX_RANKS], me = -1;
    for (int i = 0; i < nranks; i++) {
        members[i] = parent->world_ranks[ranks[i]];
        if (members[i] == ms_local_world_rank)
            me = i;
    }
    int occurrence = next_occurrence(members, nranks);
    if (occurrence < 0)
        return MS_FAIL(MS_ERR_OOM, "new_group: out of host memory");
    if (me < 0)
        return ms_group_alloc(out, &ms_local_backend, -1, members, nranks, parent->timeout_ms);
    int index;
    lock_registry(plg->seg);
    int status = register_group(plg->seg, members, nranks, occurrence, &index);
    pthread_mutex_unlock(&plg->seg->registry_lock);
    MS_CHECK(status);
    status = attach(out, plg->seg, index, me, parent->timeout_ms);
    if (status != MS_OK) {
        lock_registry(plg->seg);
        plg->seg->groups[index].attached--;
        pthread_mutex_unlock(&plg->seg->registry_lock);
    }
    return status;
}

void local_group_free(ms_group *g)
{
    local_group *lg = g->impl;
    if (lg && lg->entry >= 0) {
        lock_registry(lg->seg);
        local_group_entry *e = &lg->seg->groups[lg->entry];
        if (e->attached > 0)
            e->attached--;
        pthread_mutex_unlock(&lg->seg->registry_lock);
    }
    if (lg)
        free(lg->scratch);
    free(lg);
    ms_group_dealloc(g);
}

void local_mark_departed(local_segment *seg, int rank, const char *reason, int abort)
{
    local_departure *d = &seg->departed[rank];
    snprintf(d->reason, sizeof d->reason, "%s", reason);
    atomic_store(&d->gone, 1);
    int none = -1;
    if (abort)
        atomic_compare_exchange_strong(&seg->abort_rank, &none, rank);
    uint32_t count = atomic_load(&seg->group_count);
    for (uint32_t i = 0; i < count; i++) { /* free slots too: waking nobody is harmless */
        local_group_entry *e = &seg->groups[i];
        int capacity = atomic_load(&e->capacity);
        local_member *members = (local_member *)((uint8_t *)seg + e->area_offset);
        for (int m = 0; m < capacity; m++) {
            local_wake_all(&members[m].posted);
            local_wake_all(&members[m].consumed);
        }
    }
}
