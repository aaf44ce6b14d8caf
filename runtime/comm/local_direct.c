/* moonshard runtime: the local backend's large all_reduce reading the peers' tensors where
 * they are (process_vm_readv) instead of staging them through the segment: each member reads
 * the others' copies of its piece into a scratch that stays in cache and reduces them there,
 * then reads the others' reduced pieces straight into its tensor, so no byte is written to the
 * segment and read back. The members probe once per group that they may read each other's
 * memory, and agree on it. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "local.h"

enum {
    DIRECT_SCRATCH_BYTES = 1024 * 1024, /* for the peers' pieces, split between them */
    READ_FAILED_WAIT_MS = 2000,         /* longest wait for a peer's departure to be recorded */
};

static const uint64_t PROBE_WORD = 0x6d6f6f6e73686172ull; /* "moonshar" */

static direct_post *my_post(ms_group *g, uint32_t step)
{
    return (direct_post *)local_buffer(g->impl, g->rank, step);
}

static const direct_post *their_post(ms_group *g, int member, uint32_t step)
{
    return (const direct_post *)local_buffer(g->impl, member, step);
}

/* Copy len bytes at peer's address remote into local; 0 when all of them arrived, else
 * the errno. */
static int read_peer(int32_t pid, void *local, uint64_t remote, size_t len)
{
    struct iovec to = {local, len}, from = {(void *)(uintptr_t)remote, len};
    while (to.iov_len > 0) {
        ssize_t n = process_vm_readv(pid, &to, 1, &from, 1, 0);
        if (n <= 0)
            return n < 0 ? errno : EFAULT;
        to.iov_base = (uint8_t *)to.iov_base + n, to.iov_len -= (size_t)n;
        from.iov_base = (uint8_t *)from.iov_base + n, from.iov_len -= (size_t)n;
    }
    return 0;
}

int local_exchange(ms_group *g, const local_call *call, int32_t ok, const void *addr,
                   direct_post *posts)
{
    local_group *lg = g->impl;
    uint32_t step = lg->next_step;
    MS_CHECK(local_wait_free(g, call, step));
    *my_post(g, step) = (direct_post){.pid = (int32_t)getpid(), .ok = ok,
                                      .addr = (uint64_t)(uintptr_t)addr};
    MS_CHECK(local_post(g, call, step));
    MS_CHECK(local_wait_posted(g, call, step, step));
    for (int m = 0; m < g->size; m++)
        posts[m] = *their_post(g, m, step);
    local_consume(g, step);
    return MS_OK;
}

int local_direct_ready(ms_group *g, const local_call *call, int *ready)
{
    local_group *lg = g->impl;
    if (lg->direct == 0) {
        direct_post posts[LOCAL_MAX_RANKS];
        MS_CHECK(local_exchange(g, call, 1, &PROBE_WORD, posts));
        int32_t ok = 1;
        for (int m = 0; m < g->size; m++) {
            uint64_t word = 0;
            if (m != g->rank && (read_peer(posts[m].pid, &word, posts[m].addr, sizeof word) ||
                                 word != PROBE_WORD))
                ok = 0;
        }
        MS_CHECK(local_exchange(g, call, ok, NULL, posts));
        lg->direct = 1;
        for (int m = 0; m < g->size; m++)
            if (!posts[m].ok)
                lg->direct = -1;
        if (lg->direct > 0 && !(lg->scratch = aligned_alloc(64, DIRECT_SCRATCH_BYTES)))
            return ms_group_break(g, MS_FAIL(MS_ERR_OOM, "%s: out of host memory for the "
                                             "collective's scratch", call->name));
    }
    *ready = lg->direct > 0;
    return MS_OK;
}

/* A failed read of a peer's memory: the peer ended during the collective. The parent
 * records why when it reaps the peer; wait for that (asleep), then name the first rank that
 * failed, which is the cause when the peer only returned on seeing that failure. */
