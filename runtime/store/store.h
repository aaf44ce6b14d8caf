/* moonshard runtime: the LMDB checkpoint store (public part, included by ms.h).
 * Sharded saves with a manifest committed last, loads that reshard, inspection, retention.
 *
 * Layout. A store is a directory holding LMDB environments as single files (MDB_NOSUBDIR,
 * each with a "-lock" file beside it):
 *   index.mdb        one manifest per committed step (keyed by step), written by one rank
 *   shard-<r>.mdb    the chunks rank r wrote, keyed by (step, chunk number)
 * Every file carries a format record (magic and version): a directory whose index.mdb is
 * missing or not ours is "not a moonshard store" (MS_ERR_CORRUPT); a store written by a
 * newer format gives MS_ERR_VERSION. The store directory must be shared by all ranks.
 *
 * Saving one step (every rank r of world_size, each in its own process):
 *   ms_store_open(&s, dir, MS_STORE_READ_WRITE)
 *   ms_store_begin(s, step, r, MS_STORE_FOREGROUND)    reclaims chunks of uncommitted steps
 *   ms_store_put_tensor / ms_store_put_bytes ...         the chunks this rank writes
 *   ms_store_commit_data(s)                              durable (fsync) on return
 *   ms_store_chunk_table(s, &table, &size)               bytes to send to the committing rank
 * then, after every rank committed its data (the caller's collective), on one rank (0):
 *   ms_store_merge_chunk_table(s, table_of_rank_q, size) for every other rank q
 *   ms_store_commit_manifest(s, world_size)              the step now exists
 * and a barrier on every rank before any rank begins the next save. A step exists only
 * once its manifest is committed: a crash anywhere before leaves earlier steps intact and
 * the partial step invisible; its chunks are reclaimed by the next ms_store_begin.
 * Replicated values are written once: the caller puts a replicated chunk on one rank only;
 * identical chunks put by several ranks are merged into one (the extra copies stay in
 * their files until the step is deleted), chunks that overlap partially are an error.
 *
 * Background saves: ms_store_begin(..., MS_STORE_BACKGROUND) makes put_tensor keep a
 * reference to the tensor's storage instead of copying; ms_store_commit_data starts a
 * thread that writes and commits, and returns at once; ms_store_wait joins it and returns
 * the outcome. The caller must not modify or release (ms_storage_release) those tensors
 * until then: put staging copies, which ms_store_stage makes copy-on-write.
 *
 * Loading: ms_store_read_tensor copies into a destination tensor the region it holds of an
 * entry's global tensor, from every stored chunk that overlaps it, straight from LMDB's
 * read-only map (one copy, into the destination). Each chunk a read touches is verified
 * against its XXH3-64 checksum once per handle.
 *
 * Concurrency and processes: any number of processes may read a store, also while a save
 * is in progress. A handle belongs to the process that opened it: open stores inside each
 * rank, after fork; a handle used in a forked child fails with MS_ERR_STATE. Within one
 * process, handles on the same directory share LMDB environments. A handle is used by one
 * thread at a time. Chunks of steps that are not committed are garbage: ms_store_begin
 * reclaims them in its own rank's file, ms_store_delete and ms_store_keep_last in every
 * file. So no rank may begin a save before the manifest of the previous save is committed
 * (the barrier above), and retention runs while no save is in flight, e.g. on the
 * committing rank right after ms_store_commit_manifest, before that barrier.
 *
 * Files. Shard files are written through LMDB's writable map (large chunks with pwrite at
 * their place in the file) over file space allocated before the map grows, so a full disk
 * is ENOSPC, never SIGBUS; after each data commit a file is cut back to its used pages and
 * 256 KiB of spare space, which (with the index's own spare) lets deletions work on a full
 * disk without asking it for more. Space of deleted and abandoned steps is reused by later
 * saves; on a full disk a save writes its chunks in small pieces into those free pages.
 * Files are checked against their meta pages before they are mapped, and reads of a damaged
 * file (truncated, overwritten) fail with MS_ERR_CORRUPT naming it.
 *
 * One writer at a time: ms_store_lock (or the begin of rank 0) takes writer.lock in the
 * directory, each rank's begin its shard's lock; EBUSY names the process holding it.
 *
 * Errors name the store, the step and the entry ("ckpt: step 100: 'model.w': ...").
 * Sizes and counts are int64_t so Lua sees plain numbers. */
#ifndef MS_STORE_H
#define MS_STORE_H

#include "../ms.h"

/* ffi-begin */
/* ---- checkpoint store ---- */
typedef struct ms_store ms_store;

enum { MS_STORE_READ_ONLY = 0, MS_STORE_READ_WRITE = 1 };
enum { MS_STORE_FOREGROUND = 0, MS_STORE_BACKGROUND = 1 };
enum { MS_STORE_TENSOR = 0, MS_STORE_BYTES = 1 };
/* Version 2: a chunk's bytes start 64 bytes into its LMDB value (after 48 zero bytes). */
enum { MS_STORE_FORMAT_VERSION = 2 };

