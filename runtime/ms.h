/* moonshard runtime: the umbrella public header.
 * Everything between "ffi-begin" and "ffi-end" markers in this file and in the headers it
 * includes is plain C that LuaJIT's ffi.cdef parses; tools/gen_cdef.lua copies it to
 * lua/moonshard/cdef.lua. Keep those sections free of macros and #if.
 *
 * Conventions (every header below follows them):
 *  - Every function returns int status: 0 is success, MS_ERR_* (a reserved negative block)
 *    are moonshard's errors, positive values are errno. ms_strerror() names any of them and
 *    ms_last_error() returns this thread's detailed message for the last failure.
 *  - Handles are opaque or read-only structs created and destroyed in pairs
 *    (ms_tensor_new / ms_tensor_free). Out-parameters are marked [OUT].
 *  - Nothing here aborts, exits or asserts on caller input. */
#ifndef MS_H
#define MS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ffi-begin */
/* ---- status codes ---- */
enum {
    MS_OK = 0,
    MS_ERR_INVALID = -31000,   /* an argument is out of its domain */
    MS_ERR_SHAPE = -30999,     /* shapes do not agree */
    MS_ERR_DTYPE = -30998,     /* dtype not supported or dtypes do not agree */
    MS_ERR_OOM = -30997,       /* a pool could not allocate */
    MS_ERR_PEER_DIED = -30996, /* a rank of the process group died */
    MS_ERR_TIMEOUT = -30995,   /* a rank did not answer in time */
    MS_ERR_CORRUPT = -30994,   /* stored data failed its checksum or format check */
    MS_ERR_NOT_FOUND = -30993, /* a key, file or store does not exist */
    MS_ERR_INDEX = -30992,     /* an index is out of range */
    MS_ERR_DEVICE = -30991,    /* the device is absent or not usable */
    MS_ERR_STATE = -30990,     /* the object is not in a state that allows the call */
    MS_ERR_UNSUPPORTED = -30989, /* valid request this build cannot serve */
    MS_ERR_VERSION = -30988,   /* data written by a newer format version */
    MS_ERR_MISMATCH = -30987,  /* ranks disagree about a collective */
    MS_ERR_INTERRUPTED = -30986, /* SIGINT or SIGTERM arrived (see ms_interrupt_install) */
    MS_ERR_LAST = -30986
};

/* Static description of any status code. Never NULL. */
const char *ms_strerror(int status);
/* This thread's detailed message for the most recent failure ("" if none). Owned by the
 * runtime; valid until the next failing call on this thread. */
const char *ms_last_error(void);
/* "file.c:123" of the runtime code that recorded the last failure ("" if none). */
const char *ms_last_error_site(void);

/* ---- memory pools ---- */
enum { MS_POOL_CPU = 0, MS_POOL_HOST = 1, MS_POOL_CUDA0 = 2, MS_MAX_POOLS = 10 };

typedef struct ms_memory_stats {
    int64_t allocated;   /* bytes handed out and not yet freed (requested sizes) */
    int64_t peak;        /* maximum of allocated since start or the last reset_peak */
    int64_t reserved;    /* bytes held from the system: in use (rounded) plus cached */
    int64_t allocs;      /* number of allocations served since start */
    int64_t frees;       /* number of frees since start */
    int64_t active;      /* blocks currently handed out */
} ms_memory_stats;

/* Look up a pool by name: "cpu", "host", "cuda:N". [OUT] *pool_id. */
int ms_pool_find(const char *name, int *pool_id);
/* Name of a pool ("cpu"); NULL when pool_id is out of range. Static storage. */
const char *ms_pool_name(int pool_id);
/* Allocate nbytes (0 allowed) aligned to 64 bytes. [OUT] *ptr. */
int ms_pool_alloc(int pool_id, size_t nbytes, void **ptr);
/* Return a block to its pool. nbytes must be the size it was allocated with. */
int ms_pool_free(int pool_id, void *ptr, size_t nbytes);
/* [OUT] *stats: exact counters of the pool. */
int ms_pool_stats(int pool_id, ms_memory_stats *stats);
/* Set peak to the current allocated. */
int ms_pool_reset_peak(int pool_id);
/* Give cached (free) blocks back to the system; reserved falls to what is in use. */
int ms_pool_empty_cache(int pool_id);

/* ---- dtypes ---- */
typedef enum ms_dtype {
    MS_F32 = 0, MS_F64 = 1, MS_BF16 = 2, MS_F16 = 3, MS_I32 = 4, MS_I64 = 5, MS_U8 = 6,
    MS_DTYPE_COUNT = 7
} ms_dtype;

