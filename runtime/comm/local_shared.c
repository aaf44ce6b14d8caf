/* moonshard runtime: reduce_scatter and all_reduce of the local backend reading the peers'
 * tensors where they are, in the job's shared heap (local_heap.c): nothing is staged through
 * the segment and no kernel copies. In its first step each member posts its tensor's address
 * and whether the tensor lies in its slice of the heap; when every member's does, each one
 * reduces its block (its piece) straight from all of them in member order, as the staged
 * paths do, so results are bitwise theirs. A closing barrier keeps every tensor unchanged
 * until the last member has read it. */
#include <string.h>

#include "local.h"

int local_shared_agree(ms_group *g, const local_call *call, const void *mine, size_t bytes,
                       direct_post *posts, int *shared)
{
    local_group *lg = g->impl;
    int32_t in_heap = local_heap_holds(lg->seg, g->world_ranks[g->rank],
                                       (uint64_t)(uintptr_t)mine, bytes);
    MS_CHECK(local_exchange(g, call, in_heap, mine, posts));
    *shared = 1;
    for (int m = 0; m < g->size; m++) /* every member checks every post: all agree */
        if (!posts[m].ok || !local_heap_holds(lg->seg, g->world_ranks[m], posts[m].addr, bytes))
            *shared = 0;
    return MS_OK;
}

static const uint8_t *at(const direct_post *post, int64_t element, size_t esize)
{
    return (const uint8_t *)(uintptr_t)post->addr + (size_t)element * esize;
}

int local_reduce_scatter_shared(ms_group *g, const local_call *call, const direct_post *posts,
                                void *out, int64_t count, int dtype, int op)
{
    size_t esize = ms_dtype_size(dtype);
    const void *srcs[LOCAL_MAX_RANKS];
    for (int m = 0; m < g->size; m++)
        srcs[m] = at(&posts[m], (int64_t)g->rank * count, esize);
    local_reduce_out(out, srcs, g->size, (size_t)count, dtype, op, (size_t)count * esize);
    return local_barrier_step(g, call);
}

int local_all_reduce_shared(ms_group *g, const local_call *call, const direct_post *posts,
                            void *data, int64_t count, int dtype, int op)
{
    size_t esize = ms_dtype_size(dtype);
    int64_t line = 64 / (int64_t)esize;
    int64_t piece = ((count + g->size - 1) / g->size + line - 1) / line * line;
    uint8_t *bytes = data;
    /* This member's piece, reduced in place from everyone's (the others read only theirs)... */
    int64_t start = (int64_t)g->rank * piece;
    int64_t len = count - start < piece ? count - start : piece;
    const void *srcs[LOCAL_MAX_RANKS];
    for (int m = 0; m < g->size; m++)
        srcs[m] = at(&posts[m], start, esize);
    if (len > 0)
        ms_comm_reduce(bytes + (size_t)start * esize, srcs, g->size, (size_t)len, dtype, op);
    MS_CHECK(local_barrier_step(g, call));
    /* ...then the others' reduced pieces, from their tensors. */
    for (int m = 0; m < g->size; m++) {
        int64_t from = (int64_t)m * piece, n = count - from < piece ? count - from : piece;
        if (m != g->rank && n > 0)
            local_copy_out(bytes + (size_t)from * esize, at(&posts[m], from, esize),
                           (size_t)n * esize, (size_t)count * esize);
    }
    return local_barrier_step(g, call);
}
