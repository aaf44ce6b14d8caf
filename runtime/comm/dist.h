/* moonshard runtime: process groups and collectives (public part, included by ms.h).
 * Backends: local (fork + shared memory, ms_spawn_new), mpi (ms_mpi_init under mpirun),
 * nccl (ms_nccl_init in cuda/gpu.h, on top of either).
 *
 * Collectives take contiguous tensors (MS_ERR_INVALID names the tensor otherwise) of one
 * dtype, every dtype of ms.h: CPU tensors on local and mpi, tensors on the group's device
 * (ms_group_device) on nccl. Max and min propagate NaN on every backend; avg takes floating
 * dtypes only (an integer tensor gives MS_ERR_DTYPE, as torch.distributed refuses it).
 * Every member of the group must call the same collective with the same dtype, element
 * count, op and root, in the same order; when they do not, every member gets
 * MS_ERR_MISMATCH (never a
 * corrupted buffer) and the group stays usable. A member that dies or exits makes the
 * others fail with MS_ERR_PEER_DIED naming it; one that does not arrive within the group's
 * timeout gives MS_ERR_TIMEOUT, and on the local backend that member's collective then fails
 * too when it arrives, naming the member that gave up (it never completes with data the
 * others stopped waiting for). After either the group is unusable: later collectives on
 * it return the same status and message. Reductions combine members in rank order, so
 * every member gets bitwise identical results. g == NULL means the world group of this
 * process. */
#ifndef MS_DIST_H
#define MS_DIST_H

#include "../ms.h"

/* ffi-begin */
/* ---- process groups and collectives ---- */
typedef enum ms_dist_op {
    MS_DIST_SUM = 0, MS_DIST_AVG = 1, MS_DIST_MAX = 2, MS_DIST_MIN = 3
} ms_dist_op;

/* A process group: the world, or a sub-group from ms_group_new. Opaque. */
typedef struct ms_group ms_group;

/* [OUT] *world: this process's world group (owned by the runtime, valid until the process
 * ends or ms_mpi_finalize). MS_ERR_STATE when no backend is initialised. */
int ms_dist_world(ms_group **world);
/* This process's index in g, or -1 when it is not a member (or g is invalid). */
int ms_group_rank(const ms_group *g);
/* Number of members of g (0 for NULL). */
int ms_group_size(const ms_group *g);
/* [OUT] world_ranks[0..size): the world rank of each member, in group order. */
int ms_group_ranks(const ms_group *g, int *world_ranks);
/* "local", "mpi", "nccl"; "" for NULL. Static storage. */
const char *ms_group_backend(const ms_group *g);
/* The CUDA device index the group's collectives run on, -1 for host backends or NULL. */
int ms_group_device(const ms_group *g);
/* How long a collective on g waits for a member before MS_ERR_TIMEOUT (> 0 ms). On the mpi
 * backend a timeout leaves MPI unusable in the process (every later collective fails and
 * MPI is not finalised, so mpirun ends the job); for the mpi world it also bounds how long
 * MPI_Finalize at exit waits for the other processes before the process exits with
 * status 1. */
int ms_group_set_timeout(ms_group *g, int64_t timeout_ms);
/* g's timeout in ms (the world's for NULL); 0 when g is NULL and there is no world. */
int64_t ms_group_timeout(const ms_group *g);

/* A group of parent's members listed in ranks (indices in parent, any order, no repeats).
 * Every member of parent calls it with the same list, in the same order (like PyTorch's
 * new_group). A caller that is not listed gets a handle whose rank is -1; collectives on
 * it fail with MS_ERR_STATE. parent NULL is the world. [OUT] *out, freed with
 * ms_group_free. Members are ordered by their index in parent. */
int ms_group_new(ms_group **out, ms_group *parent, const int *ranks, int nranks);
/* Release a handle from ms_group_new. NULL and the world handle are ignored. */
void ms_group_free(ms_group *g);

/* In place: t = t op (every member's t). */
int ms_dist_all_reduce(ms_group *g, ms_tensor *t, int op);
/* out (size * in.numel elements) = every member's in, concatenated in rank order. in may
 * be out's own block (in place); it must not overlap out otherwise. */
int ms_dist_all_gather_into_tensor(ms_group *g, ms_tensor *out, const ms_tensor *in);
/* out (in.numel / size elements) = op over members of their block number rank of in.
 * out may be in's own block; it must not overlap in otherwise. */
