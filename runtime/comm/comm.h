/* moonshard runtime: the collectives backend interface (not part of the FFI).
 * A backend is a table of functions on raw contiguous buffers; group.c validates tensors. */
#ifndef MS_COMM_H
#define MS_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

typedef struct ms_comm_backend ms_comm_backend;

/* What every backend's group handle starts with. The backend owns impl. */
struct ms_group {
    const ms_comm_backend *backend;
    int rank;              /* this process's index in the group; -1 when not a member */
    int size;              /* number of members */
    int *world_ranks;      /* members' ranks in the world group, in group order (malloc) */
    int64_t timeout_ms;    /* how long a collective waits for a peer */
    int broken_status;     /* non-zero once a collective left the group unusable */
    char broken_message[256];
    void *impl;
};

/* The operations of a backend. Buffers are contiguous and already validated: count >= 0
 * elements of dtype (in and out sized for the group as group.c documents), op in ms_dist_op,
 * root a member index. Each returns an int status recorded with MS_FAIL, whose message
 * starts with the collective's name. Slots marked OPTIONAL may be NULL. */
struct ms_comm_backend {
    const char *name;  /* "local", "mpi", "nccl" */
    int device_buffers; /* 1: buffers live in cuda pools; 0: in CPU pools */

    /* out holds size * count elements: member r's count elements at out + r * count. */
    int (*all_gather)(ms_group *g, void *out, const void *in, int64_t count, int dtype);
    /* in holds size * count elements; out (count) gets the reduction of every member's
     * block number g->rank. */
    int (*reduce_scatter)(ms_group *g, void *out, const void *in, int64_t count, int dtype,
                          int op);
    int (*all_reduce)(ms_group *g, void *data, int64_t count, int dtype, int op);
    int (*broadcast)(ms_group *g, void *data, int64_t count, int dtype, int root);
    int (*barrier)(ms_group *g);

    /* A group of the parent's members listed in ranks (parent indices, ascending and
     * distinct). Called by every member of parent, in the same order. A caller that is not
     * listed gets a handle with rank -1. [OUT] *out, released with group_free. */
    int (*new_group)(ms_group *parent, const int *ranks, int nranks, ms_group **out);
    /* Release a handle made by new_group (or the world handle at shutdown). The local
     * backend reuses a group's place in its segment once every member released it. */
    void (*group_free)(ms_group *g);
    /* OPTIONAL (NULL for backends on CPU buffers): the CUDA device index g's collectives
     * run on. */
    int (*device)(const ms_group *g);
};

/* A group handle with the common fields set: world_ranks copied from ranks (nranks
 * entries, may be NULL for 0..nranks-1). [OUT] *out; the backend fills impl. */
int ms_group_alloc(ms_group **out, const ms_comm_backend *backend, int rank,
                   const int *world_ranks, int nranks, int64_t timeout_ms);
/* Free what ms_group_alloc allocated (not impl). */
void ms_group_dealloc(ms_group *g);
/* Mark g unusable after a failure that left members out of step; status is returned by
 * every later collective on g with the original message. Returns status. */
int ms_group_break(ms_group *g, int status);

/* Install the process's world group (the default of every collective); NULL clears it.
 * The world handle is owned by the backend that installs it. */
void ms_dist_set_world(ms_group *world);
/* The installed world group, or NULL. */
ms_group *ms_dist_current_world(void);

enum { MS_DIST_DEFAULT_TIMEOUT_MS = 60000 };

/* ---- element reductions shared by the backends (reduce.c) ---- */

/* dst[i] = srcs[0][i] op srcs[1][i] op ... op srcs[nsrc-1][i], combined in source order so
 * every caller with the same sources gets the same bits. f16 and bf16 accumulate in float
 * and round once; integers wrap. MS_DIST_AVG divides the sum by nsrc (integers truncate; the
 * collectives refuse integer averages before they get here); max and min propagate NaN. dst
 * may be one of srcs. */
void ms_comm_reduce(void *dst, const void *const *srcs, int nsrc, size_t count, int dtype,
                    int op);
/* data[i] /= divisor (the second half of an average computed elsewhere). */
void ms_comm_divide(void *data, size_t count, int dtype, int divisor);
/* "sum", "avg", "max", "min"; "?" for anything else. */
const char *ms_comm_op_name(int op);

#endif
