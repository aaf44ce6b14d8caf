/* moonshard CPU backend: the strided N-d iterator behind element-wise ops, copies and
 * reductions, and the dense staging used by ops that want row-major rows. */
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

void ms_iter_begin(ms_iter *it, int ndim, const int64_t *shape)
{
    memset(it, 0, sizeof *it);
    it->ndim = ndim;
    it->numel = 1;
    for (int d = 0; d < ndim; d++) {
        it->shape[d] = shape[d];
        it->numel *= shape[d];
    }
}

void ms_iter_raw(ms_iter *it, void *data, size_t elem_size, const int64_t *strides)
{
    int k = it->nops++;
    it->data[k] = data;
    it->elem_size[k] = (int64_t)elem_size;
    for (int d = 0; d < it->ndim; d++)
        it->strides[k][d] = strides ? strides[d] : 0;
}

int ms_iter_tensor(ms_iter *it, const char *op, const char *name, const ms_tensor *t)
{
    int lead = it->ndim - t->ndim;
    int fits = lead >= 0;
    for (int d = 0; fits && d < t->ndim; d++)
        fits = t->shape[d] == it->shape[lead + d] || t->shape[d] == 1;
    if (!fits) {
        char from[160], to[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: %s of shape %s does not broadcast to %s", op, name,
                       ms_shape_str(from, sizeof from, t->ndim, t->shape),
                       ms_shape_str(to, sizeof to, it->ndim, it->shape));
    }
    int64_t strides[MS_MAX_DIMS] = {0};
    for (int d = 0; d < t->ndim; d++)
        strides[lead + d] = t->shape[d] == 1 ? 0 : t->strides[d];
    ms_iter_raw(it, ms_tensor_data(t), ms_dtype_size(t->dtype), strides);
    return MS_OK;
}

enum { TILE = 32 };

/* The dim to tile with the inner one, or -1: operand 0 (the output) runs with unit stride
 * along the inner dim while some input has its unit stride in another dim and a long
 * stride along the inner one, i.e. it is read transposed. */
static int pick_tile_dim(int nops, int ndim, const int64_t *shape,
                         int64_t strides[MS_ITER_MAX_OPS][MS_MAX_DIMS])
{
    int inner = ndim - 1;
    if (ndim < 2 || strides[0][inner] != 1 || shape[inner] < TILE)
        return -1;
    for (int k = 1; k < nops; k++) {
        int64_t s = strides[k][inner];
        if (s == 0 || s == 1 || s == -1)
            continue;
        for (int d = inner - 1; d >= 0; d--)
            if ((strides[k][d] == 1 || strides[k][d] == -1) && shape[d] >= TILE)
                return d;
    }
    return -1;
}

/* The coalesced loop: dims, byte strides and base pointers after merging. */
typedef struct geometry {
    int nops, ndim, tile_dim;
    int64_t shape[MS_MAX_DIMS];
    int64_t byte_strides[MS_ITER_MAX_OPS][MS_MAX_DIMS];
    int64_t inner_strides[MS_ITER_MAX_OPS];
    char *data[MS_ITER_MAX_OPS];
} geometry;

