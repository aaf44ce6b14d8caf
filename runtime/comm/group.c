/* moonshard runtime: the public process-group API on top of any backend.
 * Checks tensors (dtype, contiguity, sizes, overlap) and group state, then dispatches. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "../fence.h"

static ms_group *world_group;

void ms_dist_set_world(ms_group *world) { world_group = world; }

ms_group *ms_dist_current_world(void) { return world_group; }

int ms_dist_world(ms_group **world)
{
    if (!world)
        return MS_FAIL(MS_ERR_INVALID, "dist_world: world must not be NULL");
    if (!world_group)
        return MS_FAIL(MS_ERR_STATE, "dist_world: no process group: run inside dist.spawn "
                                     "or under mpirun");
    *world = world_group;
    return MS_OK;
}

int ms_group_alloc(ms_group **out, const ms_comm_backend *backend, int rank,
                   const int *world_ranks, int nranks, int64_t timeout_ms)
{
    ms_group *g = calloc(1, sizeof *g);
    int *ranks = malloc(sizeof *ranks * (size_t)(nranks > 0 ? nranks : 1));
    if (!g || !ranks) {
        free(g);
        free(ranks);
        return MS_FAIL(MS_ERR_OOM, "new_group: out of host memory for the handle");
    }
    for (int i = 0; i < nranks; i++)
        ranks[i] = world_ranks ? world_ranks[i] : i;
    g->backend = backend;
    g->rank = rank;
    g->size = nranks;
    g->world_ranks = ranks;
    g->timeout_ms = timeout_ms > 0 ? timeout_ms : MS_DIST_DEFAULT_TIMEOUT_MS;
    *out = g;
    return MS_OK;
}

void ms_group_dealloc(ms_group *g)
{
    if (!g)
        return;
    free(g->world_ranks);
    free(g);
}

int ms_group_break(ms_group *g, int status)
{
    if (!g->broken_status) {
        g->broken_status = status;
        snprintf(g->broken_message, sizeof g->broken_message, "%s", ms_last_error());
    }
    return status;
}

int ms_group_rank(const ms_group *g) { return g ? g->rank : -1; }

int ms_group_size(const ms_group *g) { return g ? g->size : 0; }

const char *ms_group_backend(const ms_group *g) { return g ? g->backend->name : ""; }

int ms_group_device(const ms_group *g)
{
    return g && g->backend->device ? g->backend->device(g) : -1;
}

int ms_group_ranks(const ms_group *g, int *world_ranks)
{
    if (!g || !world_ranks)
        return MS_FAIL(MS_ERR_INVALID, "group_ranks: group and world_ranks must not be NULL");
    memcpy(world_ranks, g->world_ranks, sizeof *world_ranks * (size_t)g->size);
    return MS_OK;
}

int ms_group_set_timeout(ms_group *g, int64_t timeout_ms)
{
    if (!g && ms_dist_world(&g) != MS_OK)
        return MS_ERR_STATE;
    if (timeout_ms <= 0)
        return MS_FAIL(MS_ERR_INVALID, "group_set_timeout: %lld ms (must be > 0)",
                       (long long)timeout_ms);
    g->timeout_ms = timeout_ms;
    return MS_OK;
}

int64_t ms_group_timeout(const ms_group *g)
{
    if (!g)
        g = world_group;
    return g ? g->timeout_ms : 0;
}

static int compare_ints(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int ms_group_new(ms_group **out, ms_group *parent, const int *ranks, int nranks)
{
    if (!out)
        return MS_FAIL(MS_ERR_INVALID, "new_group: out must not be NULL");
    if (!parent)
        MS_CHECK(ms_dist_world(&parent));
    if (parent->rank < 0)
        return MS_FAIL(MS_ERR_STATE, "new_group: this process is not a member of the parent");
    if (nranks < 1 || nranks > parent->size || !ranks)
        return MS_FAIL(MS_ERR_INVALID, "new_group: %d ranks for a parent of %d", nranks,
                       parent->size);
    int *sorted = malloc(sizeof *sorted * (size_t)nranks);
    if (!sorted)
        return MS_FAIL(MS_ERR_OOM, "new_group: out of host memory");
    memcpy(sorted, ranks, sizeof *sorted * (size_t)nranks);
    qsort(sorted, (size_t)nranks, sizeof *sorted, compare_ints);
    for (int i = 0; i < nranks; i++) {
        if (sorted[i] < 0 || sorted[i] >= parent->size || (i > 0 && sorted[i] == sorted[i - 1])) {
            int bad = sorted[i];
            free(sorted);
            return MS_FAIL(MS_ERR_INVALID, "new_group: rank %d %s (parent has %d ranks)", bad,
                           bad < 0 || bad >= parent->size ? "is out of range" : "is repeated",
                           parent->size);
        }
    }
    int status = parent->backend->new_group(parent, sorted, nranks, out);
    free(sorted);
    if (status == MS_OK)
        (*out)->timeout_ms = parent->timeout_ms;
    return status;
}

void ms_group_free(ms_group *g)
{
    if (g && g != world_group)
        g->backend->group_free(g);
}

/* The group a collective runs on, after the checks every collective shares. */
static int resolve_group(const char *op, ms_group **g)
{
    if (!*g) {
        int status = ms_dist_world(g);
        if (status != MS_OK)
            return MS_FAIL(status, "%s: no process group: run inside dist.spawn or under "
                                   "mpirun", op);
    }
    if ((*g)->rank < 0)
        return MS_FAIL(MS_ERR_STATE, "%s: this process is not a member of the group", op);
    if ((*g)->broken_status)
        return MS_FAIL((*g)->broken_status, "%s: the group is unusable after an earlier "
                                            "failure: %s", op, (*g)->broken_message);
    return ms_interrupt_check(op, 0);
}

