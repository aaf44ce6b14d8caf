/* moonshard runtime: the local backend's collectives, through the segment's ring of buffers
 * in bounded steps. */
#include <string.h>

#include "local.h"

/* Up to this many bytes an all_reduce sends whole tensors and every member reduces all
 * of it (one synchronisation per step); above, members reduce one piece each and then
 * exchange the reduced pieces (half the copying and arithmetic per member). */
enum { ALL_REDUCE_WHOLE_MAX = 64 * 1024 };
/* From this many bytes an all_reduce reads the peers' tensors in place when the members may
 * (local_direct.c). Below it, and for reduce_scatter at every size, staging through the
 * segment measured faster than the kernel's copies (bench/README.md). */
enum { ALL_REDUCE_DIRECT_MIN = 4 * 1024 * 1024 };
/* From this many bytes of a member's tensor, all_reduce and reduce_scatter ask whether every
 * member's lies in the shared heap, and then read them there (local_shared.c). Below, staging
 * measured as fast or faster: a small reduce_scatter's pieces pass through the ring in cache
 * (bench/README.md). */
enum { SHARED_ALL_REDUCE_MIN = 1024 * 1024, SHARED_REDUCE_SCATTER_MIN = 4 * 1024 * 1024 };

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static int64_t steps_for(int64_t items, int64_t per_step)
{
    return items > 0 ? (items + per_step - 1) / per_step : 1;
}

/* Elements of one member's piece when a buffer carries one piece per member: a multiple
 * of 64 bytes when the buffer allows it. */
static int64_t piece_elements(const ms_group *g, size_t esize)
{
    local_group *lg = g->impl;
    int64_t piece = (int64_t)(lg->seg->chunk_bytes / (size_t)g->size / esize);
    int64_t line = 64 / (int64_t)esize;
    return piece >= line ? piece / line * line : piece;
}

static local_call begin_call(ms_group *g, const char *name, int kind, int dtype, int op,
                             int root, int64_t count)
{
    local_group *lg = g->impl;
    local_call call = {.name = name};
    call.header.op_seq = lg->op_seq++;
    call.header.kind = kind;
    call.header.dtype = dtype;
    call.header.op = op;
    call.header.root = root;
    call.header.count = count;
    return call;
}

/* ---- all_gather: member m posts its input chunk by chunk; every member copies each
 * chunk into block m of its output. */
typedef struct gather_ctx {
    uint8_t *out;
    const uint8_t *in;
    int64_t bytes, chunk;
} gather_ctx;

static void gather_fill(const ms_group *g, void *ctx, int64_t t, uint8_t *mine)
{
    gather_ctx *c = ctx;
    int64_t offset = t * c->chunk, len = min64(c->chunk, c->bytes - offset);
    uint8_t *own_block = c->out + (size_t)g->rank * (size_t)c->bytes;
    if (len <= 0)
        return;
    memcpy(mine, c->in + offset, (size_t)len);
    /* From the posted copy, still in cache, rather than reading the input again. */
    if (own_block != c->in)
        local_copy_out(own_block + offset, mine, (size_t)len, (size_t)(c->bytes * g->size));
}

static void gather_read(const ms_group *g, void *ctx, int64_t t, uint32_t step)
{
    gather_ctx *c = ctx;
    int64_t offset = t * c->chunk, len = min64(c->chunk, c->bytes - offset);
    for (int m = 0; m < g->size && len > 0; m++)
        if (m != g->rank)
            local_copy_out(c->out + (size_t)m * (size_t)c->bytes + offset,
                           local_buffer(g->impl, m, step), (size_t)len,
                           (size_t)(c->bytes * g->size));
}

static int local_all_gather(ms_group *g, void *out, const void *in, int64_t count, int dtype)
{
    local_group *lg = g->impl;
    local_call call = begin_call(g, "all_gather_into_tensor", LOCAL_ALL_GATHER, dtype, 0, 0,
                                 count);
    gather_ctx c = {.out = out, .in = in, .bytes = count * (int64_t)ms_dtype_size(dtype),
                    .chunk = (int64_t)lg->seg->chunk_bytes};
    local_steps steps = {steps_for(c.bytes, c.chunk), gather_fill, gather_read, &c};
    return local_run_steps(g, &call, &steps);
}

