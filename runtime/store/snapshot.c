/* moonshard store: lazy staging copies for background saves (ms_store_stage). A large
 * source's whole pages are made read-only; the first write to one of them, from any thread,
 * stops in a SIGSEGV handler that copies the block around it to the staging buffer and makes
 * the block writable again, and the writer thread copies every other block before it writes.
 * The caller of an async save waits for no copy; the staging buffers hold the values at call
 * time. Writes the handler cannot see (a peer rank through shared memory, the kernel) are
 * announced through the fence (runtime/fence.h), whose watcher copies the blocks first. Sources
 * that are small, strided, outside the cpu pool (the host pool may be page-locked, which a
 * device writes by DMA) or overlap another staged source are copied at once. */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../fence.h"
#include "../ops.h"
#include "store_internal.h"

enum {
    /* Blocks are copied per fault and per step of the writer, and lie at multiples of their
     * size in memory: making one writable then never splits a huge page. */
    SNAPSHOT_BLOCK_BYTES = 2 << 20,
    SNAPSHOT_MIN_BYTES = 1 << 20,     /* smaller sources are copied at once */
    MAX_ACTIVE_REGIONS = 4096,
    RETRY_SLOTS = 256,                /* threads remembered by the handler's retry rule */
};
/* Block states; any other value is the id of the thread copying the block. */
enum { BLOCK_PROTECTED = 0, BLOCK_COPIED = -1, BLOCK_FAILED = -2 };

struct snapshot_region {
    uint8_t *blocks_start;       /* live rounded down to a block boundary */
    uint8_t *live;               /* first read-only byte (page aligned) */
    uint8_t *staging;            /* where the byte at live goes */
    size_t bytes;                /* read-only bytes, whole pages */
    const uint8_t *source_begin; /* all of the source's bytes, to refuse overlapping sources */
    const uint8_t *source_end;
    ms_tensor *source;           /* a reference keeping the source's storage allocated */
    size_t block_count;
    _Atomic int32_t blocks[];
};

/* Regions the handler looks at; a slot is published only once its region is complete. */
static snapshot_region *_Atomic active[MAX_ACTIVE_REGIONS];
static atomic_size_t active_end; /* slots in use lie below it */
static atomic_int handlers_running;
static pthread_mutex_t active_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous_action;
/* Counts regions taken out of active[] (their pages writable again). A write that faulted
 * on a staged page can reach the handler after the writer thread has copied and unpublished
 * that page's region (the faulting thread was descheduled in between); the handler then
 * finds no region, and the write must simply run again. */
static atomic_uint_fast64_t unpublished;
/* Per thread (hashed by id): the last address the handler let run again without finding a
 * region, and the count of unpublished regions then. The same address faulting again with no
 * region unpublished meanwhile is a real fault, passed on. */
static struct {
    _Atomic int32_t tid;
    _Atomic uintptr_t addr;
    _Atomic uint_fast64_t unpublished;
} retries[RETRY_SLOTS];

static int32_t thread_id(void)
{
    return (int32_t)syscall(SYS_gettid);
}

/* Copy block b of r (unless cancelling), make it writable, mark it copied. */
static void release_block(snapshot_region *r, size_t b, bool copy)
{
    uint8_t *begin = r->blocks_start + b * SNAPSHOT_BLOCK_BYTES, *end = begin + SNAPSHOT_BLOCK_BYTES;
    begin = begin > r->live ? begin : r->live;
    end = end < r->live + r->bytes ? end : r->live + r->bytes;
    size_t at = (size_t)(begin - r->live), n = (size_t)(end - begin);
    if (copy)
        stream_copy(r->staging + at, r->live + at, n);
    int state = mprotect(r->live + at, n, PROT_READ | PROT_WRITE) ? BLOCK_FAILED : BLOCK_COPIED;
    atomic_store_explicit(&r->blocks[b], state, memory_order_release);
}

/* Claim block b for this thread; returns the state it found (tid when the claim succeeded). */
static int32_t claim_block(snapshot_region *r, size_t b, int32_t tid)
{
    int32_t state = BLOCK_PROTECTED;
    if (atomic_compare_exchange_strong(&r->blocks[b], &state, tid))
        return tid;
    return state;
}

