/* moonshard runtime: layout of the local backend's shared segment and its step protocol.
 * The parent maps the segment before forking, so every rank sees it at the same address. */
#ifndef MS_LOCAL_H
#define MS_LOCAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "comm.h"

enum {
    LOCAL_MAX_RANKS = 64,
    LOCAL_MAX_GROUPS = 256,
    LOCAL_RING_DEPTH = 8,     /* buffers per member: steps in flight before reuse waits */
    LOCAL_LOOKAHEAD = 2,      /* steps a member fills ahead of the one it reads */
    LOCAL_HEADER_BYTES = 64,  /* a step header, ahead of each buffer's data */
    LOCAL_WAIT_SLICE_MS = 50, /* longest futex sleep between abort and deadline checks */
};

/* A futex word, the number of processes sleeping on it and the least value one of them
 * waits for (a publish below it wakes nobody), alone on a cache line. */
typedef struct local_counter {
    _Atomic uint32_t value;
    _Atomic uint32_t sleepers;
    _Atomic uint32_t wake_at;
    char pad[52];
} local_counter;

/* Progress of one member of a group, as step counts (wrapping, compared by difference). */
typedef struct local_member {
    local_counter posted;   /* steps whose buffer this member has filled */
    local_counter consumed; /* steps whose peers' buffers this member has finished reading */
} local_member;

/* Why a member gave up waiting for a peer's post (a timeout or an interrupt), written by the
 * first member that did, after it made that peer's post counter refuse further posts: the
 * late peer's post fails, and so does every member waiting for it, instead of the late peer
 * completing the collective with data the others stopped waiting for. */
typedef struct local_failure {
    _Atomic int32_t by;    /* world rank + 1 of the first member that gave up; 0: none */
    _Atomic int32_t ready; /* status and message are written */
    int32_t status;
    char message[244];
} local_failure;

typedef enum local_kind {
    LOCAL_ALL_GATHER = 1, LOCAL_REDUCE_SCATTER, LOCAL_ALL_REDUCE, LOCAL_BROADCAST,
    LOCAL_BARRIER
} local_kind;

/* What a member posts with each step; peers compare it with their own, so members that
 * called different collectives stop at the first step instead of misreading data. */
typedef struct local_step_header {
    uint32_t op_seq; /* collectives started on the group before this one */
    uint32_t step;   /* the group's step number */
    int32_t kind;
    int32_t dtype;
    int32_t op;
    int32_t root;
    int64_t count;
    char pad[LOCAL_HEADER_BYTES - 32];
} local_step_header;
_Static_assert(sizeof(local_step_header) == LOCAL_HEADER_BYTES, "one header per cache line");

/* A group's area in the segment: members, then each member's ring of buffers. A slot whose
 * members have all released their handles (attached 0) is free: a later group takes the
 * slot and its area when the area holds that many members. Changed under the registry lock;
 * the parent reads capacity (acquire) then area_offset without it, to wake sleepers. */
typedef struct local_group_entry {
    int32_t nmembers;
    int32_t occurrence; /* how many groups with these members the ranks made before; -1: world */
    int32_t members[LOCAL_MAX_RANKS];
    uint64_t area_offset;
    _Atomic int32_t capacity; /* members the area is laid out for (it holds any group up to that) */
    int32_t attached;         /* members holding a handle on the group (the world: always 1) */
} local_group_entry;

/* Written by the parent when it reaps a rank. */
typedef struct local_departure {
    _Atomic int32_t gone;
    char reason[96]; /* "died (signal 9)", completes "rank 2 ..." */
} local_departure;

