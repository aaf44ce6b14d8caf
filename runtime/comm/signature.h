/* moonshard runtime: the call signature the mpi and nccl backends agree on before every
 * collective, so a member that calls something else fails on the host instead of hanging. */
#ifndef MS_COMM_SIGNATURE_H
#define MS_COMM_SIGNATURE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"

/* The collective a signature names. MS_CALL_INVALID is the nccl backend's "this member's
 * buffers failed a local check", sent so that every member fails together. */
typedef enum ms_call_kind {
    MS_CALL_INVALID = 0,
    MS_CALL_ALL_GATHER, MS_CALL_REDUCE_SCATTER, MS_CALL_ALL_REDUCE, MS_CALL_BROADCAST,
    MS_CALL_BARRIER
} ms_call_kind;

/* What every member says it is calling: op_seq, kind, dtype, op, root, count. */
enum { MS_SIGNATURE_FIELDS = 6 };

static inline const char *ms_call_kind_name(int64_t kind)
{
    switch (kind) {
    case MS_CALL_INVALID: return "a collective with invalid buffers";
    case MS_CALL_ALL_GATHER: return "all_gather_into_tensor";
    case MS_CALL_REDUCE_SCATTER: return "reduce_scatter_tensor";
    case MS_CALL_ALL_REDUCE: return "all_reduce";
    case MS_CALL_BROADCAST: return "broadcast";
    case MS_CALL_BARRIER: return "barrier";
    default: return "an unknown collective";
    }
}

/* [OUT] both: the signature followed by its negation. The element-wise minimum of both over
 * the members holds every field's minimum and its negated maximum, so one all-reduce tells
 * whether all members sent the same signature (ms_signature_agreed). */
static inline void ms_signature_pack(int64_t *both, const int64_t *mine)
{
    for (int i = 0; i < MS_SIGNATURE_FIELDS; i++) {
        both[i] = mine[i];
        both[MS_SIGNATURE_FIELDS + i] = -mine[i];
    }
}

/* 1 when the minimum over members of ms_signature_pack's both shows one signature. */
static inline int ms_signature_agreed(const int64_t *lowest)
{
    int same = 1;
    for (int i = 0; i < MS_SIGNATURE_FIELDS; i++)
        same &= lowest[i] == -lowest[MS_SIGNATURE_FIELDS + i];
    return same;
}

/* A backend's text for one signature ("all_reduce(f32, 1024 elements, sum)"). */
typedef const char *(*ms_signature_describe)(char *buf, size_t size, const int64_t *signature);

/* Record MS_ERR_MISMATCH "name: ranks disagree: rank A called X, rank B called Y" for this
 * member's signature and the first in all (g->size signatures, in member order) that
 * differs from it, and return it. */
static inline int ms_signature_mismatch(const ms_group *g, const char *name,
                                        const int64_t *mine, const int64_t *all,
                                        ms_signature_describe describe)
{
    size_t nbytes = sizeof *mine * MS_SIGNATURE_FIELDS;
    int other = 0;
    while (other < g->size && !memcmp(all + other * MS_SIGNATURE_FIELDS, mine, nbytes))
        other++;
    if (other == g->size)
        other = 0;
    char my_call[96], their_call[96];
    return MS_FAIL(MS_ERR_MISMATCH, "%s: ranks disagree: rank %d called %s, rank %d called %s",
                   name, g->world_ranks[g->rank], describe(my_call, sizeof my_call, mine),
                   g->world_ranks[other],
                   describe(their_call, sizeof their_call, all + other * MS_SIGNATURE_FIELDS));
}

#endif
