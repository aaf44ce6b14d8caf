/* moonshard runtime: the nccl backend: collectives on each device's communication stream.
 * Members first agree on every call through the bootstrap group (local or mpi) they came
 * from, so a mismatched call or a dead peer fails on the host instead of hanging the GPU. */
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "signature.h"
#include "cuda/cuda_internal.h"
#include "cuda/gpu.h"
#include "order_keys.cuh"

typedef struct nccl_group {
    ncclComm_t comm;     /* NULL for a non-member */
    int device;
    ms_group *bootstrap; /* the same members in the bootstrap backend */
    uint32_t op_seq;
} nccl_group;

static struct {
    ms_group *world;
    ms_group *bootstrap_world; /* the world this process had before ms_nccl_open */
} nccl;

static const ms_comm_backend nccl_backend;

static int nccl_fail(ms_group *g, const char *name, const char *call, ncclResult_t result)
{
    int status = result == ncclRemoteError || result == ncclSystemError ? MS_ERR_PEER_DIED
                                                                        : MS_ERR_DEVICE;
    return ms_group_break(g, MS_FAIL(status, "%s: %s failed: %s", name, call,
                                     ncclGetErrorString(result)));
}

/* Run an NCCL call; a failure breaks the group (members may be out of step). */
#define NCCL_CHECK(g, name, call)                                   \
    do {                                                            \
        ncclResult_t nccl_result_ = (call);                         \
        if (nccl_result_ != ncclSuccess)                            \
            return nccl_fail((g), (name), #call, nccl_result_);     \
    } while (0)

static ncclDataType_t type_of(int dtype)
{
    switch (dtype) {
    case MS_F32: return ncclFloat32;
    case MS_F64: return ncclFloat64;
    case MS_BF16: return ncclBfloat16;
    case MS_F16: return ncclFloat16;
    case MS_I32: return ncclInt32;
    case MS_I64: return ncclInt64;
    default: return ncclUint8;
    }
}

static ncclRedOp_t op_of(int op)
{
    switch (op) {
    case MS_DIST_AVG: return ncclAvg;
    case MS_DIST_MAX: return ncclMax;
    case MS_DIST_MIN: return ncclMin;
    default: return ncclSum;
    }
}

static const char *describe(char *buf, size_t size, const int64_t *s)
{
    const char *dtype = ms_dtype_name((int)s[2]) ? ms_dtype_name((int)s[2]) : "?";
    if (s[1] == MS_CALL_BARRIER || s[1] == MS_CALL_INVALID)
        snprintf(buf, size, "%s", ms_call_kind_name(s[1]));
    else if (s[1] == MS_CALL_BROADCAST)
        snprintf(buf, size, "broadcast(%s, %lld elements, root %lld)", dtype, (long long)s[5],
                 (long long)s[4]);
    else
        snprintf(buf, size, "%s(%s, %lld elements, %s)", ms_call_kind_name(s[1]), dtype,
                 (long long)s[5],
                 s[1] == MS_CALL_ALL_GATHER ? "-" : ms_comm_op_name((int)s[3]));
    return buf;
}

/* Members compare their calls with one bootstrap all-reduce (the minimum of each field and
 * of its negation); when they differ, every member learns who called what and fails. */
static int agree(ms_group *g, const char *name, int kind, int dtype, int op, int root,
                 int64_t count)
{
    nccl_group *ng = g->impl;
    ms_group *boot = ng->bootstrap;
    boot->timeout_ms = g->timeout_ms; /* dist.set_timeout on this group bounds the wait */
    int64_t mine[MS_SIGNATURE_FIELDS] = {ng->op_seq++, kind, dtype, op, root, count};
    int64_t both[2 * MS_SIGNATURE_FIELDS];
    ms_signature_pack(both, mine);
    int status = boot->backend->all_reduce(boot, both, 2 * MS_SIGNATURE_FIELDS, MS_I64,
                                           MS_DIST_MIN);
    if (status != MS_OK) { /* "all_reduce: rank 2 died ..." becomes "<name>: rank 2 died ..." */
        char detail[512];
        const char *message = ms_last_error();
        const char *prefix = "all_reduce: ";
        snprintf(detail, sizeof detail, "%s",
                 strncmp(message, prefix, strlen(prefix)) ? message : message + strlen(prefix));
        /* a peer is gone: abort, so kernels of earlier collectives stop waiting for it */
        if (ng->comm && (status == MS_ERR_PEER_DIED || status == MS_ERR_TIMEOUT)) {
            ncclCommAbort(ng->comm);
            ng->comm = NULL;
        }
        return ms_group_break(g, MS_FAIL(status, "%s: %s", name, detail));
    }
    if (ms_signature_agreed(both))
        return MS_OK;
    int64_t *all = malloc(sizeof *all * MS_SIGNATURE_FIELDS * (size_t)g->size);
    if (!all)
        return ms_group_break(g, MS_FAIL(MS_ERR_OOM, "%s: ranks disagree about the call", name));
    status = boot->backend->all_gather(boot, all, mine, MS_SIGNATURE_FIELDS, MS_I64);
    if (status != MS_OK) {
        free(all);
        return ms_group_break(g, status);
    }
    status = ms_signature_mismatch(g, name, mine, all, describe);
    free(all);
    return status;
}

/* Buffers must be memory of the group's device (group.c checked they are in a cuda pool). */
static int check_buffer(const ms_group *g, const char *name, const void *data)
{
    const nccl_group *ng = g->impl;
    struct cudaPointerAttributes attributes;
    if (!data)
        return MS_OK;
    if (cudaPointerGetAttributes(&attributes, data) != cudaSuccess) {
        cudaGetLastError();
        return MS_FAIL(MS_ERR_DEVICE, "%s: a buffer is not CUDA memory", name);
    }
    if (attributes.type != cudaMemoryTypeDevice || attributes.device != ng->device)
        return MS_FAIL(MS_ERR_DEVICE, "%s: a buffer lives on cuda:%d but this rank's "
                       "communicator uses cuda:%d", name, attributes.device, ng->device);
    return MS_OK;
}

/* ncclMax and ncclMin need not propagate NaN on floats, so float max and min reduce order
 * keys (kernels/order_keys.h) as unsigned integers: 4 bytes a key, 8 for f64. */
static int uses_order_keys(int dtype, int op)
{
    return (op == MS_DIST_MAX || op == MS_DIST_MIN) &&
           (dtype == MS_F32 || dtype == MS_F64 || dtype == MS_F16 || dtype == MS_BF16);
}

static size_t order_key_size(int dtype) { return dtype == MS_F64 ? 8 : 4; }

static ncclDataType_t order_key_type(int dtype)
{
    return dtype == MS_F64 ? ncclUint64 : ncclUint32;
}

/* Agree on the call (a member whose buffers or scratch failed makes every member fail), then
 * order the communication stream after the compute stream. With key_count > 0, [OUT]
 * *keys is scratch for that many order keys of dtype in the group's device pool, released
 * with release_keys. */
static int begin(ms_group *g, const char *name, int kind, int dtype, int op, int root,
                 int64_t count, const void *out, const void *in, int64_t key_count,
                 ms_tensor **keys)
{
    nccl_group *ng = g->impl;
    int local = ms_cuda_use_device(ng->device);
    if (local == MS_OK)
        local = check_buffer(g, name, out);
    if (local == MS_OK)
        local = check_buffer(g, name, in);
    if (local == MS_OK && key_count > 0) {
        local = ms_cuda_tensor_new(keys, dtype == MS_F64 ? MS_I64 : MS_I32, 1, &key_count,
                                   MS_POOL_CUDA0 + ng->device);
        if (local != MS_OK) {
            char reason[256];
            snprintf(reason, sizeof reason, "%s", ms_last_error());
            MS_FAIL(local, "%s: no scratch for %lld order keys on cuda:%d: %s", name,
                    (long long)key_count, ng->device, reason);
        }
    }
    if (local != MS_OK) {
        char message[256];
        snprintf(message, sizeof message, "%s", ms_last_error());
        agree(g, name, MS_CALL_INVALID, 0, 0, 0, 0);
        return MS_FAIL(local, "%s", message);
    }
    int status = agree(g, name, kind, dtype, op, root, count);
    if (status == MS_OK)
        status = ms_cuda_comm_wait_compute(ng->device);
    if (status != MS_OK && key_count > 0) {
        ms_tensor_free(*keys);
        *keys = NULL;
    }
    return status;
}

/* The scratch goes back to the pool; its next user waits for the collective on the device. */
static int release_keys(ms_group *g, ms_tensor *keys)
{
    if (!keys)
        return MS_OK;
    nccl_group *ng = g->impl;
    int status = ms_cuda_mark_pending(ng->device, ms_tensor_data(keys), ms_tensor_nbytes(keys));
    ms_tensor_free(keys);
    return status;
}

/* A failed launch after the members agreed leaves them out of step. */
static int launched(ms_group *g, const char *name, int error)
{
    return error ? ms_group_break(g, ms_cuda_launched(name, error)) : MS_OK;
}

/* Later ops touching the buffers wait for the collective on the device. */
static int finish(ms_group *g, const void *out, size_t out_bytes, const void *in,
                  size_t in_bytes)
{
    nccl_group *ng = g->impl;
    MS_CHECK(ms_cuda_mark_pending(ng->device, out, out_bytes));
    if (in && in != out)
        MS_CHECK(ms_cuda_mark_pending(ng->device, in, in_bytes));
    return MS_OK;
}

static int nccl_all_gather(ms_group *g, void *out, const void *in, int64_t count, int dtype)
{
    const char *name = "all_gather_into_tensor";
    nccl_group *ng = g->impl;
    MS_CHECK(begin(g, name, MS_CALL_ALL_GATHER, dtype, 0, 0, count, out, in, 0, NULL));
    if (count > 0) /* empty buffers may be NULL, which NCCL refuses */
        NCCL_CHECK(g, name, ncclAllGather(in, out, (size_t)count, type_of(dtype), ng->comm,
                                          ms_cuda_comm_stream(ng->device)));
    size_t block = (size_t)count * ms_dtype_size(dtype);
    return finish(g, out, block * (size_t)g->size, in, block);
}

/* Reduce-scatter of the order keys of in, in place in keys (size * count of them), whose
 * block g->rank then decodes into out. */
static int reduce_scatter_keys(ms_group *g, const char *name, void *out, const void *in,
                               void *keys, int64_t count, int dtype, int op)
{
    nccl_group *ng = g->impl;
    cudaStream_t stream = ms_cuda_comm_stream(ng->device);
    void *own_keys = (char *)keys + (size_t)g->rank * (size_t)count * order_key_size(dtype);
    MS_CHECK(launched(g, name, ms_cu_order_keys_encode(stream, keys, in, count * g->size, dtype,
                                                       op == MS_DIST_MAX)));
    NCCL_CHECK(g, name, ncclReduceScatter(keys, own_keys, (size_t)count, order_key_type(dtype),
                                          op_of(op), ng->comm, stream));
    return launched(g, name, ms_cu_order_keys_decode(stream, out, own_keys, count, dtype));
}

static int nccl_reduce_scatter(ms_group *g, void *out, const void *in, int64_t count, int dtype,
                               int op)
{
    const char *name = "reduce_scatter_tensor";
    nccl_group *ng = g->impl;
    /* in stays as it was: its keys go to scratch */
    int64_t key_count = count > 0 && uses_order_keys(dtype, op) ? count * g->size : 0;
    ms_tensor *keys = NULL;
    MS_CHECK(begin(g, name, MS_CALL_REDUCE_SCATTER, dtype, op, 0, count, out, in, key_count,
                   &keys));
    int status = MS_OK;
    if (keys) {
        status = reduce_scatter_keys(g, name, out, in, ms_tensor_data(keys), count, dtype, op);
        int released = release_keys(g, keys);
        status = status != MS_OK ? status : released;
    } else if (count > 0) { /* empty buffers may be NULL, which NCCL refuses */
        NCCL_CHECK(g, name, ncclReduceScatter(in, out, (size_t)count, type_of(dtype),
                                              op_of(op), ng->comm,
                                              ms_cuda_comm_stream(ng->device)));
    }
    MS_CHECK(status);
    size_t block = (size_t)count * ms_dtype_size(dtype);
    return finish(g, out, block, in, block * (size_t)g->size);
}

/* All-reduce of data's order keys in keys (which may be data itself), decoded into data. */
static int all_reduce_keys(ms_group *g, const char *name, void *data, void *keys,
                           int64_t count, int dtype, int op)
{
    nccl_group *ng = g->impl;
    cudaStream_t stream = ms_cuda_comm_stream(ng->device);
    MS_CHECK(launched(g, name, ms_cu_order_keys_encode(stream, keys, data, count, dtype,
                                                       op == MS_DIST_MAX)));
    NCCL_CHECK(g, name, ncclAllReduce(keys, keys, (size_t)count, order_key_type(dtype),
                                      op_of(op), ng->comm, stream));
    return launched(g, name, ms_cu_order_keys_decode(stream, data, keys, count, dtype));
}

static int nccl_all_reduce(ms_group *g, void *data, int64_t count, int dtype, int op)
{
    const char *name = "all_reduce";
    nccl_group *ng = g->impl;
    int keyed = count > 0 && uses_order_keys(dtype, op);
    /* f32 and f64 keys have their values' width and replace them in place */
    int64_t key_count = keyed && order_key_size(dtype) != ms_dtype_size(dtype) ? count : 0;
    ms_tensor *keys = NULL;
    MS_CHECK(begin(g, name, MS_CALL_ALL_REDUCE, dtype, op, 0, count, data, NULL, key_count,
                   &keys));
    int status = MS_OK;
    if (keyed) {
        status = all_reduce_keys(g, name, data, keys ? ms_tensor_data(keys) : data, count,
                                 dtype, op);
        int released = release_keys(g, keys);
        status = status != MS_OK ? status : released;
    } else if (count > 0) { /* empty buffers may be NULL, which NCCL refuses */
        NCCL_CHECK(g, name, ncclAllReduce(data, data, (size_t)count, type_of(dtype),
                                          op_of(op), ng->comm,
                                          ms_cuda_comm_stream(ng->device)));
    }
    MS_CHECK(status);
    return finish(g, data, (size_t)count * ms_dtype_size(dtype), NULL, 0);
}

static int nccl_broadcast(ms_group *g, void *data, int64_t count, int dtype, int root)
{
    const char *name = "broadcast";
    nccl_group *ng = g->impl;
    MS_CHECK(begin(g, name, MS_CALL_BROADCAST, dtype, 0, root, count, data, NULL, 0, NULL));
    if (count > 0) /* empty buffers may be NULL, which NCCL refuses */
        NCCL_CHECK(g, name, ncclBroadcast(data, data, (size_t)count, type_of(dtype), root,
                                          ng->comm, ms_cuda_comm_stream(ng->device)));
    return finish(g, data, (size_t)count * ms_dtype_size(dtype), NULL, 0);
}

/* Every member has arrived and this rank's device work queued so far has finished. */
static int nccl_barrier(ms_group *g)
{
    nccl_group *ng = g->impl;
    MS_CHECK(begin(g, "barrier", MS_CALL_BARRIER, 0, 0, 0, 0, NULL, NULL, 0, NULL));
    return ms_cuda_sync_streams(ng->device);
}

static int wrap(ms_group **out, ncclComm_t comm, int device, ms_group *bootstrap)
{
    nccl_group *ng = calloc(1, sizeof *ng);
    if (!ng)
        return MS_FAIL(MS_ERR_OOM, "nccl: out of host memory for the handle");
    int status = ms_group_alloc(out, &nccl_backend, bootstrap->rank, bootstrap->world_ranks,
                                bootstrap->size, bootstrap->timeout_ms);
    if (status != MS_OK) {
        free(ng);
        return status;
    }
    *ng = (nccl_group){comm, device, bootstrap, 0};
    (*out)->impl = ng;
    return MS_OK;
}

static int nccl_new_group(ms_group *parent, const int *ranks, int nranks, ms_group **out)
{
    nccl_group *parent_ng = parent->impl;
    ms_group *boot_parent = parent_ng->bootstrap, *boot = NULL;
    MS_CHECK(boot_parent->backend->new_group(boot_parent, ranks, nranks, &boot));
    int key = -1;
    for (int i = 0; i < nranks; i++)
        if (ranks[i] == parent->rank)
            key = i;
    ncclComm_t comm = NULL;
    ncclResult_t result = ncclCommSplit(parent_ng->comm, key >= 0 ? 0 : NCCL_SPLIT_NOCOLOR,
                                        key >= 0 ? key : 0, &comm, NULL);
    int status = result == ncclSuccess ? wrap(out, comm, parent_ng->device, boot)
                                       : nccl_fail(parent, "new_group", "ncclCommSplit", result);
    if (status != MS_OK) {
        if (comm)
            ncclCommDestroy(comm);
        boot->backend->group_free(boot);
    }
    return status;
}

static void nccl_group_free(ms_group *g)
{
    nccl_group *ng = g->impl;
    if (ng->comm)
        ncclCommDestroy(ng->comm);
    if (g != nccl.world)
        ng->bootstrap->backend->group_free(ng->bootstrap);
    free(ng);
    ms_group_dealloc(g);
}

static int nccl_device(const ms_group *g) { return ((const nccl_group *)g->impl)->device; }

static const ms_comm_backend nccl_backend = {
    .name = "nccl",
    .device_buffers = 1,
    .all_gather = nccl_all_gather,
    .reduce_scatter = nccl_reduce_scatter,
    .all_reduce = nccl_all_reduce,
    .broadcast = nccl_broadcast,
    .barrier = nccl_barrier,
    .new_group = nccl_new_group,
    .group_free = nccl_group_free,
    .device = nccl_device,
};

/* The rank's index among the ranks on its machine: the world rank for local ranks (one
 * machine), OpenMPI's local rank under mpirun. */
static int local_rank(const ms_group *world)
{
    const char *mpi_local = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    return mpi_local ? atoi(mpi_local) : world->rank;
}

int ms_nccl_open(void)
{
    ms_group *bootstrap = ms_dist_current_world();
    if (bootstrap && bootstrap->backend == &nccl_backend)
        return MS_OK;
    if (!bootstrap)
        return MS_FAIL(MS_ERR_STATE, "nccl_init: no process group to bootstrap from: run "
                                     "inside dist.spawn or under mpirun");
    int devices = 0;
    MS_CHECK(ms_cuda_count_devices(&devices));
    if (devices == 0)
        return MS_FAIL(MS_ERR_DEVICE, "nccl_init: %s", ms_cuda_probe_reason());
    int device = local_rank(bootstrap) % devices;
    MS_CHECK(ms_cuda_use_device(device));
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (bootstrap->rank == 0) {
        ncclResult_t result = ncclGetUniqueId(&id);
        if (result != ncclSuccess)
            memset(&id, 0, sizeof id); /* the others learn of it from the zero id */
    }
    MS_CHECK(bootstrap->backend->broadcast(bootstrap, &id, sizeof id, MS_U8, 0));
    static const ncclUniqueId zero_id;
    if (!memcmp(&id, &zero_id, sizeof id))
        return MS_FAIL(MS_ERR_DEVICE, "nccl_init: rank 0 could not make an NCCL unique id");
    ncclComm_t comm;
    ncclResult_t result = ncclCommInitRank(&comm, bootstrap->size, id, bootstrap->rank);
    if (result != ncclSuccess)
        return MS_FAIL(MS_ERR_DEVICE, "nccl_init: ncclCommInitRank on cuda:%d failed: %s",
                       device, ncclGetErrorString(result));
    int status = wrap(&nccl.world, comm, device, bootstrap);
    if (status != MS_OK) {
        ncclCommDestroy(comm);
        return status;
    }
    nccl.bootstrap_world = bootstrap;
    ms_dist_set_world(nccl.world);
    return MS_OK;
}

int ms_nccl_close(void)
{
    if (!nccl.world)
        return MS_OK;
    nccl_group *ng = nccl.world->impl;
    int status = ms_cuda_sync_streams(ng->device);
    ms_dist_set_world(nccl.bootstrap_world);
    nccl_group_free(nccl.world);
    nccl.world = NULL;
    nccl.bootstrap_world = NULL;
    return status;
}