/* A write fault at addr that no published region covers: true when it should run again
 * (a region may have been unpublished since the fault), false when it is a real fault. */
static bool retry_unclaimed_fault(const uint8_t *addr, int32_t tid)
{
    uint_fast64_t now = atomic_load(&unpublished);
    size_t slot = (size_t)tid % RETRY_SLOTS;
    if (atomic_load(&retries[slot].tid) == tid && atomic_load(&retries[slot].addr) == (uintptr_t)addr &&
        atomic_load(&retries[slot].unpublished) == now)
        return false;
    atomic_store(&retries[slot].tid, tid);
    atomic_store(&retries[slot].addr, (uintptr_t)addr);
    atomic_store(&retries[slot].unpublished, now);
    return now > 0;
}

/* The write fault at addr is on a staged source: copy its block (or wait for the thread
 * copying it). False when addr is not ours, or the fault came from our own copy. */
static bool copy_faulting_block(const uint8_t *addr)
{
    int32_t tid = thread_id();
    size_t end = atomic_load(&active_end);
    for (size_t i = 0; i < end; i++) {
        snapshot_region *r = atomic_load_explicit(&active[i], memory_order_acquire);
        if (!r || addr < r->live || addr >= r->live + r->bytes)
            continue;
        size_t b = (size_t)(addr - r->blocks_start) / SNAPSHOT_BLOCK_BYTES;
        int32_t state = atomic_load_explicit(&r->blocks[b], memory_order_acquire);
        if (state == tid)
            return false;
        if (state == BLOCK_PROTECTED && claim_block(r, b, tid) == tid)
            release_block(r, b, true);
        while ((state = atomic_load_explicit(&r->blocks[b], memory_order_acquire)) > 0)
            sched_yield();
        return state == BLOCK_COPIED;
    }
    return retry_unclaimed_fault(addr, tid);
}

static void on_fault(int signal, siginfo_t *info, void *context)
{
    atomic_fetch_add(&handlers_running, 1);
    bool handled = info->si_code == SEGV_ACCERR && copy_faulting_block(info->si_addr);
    atomic_fetch_sub(&handlers_running, 1);
    if (handled)
        return;
    if (previous_action.sa_flags & SA_SIGINFO)
        previous_action.sa_sigaction(signal, info, context);
    else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN)
        previous_action.sa_handler(signal);
    else
        sigaction(SIGSEGV, &previous_action, NULL); /* the fault repeats, with the default */
}

/* The fence's watcher: blocks of [p, p + n) still protected are copied now. */
static void copy_before_foreign_write(const void *p, size_t n)
{
    if (n == 0 || atomic_load(&active_end) == 0)
        return;
    const uint8_t *begin = p, *end = begin + n;
    int32_t tid = thread_id();
    atomic_fetch_add(&handlers_running, 1); /* snapshot_finish frees no region meanwhile */
    size_t count = atomic_load(&active_end);
    for (size_t i = 0; i < count; i++) {
        snapshot_region *r = atomic_load(&active[i]);
        if (!r || end <= r->live || begin >= r->live + r->bytes)
            continue;
        const uint8_t *low = begin > r->live ? begin : r->live;
        const uint8_t *high = end < r->live + r->bytes ? end : r->live + r->bytes;
        size_t first = (size_t)(low - r->blocks_start) / SNAPSHOT_BLOCK_BYTES;
        size_t last = (size_t)(high - 1 - r->blocks_start) / SNAPSHOT_BLOCK_BYTES;
        for (size_t b = first; b <= last; b++) {
            if (claim_block(r, b, tid) == tid)
                release_block(r, b, true);
            while (atomic_load_explicit(&r->blocks[b], memory_order_acquire) > 0)
                sched_yield();
        }
    }
    atomic_fetch_sub(&handlers_running, 1);
}