static int read_failed(ms_group *g, const local_call *call, int member, int error)
{
    local_group *lg = g->impl;
    int peer = g->world_ranks[member];
    for (int waited_ms = 0; waited_ms < READ_FAILED_WAIT_MS; waited_ms++) {
        if (atomic_load(&lg->seg->departed[peer].gone)) {
            /* The first rank that failed, if one did: a peer that returned on seeing it
             * left because of it. */
            int failed = atomic_load(&lg->seg->abort_rank);
            int named = failed >= 0 ? failed : peer;
            return ms_group_break(g, MS_FAIL(MS_ERR_PEER_DIED, "%s: rank %d %s", call->name,
                                             named, lg->seg->departed[named].reason));
        }
        nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    }
    return ms_group_break(g, MS_FAIL(MS_ERR_PEER_DIED, "%s: cannot read rank %d's tensor: %s",
                                     call->name, peer, strerror(error)));
}

/* Elements of one peer's share of the scratch: a multiple of 64 bytes. */
static int64_t scratch_elements(const ms_group *g, size_t esize)
{
    size_t share = DIRECT_SCRATCH_BYTES / (size_t)(g->size - 1) / 64 * 64;
    return (int64_t)(share / esize);
}

/* mine[0, count) = the reduction over members of their tensors at element offset (posts'
 * addresses; mine is this member's own, at that offset), in member order, in place. */
static int reduce_from_peers(ms_group *g, const local_call *call, const direct_post *posts,
                             int64_t offset, uint8_t *mine, int64_t count, int dtype, int op)
{
    local_group *lg = g->impl;
    size_t esize = ms_dtype_size(dtype);
    int64_t per_block = scratch_elements(g, esize);
    const void *srcs[LOCAL_MAX_RANKS];
    for (int64_t base = 0; base < count; base += per_block) {
        int64_t len = count - base < per_block ? count - base : per_block;
        for (int m = 0, slot = 0; m < g->size; m++) {
            if (m == g->rank) {
                srcs[m] = mine + (size_t)base * esize;
                continue;
            }
            uint8_t *into = lg->scratch + (size_t)(slot++ * per_block) * esize;
            int error = read_peer(posts[m].pid, into,
                                  posts[m].addr + (uint64_t)(offset + base) * esize,
                                  (size_t)len * esize);
            if (error)
                return read_failed(g, call, m, error);
            srcs[m] = into;
        }
        ms_comm_reduce(mine + (size_t)base * esize, srcs, g->size, (size_t)len, dtype, op);
    }
    return MS_OK;
}

int local_all_reduce_direct(ms_group *g, const local_call *call, void *data, int64_t count,
                            int dtype, int op)
{
    direct_post posts[LOCAL_MAX_RANKS];
    size_t esize = ms_dtype_size(dtype);
    int64_t line = 64 / (int64_t)esize;
    int64_t piece = ((count + g->size - 1) / g->size + line - 1) / line * line;
    uint8_t *bytes = data;
    MS_CHECK(local_exchange(g, call, 1, data, posts));
    /* Reduce this member's piece in place from the others' untouched copies of it... */
    int64_t start = (int64_t)g->rank * piece;
    int64_t len = count - start < piece ? count - start : piece;
    if (len > 0)
        MS_CHECK(reduce_from_peers(g, call, posts, start, bytes + (size_t)start * esize, len,
                                   dtype, op));
    MS_CHECK(local_barrier_step(g, call));
    /* ...then copy the others' reduced pieces. */
    for (int m = 0; m < g->size; m++) {
        int64_t at = (int64_t)m * piece, n = count - at < piece ? count - at : piece;
        int error = m != g->rank && n > 0
                        ? read_peer(posts[m].pid, bytes + (size_t)at * esize,
                                    posts[m].addr + (uint64_t)at * esize, (size_t)n * esize)
                        : 0;
        if (error)
            return read_failed(g, call, m, error);
    }
    return local_barrier_step(g, call);
}