/* One entry of a committed step. Pointers are owned by the store handle and stay valid
 * until ms_store_close. */
typedef struct ms_store_entry {
    const char *fqn;     /* "model.net1.weight", NUL-terminated */
    const void *bytes;   /* MS_STORE_BYTES: the value; NULL for tensors */
    int64_t nbytes;      /* tensor bytes (numel * dtype size) or length of bytes */
    int32_t kind;        /* MS_STORE_TENSOR or MS_STORE_BYTES */
    int32_t dtype;       /* tensors: ms_dtype */
    int32_t ndim;        /* tensors: dimensions of the global shape */
    int32_t chunk_count; /* tensors: stored chunks (0 when the tensor is empty) */
    int64_t shape[8];    /* tensors: global shape */
} ms_store_entry;

/* One stored chunk of a tensor entry: the region [offsets, offsets + sizes) of the global
 * tensor, row-major, in shard-<rank>.mdb. */
typedef struct ms_store_chunk {
    int32_t rank;
    int32_t ndim;
    int64_t offsets[8];
    int64_t sizes[8];
    int64_t nbytes;
    uint64_t checksum; /* XXH3-64 of the chunk's bytes */
} ms_store_chunk;

/* Open the store in directory path. MS_STORE_READ_ONLY: the directory must hold a store
 * (MS_ERR_NOT_FOUND when path does not exist, MS_ERR_CORRUPT when it is not a store).
 * MS_STORE_READ_WRITE: creates the directory (and its parents) and the index when
 * missing. [OUT] *out, released with ms_store_close. */
int ms_store_open(ms_store **out, const char *path, int mode);
/* Close the handle: waits for a background save still in flight (its outcome is lost;
 * the step stays invisible), aborts an unfinished save, releases the environments and
 * everything the handle returned. NULL is accepted. */
void ms_store_close(ms_store *s);

/* ---- inspection and loading (any handle) ---- */
/* Committed steps in ascending order: writes min(count, capacity) of them to steps
 * (may be NULL when capacity is 0). [OUT] *count: how many are committed now. */
int ms_store_steps(ms_store *s, int64_t *steps, int64_t capacity, int64_t *count);
/* [OUT] *step: the newest committed step; MS_ERR_NOT_FOUND when there is none. */
int ms_store_latest_step(ms_store *s, int64_t *step);
/* [OUT] *count: number of entries of step (MS_ERR_NOT_FOUND when not committed). */
int ms_store_entry_count(ms_store *s, int64_t step, int64_t *count);
/* [OUT] *entry: entry number index of step, entries sorted by fqn (byte order). */
int ms_store_entry_at(ms_store *s, int64_t step, int64_t index, ms_store_entry *entry);
/* [OUT] *entry: the entry named fqn; MS_ERR_NOT_FOUND naming it when step has none. */
int ms_store_entry_find(ms_store *s, int64_t step, const char *fqn, ms_store_entry *entry);
/* [OUT] *chunk: stored chunk number index of tensor entry fqn. */
int ms_store_chunk_at(ms_store *s, int64_t step, const char *fqn, int64_t index,
                      ms_store_chunk *chunk);
/* Fill dst, which holds the region [global_offsets, global_offsets + dst.shape) of entry
 * fqn's global tensor (global_offsets has dst.ndim values; NULL means all zero). dst is a
 * CPU or host tensor of the stored dtype, any strides. Copies only the overlapping bytes of
 * each chunk. MS_ERR_NOT_FOUND (no such entry, or a chunk missing from its file),
 * MS_ERR_DTYPE / MS_ERR_SHAPE naming both dtypes or shapes, MS_ERR_CORRUPT when a chunk
 * fails its checksum (dst's contents are then unspecified). */
int ms_store_read_tensor(ms_store *s, int64_t step, const char *fqn, ms_tensor *dst,
                         const int64_t *global_offsets);
/* Check every chunk of entry fqn against its checksum: MS_OK, MS_ERR_CORRUPT or
 * MS_ERR_NOT_FOUND naming the chunk. Bytes entries are covered by the manifest's own
 * checksum and always pass. */
int ms_store_verify_entry(ms_store *s, int64_t step, const char *fqn);

/* ---- saving (handles opened MS_STORE_READ_WRITE) ---- */
/* Start writing step (>= 0, not yet committed) as rank (>= 0) into shard-<rank>.mdb.
 * Reclaims the space of chunks whose step is not committed (see Concurrency above).
 * mode: MS_STORE_FOREGROUND or MS_STORE_BACKGROUND. MS_ERR_STATE when a save is already
 * in progress on this handle or step is committed (delete it first to overwrite). */