/* Bytes per element of dtype; 0 for an unknown dtype. */
size_t ms_dtype_size(int dtype);
/* "f32", "f64", ...; NULL for an unknown dtype. Static storage. */
const char *ms_dtype_name(int dtype);

/* ---- storage and tensors ----
 * A storage is a refcounted block from one pool. A tensor is a view of a storage:
 * offset, shape and strides in elements. The FFI reads these fields directly; only the
 * runtime writes them. */
enum { MS_MAX_DIMS = 8 };

typedef struct ms_storage {
    void *data;          /* first byte; NULL when nbytes == 0 */
    size_t nbytes;
    int32_t pool;        /* pool the block came from */
    int32_t refcount;    /* tensors viewing this storage */
    uint64_t version;    /* bumped by in-place writes made through the Lua layer */
    int32_t released;    /* 1 while the data block is returned to the pool */
    int32_t reserved_flags;
} ms_storage;

typedef struct ms_tensor {
    ms_storage *storage;
    int32_t dtype;
    int32_t ndim;
    int64_t offset;                 /* elements from storage->data */
    int64_t numel;
    int64_t shape[8];
    int64_t strides[8];             /* in elements; may be 0 (expanded) */
} ms_tensor;

/* A new contiguous tensor with fresh, uninitialised storage from pool.
 * ndim in [0, MS_MAX_DIMS]; shape entries >= 0. [OUT] *out, freed with ms_tensor_free. */
int ms_tensor_new(ms_tensor **out, int dtype, int ndim, const int64_t *shape, int pool);
/* Like ms_tensor_new, zero-filled. */
int ms_tensor_zeros(ms_tensor **out, int dtype, int ndim, const int64_t *shape, int pool);
/* A view of base's storage with the given geometry (strides in elements, offset absolute
 * in the storage). Fails with MS_ERR_INDEX when any element lies outside the storage.
 * strides == NULL means contiguous. [OUT] *out shares the storage (refcount + 1). */
int ms_tensor_view(ms_tensor **out, const ms_tensor *base, int ndim, const int64_t *shape,
                   const int64_t *strides, int64_t offset);
/* Drop the handle; the storage is returned to its pool when its last view goes.
 * NULL is accepted. */
void ms_tensor_free(ms_tensor *t);
/* Address of element 0 of the view. */
void *ms_tensor_data(const ms_tensor *t);
/* 1 when the view is row-major contiguous, else 0. */
int ms_tensor_is_contiguous(const ms_tensor *t);
/* Bytes of the view's elements (numel * element size). */
size_t ms_tensor_nbytes(const ms_tensor *t);

/* Return the storage's data block to its pool while keeping the storage and every view of
 * it (FSDP frees unsharded parameters this way; autograd's saved views stay valid handles).
 * Operations on a view of a released storage fail with MS_ERR_STATE. Releasing twice is
 * a no-op. */
int ms_storage_release(ms_storage *storage);
/* Allocate a released storage's nbytes again from its pool (contents undefined). Restoring
 * a storage that holds data is a no-op. */
int ms_storage_restore(ms_storage *storage);

/* ---- threads ---- */
/* Threads used by BLAS and by the runtime's loops in this process (at least 1). */
int ms_set_num_threads(int n);
int ms_get_num_threads(void);

/* ---- clock ---- */
/* Seconds on the monotonic clock (for timing; cannot fail). */
double ms_clock_seconds(void);

/* ---- interrupts ---- */
/* Install moonshard's SIGINT and SIGTERM handlers (once; later calls do nothing). A signal
 * only records itself as pending; the runtime fails with MS_ERR_INTERRUPTED where it polls
 * (the start of every collective, waits inside collectives, dist.spawn's parent). The same
 * signal arriving again while the first is still pending ends the process as the default
 * action would, so a loop that polls nothing can still be stopped. */
int ms_interrupt_install(void);
/* The pending signal number (SIGINT or SIGTERM), or 0. */
int ms_interrupt_pending(void);
/* Clear the pending signal; returns it (0 when none was pending). */
int ms_interrupt_take(void);
/* Whether waits inside a collective stop at an interrupt (1, the default: the collective
 * fails and its group is unusable, as after a timeout) or run to the collective's end
 * (0: only a collective's start polls, so the group stays usable; the REPL's lines use
 * it). Returns the previous setting. */
int ms_interrupt_set_waits(int interruptible);
/* 1: SIGINT is ignored and a pending SIGINT is dropped (a rank idle under the REPL);
 * 0: SIGINT is handled again. Installs the handlers first when needed. */
int ms_interrupt_ignore_sigint(int ignore);
/* ffi-end */

#include "version.h"
#include "ops.h"
#include "comm/dist.h"
#include "cuda/gpu.h"
#include "store/store.h"

#ifdef __cplusplus
}
#endif
#endif