/* Install on_fault unless it is the handler already (others may have replaced it since). */
static int install_handler(void)
{
    struct sigaction current;
    sigaction(SIGSEGV, NULL, &current);
    ms_fence_register(copy_before_foreign_write);
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_fault)
        return MS_OK;
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_fault;
    ours.sa_flags = SA_SIGINFO | SA_RESTART | (current.sa_flags & SA_ONSTACK);
    sigemptyset(&ours.sa_mask);
    previous_action = current;
    if (sigaction(SIGSEGV, &ours, NULL))
        return MS_FAIL(errno, "store_stage: cannot install the SIGSEGV handler: %s",
                       strerror(errno));
    return MS_OK;
}

/* A free slot for r when its source overlaps no staged source; -1 otherwise. */
static int64_t free_slot(const snapshot_region *r)
{
    int64_t slot = -1;
    size_t end = atomic_load(&active_end);
    for (size_t i = 0; i < end; i++) {
        const snapshot_region *other = atomic_load(&active[i]);
        if (!other)
            slot = slot < 0 ? (int64_t)i : slot;
        else if (r->source_begin < other->source_end && other->source_begin < r->source_end)
            return -1;
    }
    return slot >= 0 ? slot : end < MAX_ACTIVE_REGIONS ? (int64_t)end : -1;
}

/* Publish r and make its pages read-only; false (r unpublished) when that is not possible. */
static bool protect_region(snapshot_region *r)
{
    pthread_mutex_lock(&active_lock);
    int64_t slot = free_slot(r);
    bool ok = slot >= 0 && install_handler() == MS_OK;
    if (ok) {
        atomic_store_explicit(&active[slot], r, memory_order_release);
        if ((size_t)slot == atomic_load(&active_end))
            atomic_store(&active_end, (size_t)slot + 1);
        ok = mprotect(r->live, r->bytes, PROT_READ) == 0;
        if (!ok)
            atomic_store(&active[slot], NULL);
    }
    pthread_mutex_unlock(&active_lock);
    return ok;
}

static void unpublish(snapshot_region *r)
{
    pthread_mutex_lock(&active_lock);
    size_t end = atomic_load(&active_end);
    for (size_t i = 0; i < end; i++)
        if (atomic_load(&active[i]) == r)
            atomic_store(&active[i], NULL);
    atomic_fetch_add(&unpublished, 1);
    pthread_mutex_unlock(&active_lock);
}

static int remember(ms_store *s, snapshot_region *r)
{
    if (s->snapshot_count == s->snapshot_capacity) {
        size_t capacity = s->snapshot_capacity ? 2 * s->snapshot_capacity : 64;
        snapshot_region **grown = realloc(s->snapshots, capacity * sizeof *grown);
        if (!grown)
            return MS_FAIL(MS_ERR_OOM, "store_stage: out of memory");
        s->snapshots = grown;
        s->snapshot_capacity = capacity;
    }
    s->snapshots[s->snapshot_count++] = r;
    return MS_OK;
}

static void free_region(snapshot_region *r)
{
    ms_tensor_free(r->source);
    free(r);
}

/* A region for the whole pages of src's bytes, its other bytes copied to dst already; NULL
 * when src has no whole page or memory is short. */
static snapshot_region *new_region(uint8_t *dst, const ms_tensor *src)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uint8_t *begin = ms_tensor_data(src);
    size_t nbytes = ms_tensor_nbytes(src);
    uintptr_t first = ((uintptr_t)begin + page - 1) & ~(page - 1);
    uintptr_t last = ((uintptr_t)begin + nbytes) & ~(page - 1);
    if (last <= first)
        return NULL;
    size_t bytes = last - first;
    uintptr_t blocks_start = first & ~((uintptr_t)SNAPSHOT_BLOCK_BYTES - 1);
    size_t block_count = (last - blocks_start + SNAPSHOT_BLOCK_BYTES - 1) / SNAPSHOT_BLOCK_BYTES;
    snapshot_region *r = calloc(1, sizeof *r + block_count * sizeof r->blocks[0]);
    if (!r)
        return NULL;
    if (ms_tensor_view(&r->source, src, src->ndim, src->shape, src->strides, src->offset)) {
        free(r);
        return NULL;
    }
    size_t head = first - (uintptr_t)begin;
    r->blocks_start = (uint8_t *)blocks_start;
    r->live = (uint8_t *)first;
    r->staging = dst + head;
    r->bytes = bytes;
    r->source_begin = begin;
    r->source_end = begin + nbytes;
    r->block_count = block_count;
    memcpy(dst, begin, head);
    memcpy(r->staging + bytes, r->live + bytes, nbytes - head - bytes);
    return r;
}

