/* moonshard runtime: the mpi backend: collectives over OpenMPI communicators.
 * Every collective first agrees on a description of the call, so mismatches are errors. */
#include <dlfcn.h>
#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "signature.h"

typedef struct mpi_group {
    MPI_Comm comm; /* MPI_COMM_NULL for a non-member, and once MPI is finalised */
    uint32_t op_seq; /* collectives entered on comm */
    ms_group *handle;
    struct mpi_group *next_live;
} mpi_group;

static struct {
    int initialised_here; /* this runtime called MPI_Init, so it finalises */
    MPI_Datatype bf16, f16;
    MPI_Op user_ops[MS_DIST_MIN + 1]; /* f16, bf16 and NaN-propagating float max/min */
    mpi_group *live;                  /* group handles whose communicator is open */
    ms_group *world;
    char timed_out[256]; /* set by a collective that timed out: MPI is not used again */
} mpi;

static const ms_comm_backend mpi_backend;

static int mpi_fail(const char *name, const char *call, int code)
{
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    return MS_FAIL(MS_ERR_PEER_DIED, "%s: %s failed: %.*s", name, call, len, text);
}

static int64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Who arrived: a member waiting in a collective answers a peer's question (tag ASK, on the
 * group's communicator) with how many collectives it has entered on it (tag ANSWER). A
 * member that timed out asks every other one; those that answer with its own count are in
 * the same collective, the others did not arrive. Asked only after a timeout, answered
 * only while waiting, so a collective that completes pays nothing. */
enum { TAG_ASK = 32001, TAG_ANSWER = 32002, ANSWER_GRACE_MS = 2000 };

static void answer_questions(mpi_group *mg)
{
    for (;;) {
        int pending = 0;
        MPI_Status status;
        if (MPI_Iprobe(MPI_ANY_SOURCE, TAG_ASK, mg->comm, &pending, &status) != MPI_SUCCESS ||
            !pending)
            return;
        int64_t question, entered = mg->op_seq;
        MPI_Recv(&question, 1, MPI_INT64_T, status.MPI_SOURCE, TAG_ASK, mg->comm,
                 MPI_STATUS_IGNORE);
        MPI_Request request;
        if (MPI_Isend(&entered, 1, MPI_INT64_T, status.MPI_SOURCE, TAG_ANSWER, mg->comm,
                      &request) == MPI_SUCCESS)
            MPI_Wait(&request, MPI_STATUS_IGNORE); /* one int64: sent eagerly */
    }
}

/* "rank 3" or "ranks 2, 3" (world ranks) of the members that did not answer with our
 * count of collectives within the grace period; "" when every member did. */