typedef struct local_segment {
    int32_t world_size;
    uint64_t chunk_bytes;  /* data bytes of one buffer */
    uint64_t total_bytes;
    uint64_t arena_offset; /* group areas are carved from [arena_offset, total_bytes) */
    uint64_t arena_used;
    _Atomic int32_t abort_rank; /* -1, or the first rank that ended without returning */
    _Atomic uint32_t group_count;
    _Atomic int32_t consoles; /* ranks whose REPL reads the terminal: SIGINT is theirs */
    uint64_t heap_base;        /* the shared heap (local_heap.c), or 0 */
    uint64_t heap_slice_bytes; /* rank r's slice starts at heap_base + r * heap_slice_bytes */
    pthread_mutex_t registry_lock; /* process-shared and robust */
    local_departure departed[LOCAL_MAX_RANKS];
    local_group_entry groups[LOCAL_MAX_GROUPS];
} local_segment;

/* This process's view of a group (ms_group.impl). */
typedef struct local_group {
    local_segment *seg;
    int entry;             /* its slot in seg->groups, released with the handle; -1: the world */
    local_member *members;
    local_failure *failure; /* after the members' progress words */
    uint8_t *ring;         /* member m's buffer b at ring + (m * depth + b) * buffer_stride */
    size_t buffer_stride;
    uint32_t next_step;
    uint32_t op_seq;
    int direct;       /* members read each other's memory: 0 not probed yet, 1 yes, -1 no */
    uint8_t *scratch; /* the direct all_reduce's (local_direct.c), once direct is 1 */
} local_group;

/* This process's world rank: -1 outside spawned ranks. */
extern int ms_local_world_rank;

/* ---- segment and groups (local_group.c) ---- */
/* Map and initialise a segment for world_size ranks, with the world group registered. */
int local_segment_create(local_segment **out, int world_size);
void local_segment_destroy(local_segment *seg);
/* A world group handle on seg (rank -1 until a forked rank sets its own). */
int local_world_group(ms_group **out, local_segment *seg, int64_t timeout_ms);
/* Record that a rank ended (reason completes "rank N ..."), failing the segment when
 * abort != 0, and wake every sleeper so it notices. */
void local_mark_departed(local_segment *seg, int rank, const char *reason, int abort);
/* ---- the shared heap (local_heap.c) ---- */
/* Map seg's shared heap for world_size ranks, unless it is switched off or refused (then the
 * ranks stage every collective); fails only on a bad MOONSHARD_SHARED_HEAP. */
int local_heap_create(local_segment *seg, int world_size);
void local_heap_destroy(local_segment *seg);
/* In a forked rank: its cpu pool's large blocks come from its slice from now on. */
int local_heap_attach(const local_segment *seg, int rank);
/* 1 when [addr, addr + bytes) lies in world rank world_rank's slice. */
int local_heap_holds(const local_segment *seg, int world_rank, uint64_t addr, size_t bytes);

/* The backend's new_group and group_free slots. */
int local_new_group(ms_group *parent, const int *ranks, int nranks, ms_group **out);
void local_group_free(ms_group *g);
extern const ms_comm_backend ms_local_backend;


/* ---- the step protocol (local_step.c) ----
 * A collective runs as numbered steps. In step s a member waits until its buffer for s is
 * free, fills it, posts s, waits for every member's post of s (checking their headers),
 * reads what it needs and marks s consumed. Failures break the group (ms_group_break). */
typedef struct local_call {
    const char *name;         /* for messages: "all_reduce" */
    local_step_header header; /* kind, dtype, op, root, count; the rest is filled per step */
} local_call;

/* Buffer data of member m for step s. */
static inline uint8_t *local_buffer(const local_group *lg, int member, uint32_t step)
{
    return lg->ring + ((size_t)member * LOCAL_RING_DEPTH + step % LOCAL_RING_DEPTH) *
                          lg->buffer_stride + LOCAL_HEADER_BYTES;
}

/* Wait until every member consumed the step that last used step's buffers. A member that
 * must sleep for that sleeps until the others consumed as much as it has, so a member
 * running ahead sleeps once until the others catch up rather than once every step. */
int local_wait_free(ms_group *g, const local_call *call, uint32_t step);
/* Write this member's header for step and publish the post; fails (breaking the group) when
 * a member gave up waiting for it. */