static void run_geometry(const geometry *g, ms_iter_fn fn, void *ctx)
{
    int nops = g->nops, ndim = g->ndim, tile_dim = g->tile_dim;
    const int64_t *shape = g->shape;
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++)
        numel *= shape[d];
    if (numel == 0)
        return;
    /* Walk every dim except the inner one (and tile_dim when tiling) with an odometer. */
    int outer_dims[MS_MAX_DIMS], nouter = 0;
    for (int d = 0; d < ndim - 1; d++)
        if (d != tile_dim)
            outer_dims[nouter++] = d;
    int64_t inner = shape[ndim - 1];
    int64_t tiled = tile_dim >= 0 ? shape[tile_dim] : 1;
    /* Byte offsets rather than pointers, so no pointer ever steps outside its block. */
    int64_t offsets[MS_ITER_MAX_OPS] = {0};
    int64_t index[MS_MAX_DIMS] = {0};
    char *ptrs[MS_ITER_MAX_OPS];
    int64_t outer_runs = numel / (inner * tiled);
    for (int64_t run = 0; run < outer_runs; run++) {
        if (tile_dim < 0) {
            for (int k = 0; k < nops; k++)
                ptrs[k] = g->data[k] + offsets[k];
            fn(ctx, inner, ptrs, g->inner_strides);
        } else {
            for (int64_t t0 = 0; t0 < tiled; t0 += TILE)
                for (int64_t i0 = 0; i0 < inner; i0 += TILE) {
                    int64_t t_end = t0 + TILE < tiled ? t0 + TILE : tiled;
                    int64_t count = inner - i0 < TILE ? inner - i0 : TILE;
                    for (int64_t t = t0; t < t_end; t++) {
                        for (int k = 0; k < nops; k++)
                            ptrs[k] = g->data[k] + offsets[k] +
                                      t * g->byte_strides[k][tile_dim] +
                                      i0 * g->byte_strides[k][ndim - 1];
                        fn(ctx, count, ptrs, g->inner_strides);
                    }
                }
        }
        for (int o = nouter - 1; o >= 0; o--) {
            int d = outer_dims[o];
            if (++index[d] < shape[d]) {
                for (int k = 0; k < nops; k++)
                    offsets[k] += g->byte_strides[k][d];
                break;
            }
            index[d] = 0;
            for (int k = 0; k < nops; k++)
                offsets[k] -= g->byte_strides[k][d] * (shape[d] - 1);
        }
    }
}

/* A split of the geometry along one dim, in units of `unit` indices of that dim (the inner
 * dim splits on whole cache lines of vectors). */
typedef struct split_job {
    const geometry *whole;
    int dim;
    int64_t unit;
    ms_iter_fn fn;
    void *ctx;
} split_job;

static void run_split(void *arg, int64_t begin, int64_t end)
{
    const split_job *job = arg;
    geometry part = *job->whole;
    int64_t first = begin * job->unit, last = end * job->unit;
    if (last > part.shape[job->dim])
        last = part.shape[job->dim];
    part.shape[job->dim] = last - first;
    for (int k = 0; k < part.nops; k++)
        part.data[k] += first * part.byte_strides[k][job->dim];
    run_geometry(&part, job->fn, job->ctx);
}

/* Splits the loop across threads along the outermost dim where operand 0 moves and that
 * has room for every range; runs it inline when the work is too small to pay. */
static void run_parallel(const geometry *g, int64_t numel, int64_t cost, ms_iter_fn fn,
                         void *ctx)
{
    int ranges = ms_parallel_ranges(numel, (double)numel * (double)(cost > 0 ? cost : 1));
    int dim = -1;
    for (int d = 0; ranges > 1 && d < g->ndim; d++) {
        if (g->byte_strides[0][d] == 0)
            continue;
        int64_t units = d == g->ndim - 1 ? (g->shape[d] + 63) / 64 : g->shape[d];
        if (units >= ranges) {
            dim = d;
            break;
        }
    }
    if (dim < 0) {
        run_geometry(g, fn, ctx);
        return;
    }
    split_job job = {g, dim, dim == g->ndim - 1 ? 64 : 1, fn, ctx};
    ms_parallel_for((g->shape[dim] + job.unit - 1) / job.unit, ranges, run_split, &job);
}

void ms_iter_run(ms_iter *it, ms_iter_fn fn, void *ctx)
{
    if (it->numel == 0)
        return;
    int nops = it->nops;
    /* Coalesce: drop size-1 dims, merge an outer dim into the next when every operand
     * steps over the inner dim's whole extent with the outer stride. Order is kept. */
    int ndim = 0;
    int64_t shape[MS_MAX_DIMS];
    int64_t strides[MS_ITER_MAX_OPS][MS_MAX_DIMS];
    for (int d = 0; d < it->ndim; d++) {
        if (it->shape[d] == 1)
            continue;
        int merge = ndim > 0;
        for (int k = 0; merge && k < nops; k++)
            merge = strides[k][ndim - 1] == it->strides[k][d] * it->shape[d];
        if (merge) {
            shape[ndim - 1] *= it->shape[d];
            for (int k = 0; k < nops; k++)
                strides[k][ndim - 1] = it->strides[k][d];
        } else {
            shape[ndim] = it->shape[d];
            for (int k = 0; k < nops; k++)
                strides[k][ndim] = it->strides[k][d];
            ndim++;
        }
    }
    if (ndim == 0) {
        ndim = 1;
        shape[0] = 1;
        for (int k = 0; k < nops; k++)
            strides[k][0] = 0;
    }

    geometry g = {.nops = nops, .ndim = ndim};
    for (int d = 0; d < ndim; d++)
        g.shape[d] = shape[d];
    for (int k = 0; k < nops; k++) {
        g.data[k] = it->data[k];
        g.inner_strides[k] = strides[k][ndim - 1];
        for (int d = 0; d < ndim; d++)
            g.byte_strides[k][d] = strides[k][d] * it->elem_size[k];
    }
    g.tile_dim = it->any_order ? pick_tile_dim(nops, ndim, shape, strides) : -1;
    if (it->any_order || it->split_outputs)
        run_parallel(&g, it->numel, it->cost, fn, ctx);
    else
        run_geometry(&g, fn, ctx);
}