int ms_store_begin(ms_store *s, int64_t step, int rank, int mode);
/* Store chunk as the region [global_offsets, global_offsets + chunk.shape) of entry fqn,
 * a tensor of global_shape (both chunk.ndim values; NULL for 0-dim) and chunk's dtype.
 * chunk is a CPU or host tensor, any strides. Every put of one fqn (on any rank) must
 * agree on dtype and global shape. An empty chunk stores nothing but declares the entry
 * (needed once for a tensor with no elements). The bytes are copied before return in the
 * foreground and at commit in the background (a reference is kept until ms_store_wait). */
int ms_store_put_tensor(ms_store *s, const char *fqn, const ms_tensor *chunk,
                        const int64_t *global_shape, const int64_t *global_offsets);
/* Background saves: make dst (a CPU or host tensor of src's dtype and shape) hold src's
 * values as they are now, for a put_tensor of dst; the caller may then write to src at once.
 * Large contiguous sources are copied lazily: their whole pages turn read-only, the first
 * write to one of them (any thread) copies the block around it to dst first (in a SIGSEGV
 * handler, which passes other faults on to the handler installed before), and the writer
 * thread copies the rest before it writes. Until ms_store_wait or ms_store_abort returns,
 * src must stay allocated (not ms_storage_release'd) and system calls must not write into it
 * (they fail with EFAULT) unless announced with ms_fence_before_foreign_write (fence.h), as the
 * collectives do; stores by ms ops or plain code may. Other sources (small, strided, outside
 * the cpu pool, overlapping one staged already) are copied before return. */
int ms_store_stage(ms_store *s, ms_tensor *dst, const ms_tensor *src);
/* Right after ms_store_begin, before any put: this rank will put about bytes of tensor
 * chunks, so the shard file grows once for them instead of as they come (which costs a
 * commit each time and lets small chunks split the free space large ones would reuse).
 * Optional; background saves size themselves. */
int ms_store_reserve(ms_store *s, int64_t bytes);
/* Store a non-tensor value (the caller's serialisation, at most 1 GiB) under fqn, copied
 * before return. It travels in the chunk table into the manifest. */
int ms_store_put_bytes(ms_store *s, const char *fqn, const void *data, int64_t size);
/* Largest stored chunk, in [64, 2^31] bytes; default 4 MiB. Larger puts are split into
 * pieces along their outermost dims, so a read verifies and touches only the pieces it
 * needs. Applies to puts made afterwards through this handle; ranks that put replicas of
 * one chunk must use the same value. */
int ms_store_set_max_chunk_bytes(ms_store *s, int64_t bytes);
/* Commit this rank's chunks durably. In the background this starts the writer thread
 * and returns; ms_store_wait gives the outcome. */
int ms_store_commit_data(ms_store *s);
/* Wait for the background writer and return its status (with its message); MS_OK at once
 * when nothing is in flight. Releases the references put_tensor kept. */
int ms_store_wait(ms_store *s);
/* Abandon the save in progress on this handle (waits for a background writer first).
 * Chunks already written stay invisible and are reclaimed by the next save. */
int ms_store_abort(ms_store *s);
/* [OUT] *table, *size: this rank's chunk table for the step whose data it committed.
 * Owned by the handle; valid until the next ms_store_begin or ms_store_close. */
int ms_store_chunk_table(ms_store *s, const void **table, int64_t *size);
/* Add another rank's chunk table (from ms_store_chunk_table on that rank) to the manifest
 * this handle builds for its current step. MS_ERR_CORRUPT / MS_ERR_VERSION for bad bytes,
 * MS_ERR_MISMATCH when the table is for another step, its rank was merged already, or it
 * disagrees with what is merged (dtype, global shape, differing replicas). */
int ms_store_merge_chunk_table(ms_store *s, const void *table, int64_t size);
/* Commit the step's manifest in one durable transaction, after checking that tables of
 * ranks 0 .. world_size-1 were merged (this handle's own included), that the chunks of
 * every tensor tile its global shape exactly, and that every chunk is present in its
 * rank's file. The save is finished on this handle afterwards. */
int ms_store_commit_manifest(ms_store *s, int world_size);

/* Take the store's writer lock (writer.lock in the directory) until ms_store_close: EBUSY
 * naming the holder (pid, host) when another process writes the store. A lock whose holder
 * died is taken over. The job's rank 0 locks before any rank begins; without this call,
 * ms_store_begin on rank 0 locks for that save only, as delete and keep_last do. */
int ms_store_lock(ms_store *s);

/* ---- retention (handles opened MS_STORE_READ_WRITE, no save in progress) ---- */
/* Remove committed step (MS_ERR_NOT_FOUND when it is not committed), then reclaim the
 * space of its chunks and of any other uncommitted chunks in every shard file. */
int ms_store_delete(ms_store *s, int64_t step);
/* Remove all committed steps but the newest count (>= 0) the same way. */
int ms_store_keep_last(ms_store *s, int64_t count);
/* ffi-end */

#endif