int ms_dist_reduce_scatter_tensor(ms_group *g, ms_tensor *out, const ms_tensor *in, int op);
/* t on every member = t of member root (an index in g). */
int ms_dist_broadcast(ms_group *g, ms_tensor *t, int root);
int ms_dist_barrier(ms_group *g);

/* ---- the local backend: ranks forked from this process ---- */
/* What a spawned rank did, as its parent saw it. */
typedef enum ms_rank_state {
    MS_RANK_RUNNING = 0,  /* not reaped yet */
    MS_RANK_RETURNED = 1, /* finished with ms_local_finish(0, ...) */
    MS_RANK_FAILED = 2,   /* finished with ms_local_finish(1, ...): bytes is the error */
    MS_RANK_EXITED = 3,   /* ended without ms_local_finish; code is its exit status */
    MS_RANK_KILLED = 4    /* ended by a signal; code is the signal number */
} ms_rank_state;

typedef struct ms_rank_outcome {
    int32_t state;       /* ms_rank_state */
    int32_t code;        /* exit status or signal number */
    int32_t pid;
    int32_t reserved;
    const char *bytes;   /* result or error text from ms_local_finish; owned by the job */
    size_t nbytes;
    const char *reason;  /* "returned", "died (signal 9)", ...; owned by the job */
} ms_rank_outcome;

/* The parent's handle on the ranks of one ms_spawn_new. Opaque. */
typedef struct ms_spawn ms_spawn;

/* Fork world_size ranks (1 to 64) that share one anonymous shared-memory segment, made
 * before the fork so nothing is left in /dev/shm. Each rank dies with its parent and uses
 * max(1, cores / world_size) compute threads. timeout_ms <= 0 means 60 s, the initial
 * timeout of every group. Data moves through the segment in chunks of 512 KiB per rank
 * (MOONSHARD_COMM_CHUNK_KB overrides).
 * In the parent: [OUT] *rank = -1 and *job, to be waited for and freed.
 * In rank r: [OUT] *rank = r, *job = NULL, ms_dist_world gives the world group; the rank
 * ends with ms_local_finish. Fails with MS_ERR_STATE inside a rank or under MPI. */
int ms_spawn_new(ms_spawn **job, int world_size, int64_t timeout_ms, int *rank);
/* In a rank: hand the outcome to the parent and end the process with _exit (stdio is
 * flushed first). failed == 0: bytes is the result; else the error text. Returns only
 * outside a spawned rank (MS_ERR_STATE) or when the parent is gone (errno). */
int ms_local_finish(int failed, const void *bytes, size_t nbytes);
/* Parent: wait until every rank has ended and reap it. A rank that ends without
 * returning makes every other rank's collectives fail with MS_ERR_PEER_DIED; ranks still
 * running the spawn's timeout after that are killed (reason "was stopped ..."). SIGINT or
 * SIGTERM to the parent while it waits sends SIGTERM to every running rank and kills
 * those still running 500 ms later; the call then returns MS_ERR_INTERRUPTED once every
 * rank is reaped (outcomes stay readable). While a rank holds the console
 * (ms_local_hold_console), SIGINT is left to that rank. */
int ms_spawn_wait(ms_spawn *job);
/* In a rank: held != 0 says this rank's REPL reads the terminal, whose Ctrl-C reaches every
 * process of the job: the parent then ignores SIGINT; 0 gives it back. */
int ms_local_hold_console(int held);
/* Parent: [OUT] *outcome of rank (pointers stay valid until ms_spawn_free). */
int ms_spawn_outcome(const ms_spawn *job, int rank, ms_rank_outcome *outcome);
/* Parent: kill and reap ranks still running, unmap the segment, free the job. */
void ms_spawn_free(ms_spawn *job);

/* Copy n bytes with streaming stores (whole cache lines written around the cache, as the
 * local backend copies large destinations); memcpy where the CPU has none. dst and src must
 * not overlap. For copy bounds in benchmarks (bench/collectives.lua). */
void ms_local_stream_copy(void *dst, const void *src, size_t n);

/* ---- the mpi backend ---- */
/* 1 when this process was started by mpirun (OpenMPI, PMIx or PMI variables), else 0. */
int ms_mpi_launched(void);
/* Initialise MPI (once; later calls do nothing) and install MPI_COMM_WORLD as the world
 * group. MS_ERR_UNSUPPORTED when the runtime was built without MPI. */
int ms_mpi_init(void);
/* Free the groups' communicators and finalise MPI; the world group is gone afterwards. */
int ms_mpi_finalize(void);
/* ffi-end */

#endif