/* ---- reduce_scatter: in each step a member posts the pieces of its input the others own
 * and reduces its own piece from everyone's. */
typedef struct scatter_ctx {
    uint8_t *out;
    const uint8_t *in;
    int64_t count, piece;
    size_t esize;
    int dtype, op;
} scatter_ctx;

static void scatter_fill(const ms_group *g, void *ctx, int64_t t, uint8_t *mine)
{
    scatter_ctx *c = ctx;
    int64_t start = t * c->piece, len = min64(c->piece, c->count - start);
    for (int j = 0; j < g->size && len > 0; j++)
        if (j != g->rank)
            memcpy(mine + (size_t)(j * c->piece) * c->esize,
                   c->in + (size_t)(j * c->count + start) * c->esize, (size_t)len * c->esize);
}

static void scatter_read(const ms_group *g, void *ctx, int64_t t, uint32_t step)
{
    scatter_ctx *c = ctx;
    int64_t start = t * c->piece, len = min64(c->piece, c->count - start);
    const void *srcs[LOCAL_MAX_RANKS];
    if (len <= 0)
        return;
    for (int k = 0; k < g->size; k++)
        srcs[k] = k == g->rank ? c->in + (size_t)(k * c->count + start) * c->esize
                               : local_buffer(g->impl, k, step) +
                                     (size_t)(g->rank * c->piece) * c->esize;
    local_reduce_out(c->out + (size_t)start * c->esize, srcs, g->size, (size_t)len, c->dtype,
                     c->op, (size_t)c->count * c->esize);
}

static int local_reduce_scatter(ms_group *g, void *out, const void *in, int64_t count,
                                int dtype, int op)
{
    local_call call = begin_call(g, "reduce_scatter_tensor", LOCAL_REDUCE_SCATTER, dtype, op,
                                 0, count);
    local_group *lg = g->impl;
    size_t esize = ms_dtype_size(dtype), in_bytes = (size_t)(count * g->size) * esize;
    if (lg->seg->heap_base && g->size > 1 && in_bytes >= SHARED_REDUCE_SCATTER_MIN) {
        direct_post posts[LOCAL_MAX_RANKS];
        int shared = 0;
        MS_CHECK(local_shared_agree(g, &call, in, in_bytes, posts, &shared));
        if (shared)
            return local_reduce_scatter_shared(g, &call, posts, out, count, dtype, op);
    }
    scatter_ctx c = {.out = out, .in = in, .count = count, .piece = piece_elements(g, esize),
                     .esize = esize, .dtype = dtype, .op = op};
    local_steps steps = {steps_for(count, c.piece), scatter_fill, scatter_read, &c};
    return local_run_steps(g, &call, &steps);
}

/* ---- all_reduce of small tensors: every member posts whole chunks and reduces all of
 * each chunk, in member order. */
typedef struct whole_ctx {
    uint8_t *data;
    int64_t count, per_step;
    size_t esize;
    int dtype, op;
} whole_ctx;

static void whole_fill(const ms_group *g, void *ctx, int64_t t, uint8_t *mine)
{
    (void)g;
    whole_ctx *c = ctx;
    int64_t start = t * c->per_step, len = min64(c->per_step, c->count - start);
    if (len > 0)
        memcpy(mine, c->data + (size_t)start * c->esize, (size_t)len * c->esize);
}

static void whole_read(const ms_group *g, void *ctx, int64_t t, uint32_t step)
{
    whole_ctx *c = ctx;
    int64_t start = t * c->per_step, len = min64(c->per_step, c->count - start);
    uint8_t *chunk = c->data + (size_t)start * c->esize;
    const void *srcs[LOCAL_MAX_RANKS];
    for (int k = 0; k < g->size; k++)
        srcs[k] = k == g->rank ? chunk : local_buffer(g->impl, k, step);
    if (len > 0)
        ms_comm_reduce(chunk, srcs, g->size, (size_t)len, c->dtype, c->op);
}

