/* moonshard runtime: the local backend's collectives, through the segment's ring of buffers
 * in bounded steps. */
#include <string.h>

#include "local.h"

/* Up to this many bytes an all_reduce sends whole tensors and every member reduces all
 * of it (one synchronisation per step); above, members reduce one piece each and then
 * exchange the reduced pieces (half the copying and arithmetic per member). */
enum { ALL_REDUCE_WHOLE_MAX = 64 * 1024 };

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

static int local_all_gather(ms_group *g, void *out, const void *in, int64_t count, int dtype)
{
    local_group *lg = g->impl;
    local_call call = begin_call(g, "all_gather_into_tensor", LOCAL_ALL_GATHER, dtype, 0, 0,
                                 count);
    int64_t bytes = count * (int64_t)ms_dtype_size(dtype);
    int64_t chunk = (int64_t)lg->seg->chunk_bytes;
    int64_t nsteps = steps_for(bytes, chunk);
    uint8_t *own_block = (uint8_t *)out + (size_t)g->rank * (size_t)bytes;
    uint32_t first = lg->next_step;
    for (int64_t t = 0; t < nsteps; t++) {
        uint32_t step = first + (uint32_t)t;
        int64_t offset = t * chunk, len = min64(chunk, bytes - offset);
        MS_CHECK(local_wait_free(g, &call, step));
        if (len > 0)
            memcpy(local_buffer(lg, g->rank, step), (const uint8_t *)in + offset, (size_t)len);
        local_post(g, &call, step);
        if (len > 0 && own_block != in)
            local_copy_out(own_block + offset, (const uint8_t *)in + offset, (size_t)len,
                           (size_t)(bytes * g->size));
        MS_CHECK(local_wait_posted(g, &call, step));
        for (int m = 0; m < g->size && len > 0; m++)
            if (m != g->rank)
                local_copy_out((uint8_t *)out + (size_t)m * (size_t)bytes + offset,
                               local_buffer(lg, m, step), (size_t)len, (size_t)(bytes * g->size));
        local_consume(g, step);
    }
    return MS_OK;
}

static int local_reduce_scatter(ms_group *g, void *out, const void *in, int64_t count,
                                int dtype, int op)
{
    local_group *lg = g->impl;
    local_call call = begin_call(g, "reduce_scatter_tensor", LOCAL_REDUCE_SCATTER, dtype, op,
                                 0, count);
    size_t esize = ms_dtype_size(dtype);
    int64_t piece = piece_elements(g, esize);
    int64_t nsteps = steps_for(count, piece);
    const void *srcs[LOCAL_MAX_RANKS];
    uint32_t first = lg->next_step;
    for (int64_t t = 0; t < nsteps; t++) {
        uint32_t step = first + (uint32_t)t;
        int64_t start = t * piece, len = min64(piece, count - start);
        MS_CHECK(local_wait_free(g, &call, step));
        uint8_t *mine = local_buffer(lg, g->rank, step);
        for (int j = 0; j < g->size && len > 0; j++)
            if (j != g->rank)
                memcpy(mine + (size_t)(j * piece) * esize,
                       (const uint8_t *)in + (size_t)(j * count + start) * esize,
                       (size_t)len * esize);
        local_post(g, &call, step);
        MS_CHECK(local_wait_posted(g, &call, step));
        for (int k = 0; k < g->size; k++)
            srcs[k] = k == g->rank
                          ? (const uint8_t *)in + (size_t)(k * count + start) * esize
                          : local_buffer(lg, k, step) + (size_t)(g->rank * piece) * esize;
        if (len > 0)
            ms_comm_reduce((uint8_t *)out + (size_t)start * esize, srcs, g->size, (size_t)len,
                           dtype, op);
        local_consume(g, step);
    }
    return MS_OK;
}

/* Every member posts whole chunks and reduces all of each chunk, in member order. */
static int all_reduce_whole(ms_group *g, const local_call *call, void *data, int64_t count,
                            int dtype, int op)
{
    local_group *lg = g->impl;
    size_t esize = ms_dtype_size(dtype);
    int64_t per_step = (int64_t)(lg->seg->chunk_bytes / esize);
    int64_t nsteps = steps_for(count, per_step);
    const void *srcs[LOCAL_MAX_RANKS];
    uint32_t first = lg->next_step;
    for (int64_t t = 0; t < nsteps; t++) {
        uint32_t step = first + (uint32_t)t;
        int64_t start = t * per_step, len = min64(per_step, count - start);
        uint8_t *chunk = (uint8_t *)data + (size_t)start * esize;
        MS_CHECK(local_wait_free(g, call, step));
        if (len > 0)
            memcpy(local_buffer(lg, g->rank, step), chunk, (size_t)len * esize);
        local_post(g, call, step);
        MS_CHECK(local_wait_posted(g, call, step));
        for (int k = 0; k < g->size; k++)
            srcs[k] = k == g->rank ? chunk : local_buffer(lg, k, step);
        if (len > 0)
            ms_comm_reduce(chunk, srcs, g->size, (size_t)len, dtype, op);
        local_consume(g, step);
    }
    return MS_OK;
}