static int check_buffer(const char *op, const char *name, const ms_group *g,
                        const ms_tensor *t)
{
    MS_CHECK(ms_check_tensor(op, name, t));
    if (!ms_tensor_is_contiguous(t))
        return MS_FAIL(MS_ERR_INVALID, "%s: %s must be contiguous (call :contiguous() first)",
                       op, name);
    int on_device = t->storage && t->storage->pool >= MS_POOL_CUDA0;
    if (t->numel > 0 && on_device != g->backend->device_buffers)
        return MS_FAIL(MS_ERR_DEVICE, "%s: %s is in pool %s but the %s backend needs %s "
                                      "tensors", op, name, ms_pool_name(t->storage->pool),
                       g->backend->name, g->backend->device_buffers ? "cuda" : "CPU");
    return MS_OK;
}

/* The average of integers is not an integer: like torch.distributed, refuse it rather than
 * truncate (or wrap, as a sum in the tensor's dtype would). */
static int check_op(const char *name, int op, int dtype)
{
    if (op < MS_DIST_SUM || op > MS_DIST_MIN)
        return MS_FAIL(MS_ERR_INVALID, "%s: unknown reduce op %d (sum, avg, max or min)",
                       name, op);
    if (op == MS_DIST_AVG && (dtype == MS_I32 || dtype == MS_I64 || dtype == MS_U8))
        return MS_FAIL(MS_ERR_DTYPE, "%s: avg needs a floating dtype (f32, f64, bf16 or f16), got "
                                     "%s (torch.distributed refuses it too): use sum and divide, "
                                     "or a float tensor", name, ms_dtype_name(dtype));
    return MS_OK;
}

static int check_same_dtype(const char *op, const ms_tensor *out, const ms_tensor *in)
{
    if (out->dtype != in->dtype)
        return MS_FAIL(MS_ERR_DTYPE, "%s: output is %s but input is %s", op,
                       ms_dtype_name(out->dtype), ms_dtype_name(in->dtype));
    return MS_OK;
}