int ms_cpu_alloc(const char *op, size_t nbytes, void **ptr)
{
    *ptr = malloc(nbytes ? nbytes : 1);
    if (!*ptr)
        return MS_FAIL(MS_ERR_OOM, "%s: out of host memory for %zu bytes of scratch", op,
                       nbytes);
    return MS_OK;
}

#define COPY_RUN(T)                                                     \
    do {                                                                \
        T *dst = (T *)ptrs[0];                                          \
        const T *src = (const T *)ptrs[1];                              \
        int64_t sd = strides[0], ss = strides[1];                       \
        if (sd == 1 && ss == 1) {                                       \
            memmove(dst, src, (size_t)n * sizeof(T));                   \
        } else if (ss == 0) {                                           \
            T value = *src;                                             \
            for (int64_t i = 0; i < n; i++)                             \
                dst[i * sd] = value;                                    \
        } else                                                          \
            for (int64_t i = 0; i < n; i++)                             \
                dst[i * sd] = src[i * ss];                              \
    } while (0)

void ms_cpu_copy_run(void *ctx, int64_t n, char *const *ptrs, const int64_t *strides)
{
    switch (*(const size_t *)ctx) {
    case 1: COPY_RUN(uint8_t); break;
    case 2: COPY_RUN(uint16_t); break;
    case 4: COPY_RUN(uint32_t); break;
    default: COPY_RUN(uint64_t); break;
    }
}

void ms_cpu_copy_layout(void *dst, const int64_t *dst_strides, const void *src,
                        const int64_t *src_strides, int ndim, const int64_t *shape,
                        size_t elem_size)
{
    ms_iter it;
    ms_iter_begin(&it, ndim, shape);
    ms_iter_raw(&it, dst, elem_size, dst_strides);
    ms_iter_raw(&it, (void *)src, elem_size, src_strides);
    it.any_order = 1;
    ms_iter_run(&it, ms_cpu_copy_run, &elem_size);
}

int ms_cpu_dense(const char *op, const ms_tensor *t, int copy_in, void **data, void **owned)
{
    *owned = NULL;
    *data = ms_tensor_data(t);
    if (ms_tensor_is_contiguous(t))
        return MS_OK;
    size_t elem_size = ms_dtype_size(t->dtype);
    MS_CHECK(ms_cpu_alloc(op, (size_t)t->numel * elem_size, owned));
    if (copy_in) {
        int64_t dense_strides[MS_MAX_DIMS];
        ms_contiguous_strides(t->ndim, t->shape, dense_strides);
        ms_cpu_copy_layout(*owned, dense_strides, *data, t->strides, t->ndim, t->shape,
                           elem_size);
    }
    *data = *owned;
    return MS_OK;
}

void ms_cpu_dense_done(const ms_tensor *t, void *owned, int write_back)
{
    if (!owned)
        return;
    if (write_back) {
        int64_t dense_strides[MS_MAX_DIMS];
        ms_contiguous_strides(t->ndim, t->shape, dense_strides);
        ms_cpu_copy_layout(ms_tensor_data(t), t->strides, owned, dense_strides, t->ndim,
                           t->shape, ms_dtype_size(t->dtype));
    }
    free(owned);
}