/* MS_ASYNC_STAGING=copy copies every source at once: no read-only pages, no SIGSEGV
 * handler (for programs whose system calls write into saved tensors, and to measure what
 * lazy staging saves: bench/dcp.lua). */
static bool lazy_staging_enabled(void)
{
    const char *mode = getenv("MS_ASYNC_STAGING");
    return !mode || strcmp(mode, "copy") != 0;
}

static bool can_stage_lazily(const ms_tensor *dst, const ms_tensor *src)
{
    if (!lazy_staging_enabled())
        return false;
    const uint8_t *d = ms_tensor_data(dst), *b = ms_tensor_data(src);
    size_t n = ms_tensor_nbytes(src);
    return n >= SNAPSHOT_MIN_BYTES && ms_tensor_is_contiguous(src) && ms_tensor_is_contiguous(dst) &&
           src->storage->pool == MS_POOL_CPU && dst->storage->pool < MS_POOL_CUDA0 &&
           (d + n <= b || b + n <= d);
}

int ms_store_stage(ms_store *s, ms_tensor *dst, const ms_tensor *src)
{
    MS_CHECK(store_check(s, "store_stage"));
    if (s->save_state != SAVE_WRITING || !s->background)
        return MS_FAIL(MS_ERR_STATE, "store_stage: %s: no background save in progress", s->path);
    MS_CHECK(ms_check_tensor("store_stage", "dst", dst));
    MS_CHECK(ms_check_tensor("store_stage", "src", src));
    bool same = dst->dtype == src->dtype && dst->ndim == src->ndim;
    for (int d = 0; same && d < dst->ndim; d++)
        same = dst->shape[d] == src->shape[d];
    if (!same) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "store_stage: dst is %s %s, src is %s %s",
                       ms_dtype_name(dst->dtype), ms_shape_str(a, sizeof a, dst->ndim, dst->shape),
                       ms_dtype_name(src->dtype), ms_shape_str(b, sizeof b, src->ndim, src->shape));
    }
    if (src->numel == 0 || !can_stage_lazily(dst, src))
        return ms_copy(dst, src);
    snapshot_region *r = new_region(ms_tensor_data(dst), src);
    if (!r)
        return ms_copy(dst, src);
    if (remember(s, r) != MS_OK) {
        free_region(r);
        return ms_copy(dst, src);
    }
    if (!protect_region(r)) {
        s->snapshot_count--;
        free_region(r);
        return ms_copy(dst, src);
    }
    return MS_OK;
}

int snapshot_finish(ms_store *s, bool copy)
{
    int32_t tid = thread_id();
    size_t failed = 0;
    for (size_t i = 0; i < s->snapshot_count; i++) {
        snapshot_region *r = s->snapshots[i];
        for (size_t b = 0; b < r->block_count; b++)
            if (claim_block(r, b, tid) == tid)
                release_block(r, b, copy);
        for (size_t b = 0; b < r->block_count; b++) {
            int32_t state;
            while ((state = atomic_load_explicit(&r->blocks[b], memory_order_acquire)) > 0)
                sched_yield();
            failed += state == BLOCK_FAILED;
        }
        unpublish(r);
    }
    while (atomic_load(&handlers_running) > 0)
        sched_yield();
    for (size_t i = 0; i < s->snapshot_count; i++)
        free_region(s->snapshots[i]);
    s->snapshot_count = 0;
    if (failed)
        return MS_FAIL(MS_ERR_OOM,
                       "%s: %zu staged blocks could not be made writable again (mprotect); "
                       "writing to them will crash",
                       s->path, failed);
    return MS_OK;
}