static void missing_members(ms_group *g, char *out, size_t size)
{
    mpi_group *mg = g->impl;
    int n = g->size, missing = 0;
    int64_t asked = mg->op_seq, *answers = calloc((size_t)n, sizeof *answers);
    MPI_Request *asks = calloc((size_t)n, sizeof *asks), *replies = calloc((size_t)n, sizeof *replies);
    out[0] = '\0';
    if (!answers || !asks || !replies) {
        free(answers); free(asks); free(replies);
        return;
    }
    for (int j = 0; j < n; j++) {
        asks[j] = replies[j] = MPI_REQUEST_NULL;
        answers[j] = -1;
        if (j == g->rank)
            continue;
        MPI_Irecv(&answers[j], 1, MPI_INT64_T, j, TAG_ANSWER, mg->comm, &replies[j]);
        MPI_Isend(&asked, 1, MPI_INT64_T, j, TAG_ASK, mg->comm, &asks[j]);
    }
    int64_t deadline = now_ms() + (g->timeout_ms < ANSWER_GRACE_MS ? g->timeout_ms : ANSWER_GRACE_MS);
    int all = 0;
    while (!all) {
        answer_questions(mg);
        all = 1;
        for (int j = 0; j < n; j++) {
            int done = replies[j] == MPI_REQUEST_NULL;
            if (!done && MPI_Test(&replies[j], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
                replies[j] = MPI_REQUEST_NULL; /* a failed peer: it stays unanswered */
            all = all && (done || replies[j] == MPI_REQUEST_NULL);
        }
        if (!all && now_ms() > deadline)
            break;
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    char ranks[160] = "";
    size_t used = 0;
    for (int j = 0; j < n && used < sizeof ranks; j++) {
        if (j == g->rank || answers[j] == asked)
            continue;
        used += (size_t)snprintf(ranks + used, sizeof ranks - used, "%s%d", missing++ ? ", " : "",
                                 g->world_ranks[j]);
    }
    if (missing)
        snprintf(out, size, "%s %s", missing == 1 ? "rank" : "ranks", ranks);
    if (!all) /* open requests keep their buffers: this process makes no MPI call again */
        return;
    free(answers);
    free(asks);
    free(replies);
}

/* Wait for the collective behind *request for at most g's timeout. MPI_Test drives
 * progress; between tests the thread yields for a few microseconds, then sleeps 50 us
 * doubling to 1 ms (answering peers that ask who arrived), so processes sharing cores leave
 * them to the peers they wait for. MPI cannot cancel a collective, and a peer arriving late
 * would still write into its buffers whenever MPI next makes progress; so after a timeout
 * this process makes no MPI call again: every collective on every mpi group fails, and MPI
 * is not finalised at exit (mpirun then ends the job), as PyTorch's watchdog takes a
 * process down. The timeout names the members that did not arrive. */
static int wait_for(ms_group *g, const char *name, const char *call, MPI_Request *request)
{
    int64_t deadline = now_ms() + g->timeout_ms;
    long pause_ns = 50000;
    for (int tests = 0;; tests++) {
        int done = 0;
        int status = MPI_Test(request, &done, MPI_STATUS_IGNORE);
        if (status != MPI_SUCCESS)
            return ms_group_break(g, mpi_fail(name, call, status));
        if (done)
            return MS_OK;
        if (tests < 256) {
            sched_yield();
            continue;
        }
        answer_questions(g->impl);
        if (now_ms() > deadline) {
            char missing[192];
            missing_members(g, missing, sizeof missing);
            int call_len = (int)strcspn(call, "("); /* "MPI_Iallreduce" */
            int timeout = missing[0]
                ? MS_FAIL(MS_ERR_TIMEOUT, "%s: %s did not arrive within %lld ms (%.*s); MPI "
                          "is unusable in this process, which should end", name, missing,
                          (long long)g->timeout_ms, call_len, call)
                : MS_FAIL(MS_ERR_TIMEOUT, "%s: not every member arrived within %lld ms (%.*s); "
                          "MPI is unusable in this process, which should end", name,
                          (long long)g->timeout_ms, call_len, call);
            snprintf(mpi.timed_out, sizeof mpi.timed_out, "%s", ms_last_error());
            return ms_group_break(g, timeout);
        }
        struct timespec pause = {0, pause_ns};
        nanosleep(&pause, NULL);
        if (pause_ns < 1000000)
            pause_ns *= 2;
    }
}

/* Start a nonblocking MPI collective and wait for it within the group's timeout; a
 * failure breaks the group (members may be out of step). */
#define MPI_RUN(g, name, call, request)                                            \
    do {                                                                           \
        int mpi_status_ = (call);                                                  \
        if (mpi_status_ != MPI_SUCCESS)                                            \
            return ms_group_break((g), mpi_fail((name), #call, mpi_status_));      \
        MS_CHECK(wait_for((g), (name), #call, (request)));                         \
    } while (0)

static int dtype_of(MPI_Datatype type)
{
    if (type == MPI_FLOAT) return MS_F32;
    if (type == MPI_DOUBLE) return MS_F64;
    if (type == mpi.bf16) return MS_BF16;
    if (type == mpi.f16) return MS_F16;
    if (type == MPI_INT32_T) return MS_I32;
    if (type == MPI_INT64_T) return MS_I64;
    return MS_U8;
}

static MPI_Datatype type_of(int dtype)
{
    switch (dtype) {
    case MS_F32: return MPI_FLOAT;
    case MS_F64: return MPI_DOUBLE;
    case MS_BF16: return mpi.bf16;
    case MS_F16: return mpi.f16;
    case MS_I32: return MPI_INT32_T;
    case MS_I64: return MPI_INT64_T;
    default: return MPI_UINT8_T;
    }
}

#define DEFINE_USER_OP(NAME, OP)                                                   \
    static void NAME(void *in, void *inout, int *len, MPI_Datatype *type)         \
    {                                                                              \
        const void *srcs[2] = {in, inout};                                         \
        ms_comm_reduce(inout, srcs, 2, (size_t)*len, dtype_of(*type), OP);         \
    }
DEFINE_USER_OP(user_sum, MS_DIST_SUM)
DEFINE_USER_OP(user_max, MS_DIST_MAX)
DEFINE_USER_OP(user_min, MS_DIST_MIN)

/* MPI's built-in op where it computes what the local backend computes, else a user op. */
static MPI_Op op_of(int op, int dtype)
{
    int half = dtype == MS_BF16 || dtype == MS_F16;
    int floating = half || dtype == MS_F32 || dtype == MS_F64;
    if (op == MS_DIST_SUM || op == MS_DIST_AVG)
        return half ? mpi.user_ops[MS_DIST_SUM] : MPI_SUM;
    if (floating)
        return mpi.user_ops[op];
    return op == MS_DIST_MAX ? MPI_MAX : MPI_MIN;
}

/* "all_reduce(f32, 1024 elements, sum)" */
static const char *describe(char *buf, size_t size, const int64_t *s)
{
    const char *dtype = ms_dtype_name((int)s[2]) ? ms_dtype_name((int)s[2]) : "?";
    if (s[1] == MS_CALL_BARRIER)
        snprintf(buf, size, "barrier()");
    else if (s[1] == MS_CALL_BROADCAST)
        snprintf(buf, size, "broadcast(%s, %lld elements, root %lld)", dtype, (long long)s[5],
                 (long long)s[4]);
    else if (s[1] == MS_CALL_ALL_GATHER)
        snprintf(buf, size, "%s(%s, %lld elements)", ms_call_kind_name(s[1]), dtype,
                 (long long)s[5]);
    else
        snprintf(buf, size, "%s(%s, %lld elements, %s)", ms_call_kind_name(s[1]), dtype,
                 (long long)s[5], ms_comm_op_name((int)s[3]));
    return buf;
}

/* Members compare their calls with one MPI_Allreduce (the minimum of each field and of its
 * negation); when they differ, every member learns who called what and fails. */
static int agree(ms_group *g, const char *name, int kind, int dtype, int op, int root,
                 int64_t count)
{
    mpi_group *mg = g->impl;
    if (mpi.timed_out[0])
        return ms_group_break(g, MS_FAIL(MS_ERR_TIMEOUT, "%s: an earlier collective timed "
                                         "out: %s", name, mpi.timed_out));
    int64_t mine[MS_SIGNATURE_FIELDS] = {mg->op_seq++, kind, dtype, op, root, count};
    int64_t both[2 * MS_SIGNATURE_FIELDS], lowest[2 * MS_SIGNATURE_FIELDS];
    ms_signature_pack(both, mine);
    MPI_Request request;
    MPI_RUN(g, name, MPI_Iallreduce(both, lowest, 2 * MS_SIGNATURE_FIELDS, MPI_INT64_T, MPI_MIN,
                                    mg->comm, &request), &request);
    if (ms_signature_agreed(lowest))
        return MS_OK;
    int64_t *all = malloc(sizeof *all * MS_SIGNATURE_FIELDS * (size_t)g->size);
    if (!all)
        return ms_group_break(g, MS_FAIL(MS_ERR_OOM, "%s: ranks disagree about the call", name));
    int status = MPI_Iallgather(mine, MS_SIGNATURE_FIELDS, MPI_INT64_T, all,
                                MS_SIGNATURE_FIELDS, MPI_INT64_T, mg->comm, &request);
    status = status == MPI_SUCCESS ? wait_for(g, name, "MPI_Iallgather", &request)
                                   : ms_group_break(g, mpi_fail(name, "MPI_Iallgather", status));
    if (status == MS_OK)
        status = ms_signature_mismatch(g, name, mine, all, describe);
    free(all);
    return status;
}

/* MPI counts are int: larger buffers go in pieces of at most this many elements. */
enum { MAX_PIECE = 1 << 30 };

static int mpi_all_reduce(ms_group *g, void *data, int64_t count, int dtype, int op)
{
    const char *name = "all_reduce";
    mpi_group *mg = g->impl;
    MS_CHECK(agree(g, name, MS_CALL_ALL_REDUCE, dtype, op, 0, count));
    size_t esize = ms_dtype_size(dtype);
    for (int64_t start = 0; start < count; start += MAX_PIECE) {
        int n = (int)(count - start < MAX_PIECE ? count - start : MAX_PIECE);
        MPI_Request request;
        MPI_RUN(g, name, MPI_Iallreduce(MPI_IN_PLACE, (char *)data + (size_t)start * esize, n,
                                        type_of(dtype), op_of(op, dtype), mg->comm, &request),
                &request);
    }
    if (op == MS_DIST_AVG)
        ms_comm_divide(data, (size_t)count, dtype, g->size);
    return MS_OK;
}

static int mpi_broadcast(ms_group *g, void *data, int64_t count, int dtype, int root)
{
    const char *name = "broadcast";
    mpi_group *mg = g->impl;
    MS_CHECK(agree(g, name, MS_CALL_BROADCAST, dtype, 0, root, count));
    size_t esize = ms_dtype_size(dtype);
    for (int64_t start = 0; start < count; start += MAX_PIECE) {
        int n = (int)(count - start < MAX_PIECE ? count - start : MAX_PIECE);
        MPI_Request request;
        MPI_RUN(g, name, MPI_Ibcast((char *)data + (size_t)start * esize, n, type_of(dtype),
                                    root, mg->comm, &request), &request);
    }
    return MS_OK;
}

static int mpi_all_gather(ms_group *g, void *out, const void *in, int64_t count, int dtype)
{
    const char *name = "all_gather_into_tensor";
    mpi_group *mg = g->impl;
    MS_CHECK(agree(g, name, MS_CALL_ALL_GATHER, dtype, 0, 0, count));
    if (count > INT_MAX)
        return MS_FAIL(MS_ERR_UNSUPPORTED, "%s: %lld elements per rank (MPI takes at most %d)",
                       name, (long long)count, INT_MAX);
    size_t block = (size_t)count * ms_dtype_size(dtype);
    const void *send = in == (char *)out + (size_t)g->rank * block ? MPI_IN_PLACE : in;
    MPI_Request request;
    MPI_RUN(g, name, MPI_Iallgather(send, (int)count, type_of(dtype), out, (int)count,
                                    type_of(dtype), mg->comm, &request), &request);
    return MS_OK;
}

static int mpi_reduce_scatter(ms_group *g, void *out, const void *in, int64_t count, int dtype,
                              int op)
{
    const char *name = "reduce_scatter_tensor";
    mpi_group *mg = g->impl;
    MS_CHECK(agree(g, name, MS_CALL_REDUCE_SCATTER, dtype, op, 0, count));
    if (count > INT_MAX)
        return MS_FAIL(MS_ERR_UNSUPPORTED, "%s: %lld elements per rank (MPI takes at most %d)",
                       name, (long long)count, INT_MAX);
    size_t block = (size_t)count * ms_dtype_size(dtype);
    /* MPI's in-place form wants the result at the start of the input, not at our block */
    int aliased = block > 0 && out == (const char *)in + (size_t)g->rank * block;
    void *result = aliased ? malloc(block) : out;
    if (aliased && !result)
        return MS_FAIL(MS_ERR_OOM, "%s: out of host memory for %zu bytes", name, block);
    MPI_Request request;
    int status = MPI_Ireduce_scatter_block(in, result, (int)count, type_of(dtype),
                                           op_of(op, dtype), mg->comm, &request);
    status = status == MPI_SUCCESS
                 ? wait_for(g, name, "MPI_Ireduce_scatter_block", &request)
                 : ms_group_break(g, mpi_fail(name, "MPI_Ireduce_scatter_block", status));
    if (aliased) {
        if (status == MS_OK)
            memcpy(out, result, block);
        free(result);
    }
    if (status != MS_OK)
        return status;
    if (op == MS_DIST_AVG)
        ms_comm_divide(out, (size_t)count, dtype, g->size);
    return MS_OK;
}

static int mpi_barrier(ms_group *g) { return agree(g, "barrier", MS_CALL_BARRIER, 0, 0, 0, 0); }

/* A handle on comm (MPI_COMM_NULL for a non-member) listed among the live groups. */
static int wrap_comm(ms_group **out, MPI_Comm comm, const int *world_ranks, int nranks)
{
    mpi_group *mg = calloc(1, sizeof *mg);
    if (!mg)
        return MS_FAIL(MS_ERR_OOM, "new_group: out of host memory for the handle");
    int rank = -1;
    if (comm != MPI_COMM_NULL) {
        MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
        MPI_Comm_rank(comm, &rank);
    }
    int status = ms_group_alloc(out, &mpi_backend, rank, world_ranks, nranks, 0);
    if (status != MS_OK) {
        free(mg);
        return status;
    }
    mg->comm = comm;
    mg->handle = *out;
    mg->next_live = mpi.live;
    mpi.live = mg;
    (*out)->impl = mg;
    return MS_OK;
}

static int mpi_new_group(ms_group *parent, const int *ranks, int nranks, ms_group **out)
{
    mpi_group *parent_mg = parent->impl;
    int world_ranks[nranks], key = -1;
    for (int i = 0; i < nranks; i++) {
        world_ranks[i] = parent->world_ranks[ranks[i]];
        if (ranks[i] == parent->rank)
            key = i;
    }
    MPI_Comm comm;
    int status = MPI_Comm_split(parent_mg->comm, key >= 0 ? 0 : MPI_UNDEFINED, key, &comm);
    if (status != MPI_SUCCESS)
        return mpi_fail("new_group", "MPI_Comm_split", status);
    status = wrap_comm(out, comm, world_ranks, nranks);
    if (status != MS_OK && comm != MPI_COMM_NULL)
        MPI_Comm_free(&comm);
    return status;
}

static void mpi_group_free(ms_group *g)
{
    mpi_group *mg = g->impl;
    for (mpi_group **link = &mpi.live; *link; link = &(*link)->next_live) {
        if (*link == mg) {
            *link = mg->next_live;
            break;
        }
    }
    if (mg->comm != MPI_COMM_NULL)
        MPI_Comm_free(&mg->comm);
    free(mg);
    ms_group_dealloc(g);
}

static const ms_comm_backend mpi_backend = {
    .name = "mpi",
    .device_buffers = 0,
    .all_gather = mpi_all_gather,
    .reduce_scatter = mpi_reduce_scatter,
    .all_reduce = mpi_all_reduce,
    .broadcast = mpi_broadcast,
    .barrier = mpi_barrier,
    .new_group = mpi_new_group,
    .group_free = mpi_group_free,
};

/* OpenMPI loads its components with dlopen and they look up libmpi's symbols globally;
 * when libmoonshard itself was loaded with RTLD_LOCAL (LuaJIT's ffi.load), promote libmpi. */
static void make_mpi_symbols_global(void)
{
    Dl_info info;
    if (dladdr((void *)MPI_Init, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
}

/* MPI_Finalize waits for every process; one that exits while its peers still wait in a
 * collective would wait for ever. After the world's timeout it gives up with status 1,
 * which makes mpirun end the whole job. */
static void *finalize_watchdog(void *timeout)
{
    int64_t ms = *(const int64_t *)timeout;
    struct timespec span = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&span, &span) != 0) {
    }
    static const char message[] = "moonshard: mpi: the other processes did not finish within "
                                  "the timeout; exiting with status 1\n";
    ssize_t ignored = write(STDERR_FILENO, message, sizeof message - 1);
    (void)ignored;
    _exit(1);
}

static void finalize_at_exit(void)
{
    if (!mpi.world)
        return;
    int64_t timeout = mpi.world->timeout_ms;
    pthread_t watchdog;
    int watching = pthread_create(&watchdog, NULL, finalize_watchdog, &timeout) == 0;
    ms_mpi_finalize();
    if (watching) { /* gone before this library may be unloaded */
        pthread_cancel(watchdog);
        pthread_join(watchdog, NULL);
    }
}

int ms_mpi_init(void)
{
    ms_group *current = ms_dist_current_world();
    if (current && current->backend == &mpi_backend)
        return MS_OK;
    if (current)
        return MS_FAIL(MS_ERR_STATE, "mpi_init: this process already has a %s process group",
                       current->backend->name);
    int initialised = 0, finalised = 0;
    MPI_Initialized(&initialised);
    MPI_Finalized(&finalised);
    if (finalised)
        return MS_FAIL(MS_ERR_STATE, "mpi_init: MPI was finalised; it cannot start again");
    if (!initialised) {
        make_mpi_symbols_global();
        int provided;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return MS_FAIL(MS_ERR_STATE, "mpi_init: MPI_Init failed");
        mpi.initialised_here = 1;
        atexit(finalize_at_exit);
    }
    MPI_Type_contiguous(2, MPI_BYTE, &mpi.bf16);
    MPI_Type_commit(&mpi.bf16);
    MPI_Type_contiguous(2, MPI_BYTE, &mpi.f16);
    MPI_Type_commit(&mpi.f16);
    MPI_Op_create(user_sum, 1, &mpi.user_ops[MS_DIST_SUM]);
    MPI_Op_create(user_max, 1, &mpi.user_ops[MS_DIST_MAX]);
    MPI_Op_create(user_min, 1, &mpi.user_ops[MS_DIST_MIN]);
    MPI_Comm world;
    MPI_Comm_dup(MPI_COMM_WORLD, &world);
    int size;
    MPI_Comm_size(world, &size);
    MS_CHECK(wrap_comm(&mpi.world, world, NULL, size));
    ms_dist_set_world(mpi.world);
    return MS_OK;
}

int ms_mpi_finalize(void)
{
    if (!mpi.world)
        return MS_OK;
    ms_dist_set_world(NULL);
    if (mpi.timed_out[0]) { /* freeing or finalising would let late peers write */
        mpi.world = NULL;
        return MS_FAIL(MS_ERR_TIMEOUT, "mpi_finalize: not finalising MPI after a timeout: %s",
                       mpi.timed_out);
    }
    for (mpi_group *mg = mpi.live; mg; mg = mg->next_live) {
        if (mg->comm != MPI_COMM_NULL)
            MPI_Comm_free(&mg->comm);
        if (mg->handle->rank >= 0)
            ms_group_break(mg->handle, MS_FAIL(MS_ERR_STATE, "MPI was finalised"));
    }
    mpi_group_free(mpi.world);
    mpi.world = NULL;
    MPI_Op_free(&mpi.user_ops[MS_DIST_SUM]);
    MPI_Op_free(&mpi.user_ops[MS_DIST_MAX]);
    MPI_Op_free(&mpi.user_ops[MS_DIST_MIN]);
    MPI_Type_free(&mpi.bf16);
    MPI_Type_free(&mpi.f16);
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (mpi.initialised_here && !finalized)
        MPI_Finalize();
    mpi.initialised_here = 0;
    return MS_OK;
}