static int all_reduce_whole(ms_group *g, const local_call *call, void *data, int64_t count,
                            int dtype, int op)
{
    local_group *lg = g->impl;
    size_t esize = ms_dtype_size(dtype);
    whole_ctx c = {.data = data, .count = count, .esize = esize, .dtype = dtype, .op = op,
                   .per_step = (int64_t)(lg->seg->chunk_bytes / esize)};
    local_steps steps = {steps_for(count, c.per_step), whole_fill, whole_read, &c};
    return local_run_steps(g, call, &steps);
}

/* ---- all_reduce of large tensors: chunk t takes two steps. In its scatter step a member
 * posts the pieces of the chunk the others own; once everyone has, it reduces its own piece
 * in place and posts it in its gather step, from which the others copy it. A member copies
 * chunk t - 1's reduced pieces only after it posted chunk t's scatter step, so the others
 * have had that long to post them. */
typedef struct pieces_ctx {
    uint8_t *data;
    int64_t count, piece, per_chunk;
    size_t esize;
    int dtype, op;
} pieces_ctx;

static int64_t piece_len(const ms_group *g, const pieces_ctx *c, int64_t t, int j)
{
    (void)g;
    int64_t chunk_len = min64(c->per_chunk, c->count - t * c->per_chunk);
    return min64(c->piece, chunk_len - j * c->piece);
}

static uint8_t *piece_at(const pieces_ctx *c, int64_t t, int j)
{
    return c->data + (size_t)(t * c->per_chunk + j * c->piece) * c->esize;
}

static void post_scatter(ms_group *g, const pieces_ctx *c, int64_t t, uint8_t *mine)
{
    for (int j = 0; j < g->size; j++) {
        int64_t len = piece_len(g, c, t, j);
        if (j != g->rank && len > 0)
            memcpy(mine + (size_t)(j * c->piece) * c->esize, piece_at(c, t, j),
                   (size_t)len * c->esize);
    }
}

/* Reduce this member's piece of chunk t in place and copy it into gather. */
static void reduce_piece(ms_group *g, const pieces_ctx *c, int64_t t, uint32_t scatter,
                         uint8_t *gather)
{
    int64_t len = piece_len(g, c, t, g->rank);
    size_t offset = (size_t)(g->rank * c->piece) * c->esize;
    uint8_t *mine = piece_at(c, t, g->rank);
    const void *srcs[LOCAL_MAX_RANKS];
    if (len <= 0)
        return;
    for (int k = 0; k < g->size; k++)
        srcs[k] = k == g->rank ? mine : local_buffer(g->impl, k, scatter) + offset;
    ms_comm_reduce(mine, srcs, g->size, (size_t)len, c->dtype, c->op);
    memcpy(gather, mine, (size_t)len * c->esize);
}

static void copy_reduced(ms_group *g, const pieces_ctx *c, int64_t t, uint32_t gather)
{
    for (int j = 0; j < g->size; j++) {
        int64_t len = piece_len(g, c, t, j);
        if (j != g->rank && len > 0)
            local_copy_out(piece_at(c, t, j), local_buffer(g->impl, j, gather),
                           (size_t)len * c->esize, (size_t)c->count * c->esize);
    }
}

static int all_reduce_pieces(ms_group *g, const local_call *call, void *data, int64_t count,
                             int dtype, int op)
{
    local_group *lg = g->impl;
    size_t esize = ms_dtype_size(dtype);
    pieces_ctx c = {.data = data, .count = count, .piece = piece_elements(g, esize),
                    .esize = esize, .dtype = dtype, .op = op};
    c.per_chunk = c.piece * g->size;
    int64_t nchunks = steps_for(count, c.per_chunk);
    uint32_t first = lg->next_step;
    /* Chunk t's steps: scatter first + 2t, gather first + 2t + 1. A member posts and
     * consumes them in that order; the first runs alone (see local_run_steps). */
    MS_CHECK(local_wait_free(g, call, first));
    post_scatter(g, &c, 0, local_buffer(lg, g->rank, first));
    MS_CHECK(local_post(g, call, first));
    MS_CHECK(local_wait_posted(g, call, first, first));
    uint32_t last = first + (uint32_t)(2 * nchunks - 1);
    for (int64_t t = 0; t < nchunks; t++) {
        uint32_t scatter = first + (uint32_t)(2 * t), gather = scatter + 1;
        if (t > 0) {
            MS_CHECK(local_wait_posted(g, call, scatter - 1, gather));
            copy_reduced(g, &c, t - 1, scatter - 1);
            local_consume(g, scatter - 1);
            MS_CHECK(local_wait_posted(g, call, scatter, scatter));
        }
        MS_CHECK(local_wait_free(g, call, gather));
        reduce_piece(g, &c, t, scatter, local_buffer(lg, g->rank, gather));
        MS_CHECK(local_post(g, call, gather));
        local_consume(g, scatter);
        if (t + 1 < nchunks) {
            MS_CHECK(local_wait_free(g, call, gather + 1));
            post_scatter(g, &c, t + 1, local_buffer(lg, g->rank, gather + 1));
            MS_CHECK(local_post(g, call, gather + 1));
        }
    }
    MS_CHECK(local_wait_posted(g, call, last, last));
    copy_reduced(g, &c, nchunks - 1, last);
    local_consume(g, last);
    return MS_OK;
}