/* A smaller buffer must be exactly block `block` of the larger one, or lie apart from it. */
static int check_block_alias(const char *op, const ms_tensor *whole, const ms_tensor *part,
                             int block)
{
    const char *w = ms_tensor_data(whole), *p = ms_tensor_data(part);
    size_t whole_bytes = ms_tensor_nbytes(whole), part_bytes = ms_tensor_nbytes(part);
    if (!w || !p || part_bytes == 0)
        return MS_OK;
    if (p + part_bytes <= w || p >= w + whole_bytes || p == w + (size_t)block * part_bytes)
        return MS_OK;
    return MS_FAIL(MS_ERR_INVALID, "%s: input and output overlap (only this rank's block "
                                   "of the larger tensor may be shared)", op);
}

int ms_dist_all_reduce(ms_group *g, ms_tensor *t, int op)
{
    const char *name = "all_reduce";
    MS_CHECK(resolve_group(name, &g));
    MS_CHECK(check_buffer(name, "tensor", g, t));
    MS_CHECK(check_op(name, op, t->dtype));
    ms_fence_before_foreign_write(ms_tensor_data(t), ms_tensor_nbytes(t));
    return g->backend->all_reduce(g, ms_tensor_data(t), t->numel, t->dtype, op);
}

int ms_dist_all_gather_into_tensor(ms_group *g, ms_tensor *out, const ms_tensor *in)
{
    const char *name = "all_gather_into_tensor";
    MS_CHECK(resolve_group(name, &g));
    MS_CHECK(check_buffer(name, "output", g, out));
    MS_CHECK(check_buffer(name, "input", g, in));
    MS_CHECK(check_same_dtype(name, out, in));
    if (out->numel != in->numel * g->size)
        return MS_FAIL(MS_ERR_SHAPE, "%s: output has %lld elements, expected %d ranks * %lld",
                       name, (long long)out->numel, g->size, (long long)in->numel);
    MS_CHECK(check_block_alias(name, out, in, g->rank));
    ms_fence_before_foreign_write(ms_tensor_data(out), ms_tensor_nbytes(out));
    return g->backend->all_gather(g, ms_tensor_data(out), ms_tensor_data(in), in->numel,
                                  in->dtype);
}

int ms_dist_reduce_scatter_tensor(ms_group *g, ms_tensor *out, const ms_tensor *in, int op)
{
    const char *name = "reduce_scatter_tensor";
    MS_CHECK(resolve_group(name, &g));
    MS_CHECK(check_buffer(name, "output", g, out));
    MS_CHECK(check_buffer(name, "input", g, in));
    MS_CHECK(check_same_dtype(name, out, in));
    MS_CHECK(check_op(name, op, out->dtype));
    if (in->numel != out->numel * g->size)
        return MS_FAIL(MS_ERR_SHAPE, "%s: input has %lld elements, expected %d ranks * %lld",
                       name, (long long)in->numel, g->size, (long long)out->numel);
    MS_CHECK(check_block_alias(name, in, out, g->rank));
    ms_fence_before_foreign_write(ms_tensor_data(out), ms_tensor_nbytes(out));
    return g->backend->reduce_scatter(g, ms_tensor_data(out), ms_tensor_data(in), out->numel,
                                      out->dtype, op);
}

int ms_dist_broadcast(ms_group *g, ms_tensor *t, int root)
{
    const char *name = "broadcast";
    MS_CHECK(resolve_group(name, &g));
    MS_CHECK(check_buffer(name, "tensor", g, t));
    if (root < 0 || root >= g->size)
        return MS_FAIL(MS_ERR_INVALID, "%s: root %d outside the group of %d", name, root,
                       g->size);
    ms_fence_before_foreign_write(ms_tensor_data(t), ms_tensor_nbytes(t));
    return g->backend->broadcast(g, ms_tensor_data(t), t->numel, t->dtype, root);
}

int ms_dist_barrier(ms_group *g)
{
    MS_CHECK(resolve_group("barrier", &g));
    return g->backend->barrier(g);
}

int ms_mpi_launched(void)
{
    static const char *const variables[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK",
                                            "PMI_SIZE"};
    for (size_t i = 0; i < sizeof variables / sizeof *variables; i++)
        if (getenv(variables[i]))
            return 1;
    return 0;
}