int local_post(ms_group *g, const local_call *call, uint32_t step);
/* Wait for every member's post of step and compare headers: MS_ERR_MISMATCH when they
 * differ (every member sees it at the same step, consumes it and the group stays usable).
 * A member that must sleep for that sleeps until the others posted step until (at or after
 * step, one they post without waiting for this member to do more), so it wakes once for
 * several steps of a member that is behind. */
int local_wait_posted(ms_group *g, const local_call *call, uint32_t step, uint32_t until);
/* Publish that this member finished reading step; the group's next step follows it. */
void local_consume(ms_group *g, uint32_t step);
/* One step without data: every member has reached this point. */
int local_barrier_step(ms_group *g, const local_call *call);

/* A collective of nsteps steps in which a member fills its own buffer of each step and then
 * reads the others'. ctx is the collective's; t counts from 0. */
typedef struct local_steps {
    int64_t nsteps;
    void (*fill)(const ms_group *g, void *ctx, int64_t t, uint8_t *mine);
    void (*read)(const ms_group *g, void *ctx, int64_t t, uint32_t step);
    void *ctx;
} local_steps;
/* Run steps ahead: a member fills and posts steps up to t + LOCAL_LOOKAHEAD before it waits
 * for the others' step t, so a member somewhat behind rarely makes the others sleep. The first
 * step runs alone, so members that called different collectives stop there before any
 * later step is posted. */
int local_run_steps(ms_group *g, const local_call *call, const local_steps *steps);
/* Copy n bytes into a collective's destination of destination_bytes in all, bypassing the
 * cache when that is too large to stay there (local_copy.c). */
void local_copy_out(void *dst, const void *src, size_t n, size_t destination_bytes);
/* dst = the reduction of srcs (ms_comm_reduce), written as local_copy_out writes. */
void local_reduce_out(void *dst, const void *const *srcs, int nsrc, size_t count, int dtype,
                      int op, size_t destination_bytes);
/* What a member posts in a direct collective's first step. */
typedef struct direct_post {
    int32_t pid;
    int32_t ok;    /* the probe passed, or the tensor is in the member's heap slice */
    uint64_t addr; /* the collective's tensor, or the probe word */
} direct_post;

/* One step in which every member posts {pid, ok, addr}; peers' posts are copied to posts. */
int local_exchange(ms_group *g, const local_call *call, int32_t ok, const void *addr,
                   direct_post *posts);

/* ---- collectives reading the peers' tensors in the shared heap (local_shared.c) ---- */
/* Exchange every member's tensor (mine, bytes long) in one step; *shared = 1 when each lies
 * in its member's heap slice (the same answer in every member). posts [OUT] */
int local_shared_agree(ms_group *g, const local_call *call, const void *mine, size_t bytes,
                       direct_post *posts, int *shared);
/* After local_shared_agree said shared: out = the reduction of the members' blocks `rank`
 * of count elements. */
int local_reduce_scatter_shared(ms_group *g, const local_call *call, const direct_post *posts,
                                void *out, int64_t count, int dtype, int op);
int local_all_reduce_shared(ms_group *g, const local_call *call, const direct_post *posts,
                            void *data, int64_t count, int dtype, int op);

/* ---- all_reduce reading the peers' tensors in place (local_direct.c) ---- */
/* *ready = 1 when every member may read the others' memory; the first call on a group
 * probes it in two steps of call, which every member makes alike. */
int local_direct_ready(ms_group *g, const local_call *call, int *ready);
/* all_reduce reading the peers' pieces where they are; bitwise the staged all_reduce's
 * result (each element reduced in member order). */
int local_all_reduce_direct(ms_group *g, const local_call *call, void *data, int64_t count,
                            int dtype, int op);
/* Wake every process sleeping on counter. */
void local_wake_all(local_counter *counter);

#endif