/* Each chunk takes two steps: members post the pieces the others own and reduce their own
 * piece (a reduce-scatter), then post their reduced piece for the others to copy. */
static int all_reduce_pieces(ms_group *g, const local_call *call, void *data, int64_t count,
                             int dtype, int op)
{
    local_group *lg = g->impl;
    size_t esize = ms_dtype_size(dtype);
    int64_t piece = piece_elements(g, esize), per_chunk = piece * g->size;
    int64_t nchunks = steps_for(count, per_chunk);
    const void *srcs[LOCAL_MAX_RANKS];
    uint32_t first = lg->next_step;
    for (int64_t t = 0; t < nchunks; t++) {
        uint32_t scatter = first + (uint32_t)(2 * t), gather = scatter + 1;
        int64_t chunk_start = t * per_chunk;
        uint8_t *chunk = (uint8_t *)data + (size_t)chunk_start * esize;
        int64_t chunk_len = min64(per_chunk, count - chunk_start);
        MS_CHECK(local_wait_free(g, call, scatter));
        uint8_t *mine = local_buffer(lg, g->rank, scatter);
        for (int j = 0; j < g->size; j++) {
            int64_t len = min64(piece, chunk_len - j * piece);
            if (j != g->rank && len > 0)
                memcpy(mine + (size_t)(j * piece) * esize, chunk + (size_t)(j * piece) * esize,
                       (size_t)len * esize);
        }
        local_post(g, call, scatter);
        MS_CHECK(local_wait_posted(g, call, scatter));
        MS_CHECK(local_wait_free(g, call, gather));
        int64_t my_len = min64(piece, chunk_len - g->rank * piece);
        size_t my_offset = (size_t)(g->rank * piece) * esize;
        uint8_t *my_piece = chunk + my_offset;
        for (int k = 0; k < g->size; k++)
            srcs[k] = k == g->rank ? my_piece : local_buffer(lg, k, scatter) + my_offset;
        if (my_len > 0) {
            ms_comm_reduce(my_piece, srcs, g->size, (size_t)my_len, dtype, op);
            memcpy(local_buffer(lg, g->rank, gather), my_piece, (size_t)my_len * esize);
        }
        local_consume(g, scatter);
        local_post(g, call, gather);
        MS_CHECK(local_wait_posted(g, call, gather));
        for (int j = 0; j < g->size; j++) {
            int64_t len = min64(piece, chunk_len - j * piece);
            if (j != g->rank && len > 0)
                local_copy_out(chunk + (size_t)(j * piece) * esize, local_buffer(lg, j, gather),
                               (size_t)len * esize, (size_t)count * esize);
        }
        local_consume(g, gather);
    }
    return MS_OK;
}

static int local_all_reduce(ms_group *g, void *data, int64_t count, int dtype, int op)
{
    local_call call = begin_call(g, "all_reduce", LOCAL_ALL_REDUCE, dtype, op, 0, count);
    size_t bytes = (size_t)count * ms_dtype_size(dtype);
    if (bytes <= ALL_REDUCE_WHOLE_MAX || g->size == 1)
        return all_reduce_whole(g, &call, data, count, dtype, op);
    return all_reduce_pieces(g, &call, data, count, dtype, op);
}

static int local_broadcast(ms_group *g, void *data, int64_t count, int dtype, int root)
{
    local_group *lg = g->impl;
    local_call call = begin_call(g, "broadcast", LOCAL_BROADCAST, dtype, 0, root, count);
    int64_t bytes = count * (int64_t)ms_dtype_size(dtype);
    int64_t chunk = (int64_t)lg->seg->chunk_bytes;
    int64_t nsteps = steps_for(bytes, chunk);
    uint32_t first = lg->next_step;
    for (int64_t t = 0; t < nsteps; t++) {
        uint32_t step = first + (uint32_t)t;
        int64_t offset = t * chunk, len = min64(chunk, bytes - offset);
        MS_CHECK(local_wait_free(g, &call, step));
        if (g->rank == root && len > 0)
            memcpy(local_buffer(lg, root, step), (uint8_t *)data + offset, (size_t)len);
        local_post(g, &call, step);
        MS_CHECK(local_wait_posted(g, &call, step));
        if (g->rank != root && len > 0)
            local_copy_out((uint8_t *)data + offset, local_buffer(lg, root, step), (size_t)len,
                           (size_t)bytes);
        local_consume(g, step);
    }
    return MS_OK;
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