static int local_all_reduce(ms_group *g, void *data, int64_t count, int dtype, int op)
{
    local_call call = begin_call(g, "all_reduce", LOCAL_ALL_REDUCE, dtype, op, 0, count);
    size_t bytes = (size_t)count * ms_dtype_size(dtype);
    if (bytes <= ALL_REDUCE_WHOLE_MAX || g->size == 1)
        return all_reduce_whole(g, &call, data, count, dtype, op);
    local_group *lg = g->impl;
    if (lg->seg->heap_base && bytes >= SHARED_ALL_REDUCE_MIN) {
        direct_post posts[LOCAL_MAX_RANKS];
        int shared = 0;
        MS_CHECK(local_shared_agree(g, &call, data, bytes, posts, &shared));
        if (shared)
            return local_all_reduce_shared(g, &call, posts, data, count, dtype, op);
    }
    int direct = 0;
    if (bytes >= ALL_REDUCE_DIRECT_MIN)
        MS_CHECK(local_direct_ready(g, &call, &direct));
    if (direct)
        return local_all_reduce_direct(g, &call, data, count, dtype, op);
    return all_reduce_pieces(g, &call, data, count, dtype, op);
}

/* ---- broadcast: the root posts its tensor chunk by chunk; the others copy it. */
typedef struct broadcast_ctx {
    uint8_t *data;
    int64_t bytes, chunk;
    int root;
} broadcast_ctx;

static void broadcast_fill(const ms_group *g, void *ctx, int64_t t, uint8_t *mine)
{
    broadcast_ctx *c = ctx;
    int64_t offset = t * c->chunk, len = min64(c->chunk, c->bytes - offset);
    if (g->rank == c->root && len > 0)
        memcpy(mine, c->data + offset, (size_t)len);
}

static void broadcast_read(const ms_group *g, void *ctx, int64_t t, uint32_t step)
{
    broadcast_ctx *c = ctx;
    int64_t offset = t * c->chunk, len = min64(c->chunk, c->bytes - offset);
    if (g->rank != c->root && len > 0)
        local_copy_out(c->data + offset, local_buffer(g->impl, c->root, step), (size_t)len,
                       (size_t)c->bytes);
}

static int local_broadcast(ms_group *g, void *data, int64_t count, int dtype, int root)
{
    local_group *lg = g->impl;
    local_call call = begin_call(g, "broadcast", LOCAL_BROADCAST, dtype, 0, root, count);
    broadcast_ctx c = {.data = data, .bytes = count * (int64_t)ms_dtype_size(dtype),
                       .chunk = (int64_t)lg->seg->chunk_bytes, .root = root};
    local_steps steps = {steps_for(c.bytes, c.chunk), broadcast_fill, broadcast_read, &c};
    return local_run_steps(g, &call, &steps);
}

static int local_barrier(ms_group *g)
{
    local_call call = begin_call(g, "barrier", LOCAL_BARRIER, 0, 0, 0, 0);
    return local_barrier_step(g, &call);
}

const ms_comm_backend ms_local_backend = {
    .name = "local",
    .device_buffers = 0,
    .all_gather = local_all_gather,
    .reduce_scatter = local_reduce_scatter,
    .all_reduce = local_all_reduce,
    .broadcast = local_broadcast,
    .barrier = local_barrier,
    .new_group = local_new_group,
    .group_free = local_group_free,
};
