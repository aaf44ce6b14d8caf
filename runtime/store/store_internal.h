/* moonshard store: types and helpers shared by the store's .c files (not part of the FFI).
 * Entry tables (chunk tables and manifests), their codec, the environment registry, keys. */
#ifndef MS_STORE_INTERNAL_H
#define MS_STORE_INTERNAL_H

#include <lmdb.h>
#include <pthread.h>
#include <stdbool.h>
#include <sys/types.h>

#include "../internal.h"

enum {
    STORE_DEFAULT_CHUNK_BYTES = 4 << 20, /* chunks are split into pieces of at most this */
    STORE_MIN_CHUNK_BYTES = 64,
    STORE_MAX_FQN_BYTES = 65535,
};
/* Largest chunk (one LMDB value; LMDB's limit is just below 4 GiB). */
#define STORE_MAX_CHUNK_BYTES ((int64_t)1 << 31)

/* ---- growable byte buffer ---- */
typedef struct byte_buffer {
    uint8_t *data;
    size_t size;
    size_t capacity;
} byte_buffer;

int buffer_reserve(byte_buffer *b, size_t capacity);
void buffer_free(byte_buffer *b);

/* ---- entry tables: a rank's chunk table, a manifest under construction or decoded ---- */
typedef struct store_chunk {
    int64_t offsets[MS_MAX_DIMS];
    int64_t sizes[MS_MAX_DIMS];
    uint64_t checksum; /* XXH3-64 of all its bytes */
    uint32_t rank;     /* shard file */
    uint32_t seq;      /* chunk number within (rank, step) */
    uint32_t data_offset; /* bytes in front of its data in the value (CHUNK_DATA_OFFSET or 0) */
    bool verified;     /* checksum already checked through this handle */
} store_chunk;

typedef struct store_entry {
    char *fqn; /* NUL-terminated, no NUL inside */
    size_t fqn_len;
    int kind; /* MS_STORE_TENSOR or MS_STORE_BYTES */
    int dtype;
    int ndim;
    int64_t shape[MS_MAX_DIMS];
    store_chunk *chunks;
    uint32_t chunk_count;
    uint32_t chunk_capacity;
    uint8_t *bytes; /* MS_STORE_BYTES value */
    uint64_t nbytes;
} store_entry;

typedef struct entry_table {
    store_entry *entries;
    size_t count;
    size_t capacity;
    uint32_t *slots;   /* open-addressing index by fqn: entry number + 1, 0 = empty */
    size_t slot_count; /* power of two */
} entry_table;

void table_clear(entry_table *t);
void table_free(entry_table *t);
/* Entry number of fqn, or -1. */
int64_t table_find(const entry_table *t, const char *fqn, size_t len);
/* Append a new entry (fqn must be absent). [OUT] *entry, valid until the table grows. */
int table_add(entry_table *t, const char *fqn, size_t len, int kind, int dtype, int ndim,
              const int64_t *shape, store_entry **entry);
int entry_add_chunk(store_entry *e, const store_chunk *c);
int entry_set_bytes(store_entry *e, const void *data, uint64_t n);
/* Sort entries by fqn (byte order) and rebuild the index. */
int table_sort(entry_table *t);
/* Add the chunk table of from_rank to the manifest under construction: new entries, and
 * chunks of known ones (MS_ERR_MISMATCH when declarations or bytes values disagree). */
int table_merge(entry_table *into, const entry_table *from, uint32_t from_rank, const char *where);
/* Make a merged table a manifest: fold identical replicas (MS_ERR_MISMATCH when their
 * checksums differ), check every tensor is tiled exactly by its chunks, sort by fqn. */
int table_finalize(entry_table *t, const char *where);

/* Element counts and byte sizes, with overflow checks (false on overflow). */
bool shape_numel(int ndim, const int64_t *shape, int64_t *numel);
int64_t chunk_numel(const store_chunk *c, int ndim);
/* "[0:2, 4:8]" for messages. */
const char *region_str(char *buf, size_t size, int ndim, const int64_t *offsets,
                       const int64_t *sizes);

/* ---- codec (manifest.c): chunk tables and manifests as bytes ---- */
enum { TABLE_CHUNKS = 1, TABLE_MANIFEST = 2 };

typedef struct table_header {
    int kind; /* TABLE_CHUNKS or TABLE_MANIFEST */
    int64_t step;
    uint32_t rank; /* TABLE_CHUNKS: the writing rank; TABLE_MANIFEST: world size */
    uint32_t version; /* the format version it was written by */
} table_header;

/* Encode t (manifests must be sorted) into out (replacing its contents). */
int table_encode(const entry_table *t, const table_header *h, byte_buffer *out);
/* Decode bytes of the expected kind into t (cleared first). Validates everything:
 * MS_ERR_CORRUPT for malformed bytes, MS_ERR_VERSION for a newer format. */
int table_decode(entry_table *t, table_header *h, int expected_kind, const void *data, size_t size);
/* The checksum trailer of encoded bytes (0 when too short). */
uint64_t table_trailer(const void *data, size_t size);

/* ---- checksums (checksum.c): XXH3-64 ---- */
typedef struct checksum_state checksum_state;
int checksum_new(checksum_state **out);
void checksum_free(checksum_state *st);
void checksum_reset(checksum_state *st);
void checksum_update(checksum_state *st, const void *data, size_t n);
uint64_t checksum_digest(checksum_state *st);
uint64_t checksum_bytes(const void *data, size_t n);
/* Copy n bytes from src to dst and return their checksum (checksum_bytes(src, n)), hashing
 * each 64-byte stripe while the copy has it in registers; streaming: see stream_copy. */
uint64_t checksum_copy(uint8_t *dst, const uint8_t *src, size_t n, bool streaming);

/* Copies of at least this many bytes go with streaming stores (stream.h): the destination is
 * larger than this core's cache, so cached stores would read each of its lines first. */
enum { STREAM_MIN_BYTES = 1 << 20 };
/* Copy n bytes with streaming stores (whatever the alignment of dst). */
void stream_copy(uint8_t *dst, const uint8_t *src, size_t n);

/* ---- keys and on-disk records ---- */
enum { CHUNK_KEY_BYTES = 12, STEP_KEY_BYTES = 8, FORMAT_RECORD_BYTES = 24 };
enum { LMDB_PAGE_HEADER_BYTES = 16 }; /* in front of a value in overflow pages */
/* Zero bytes in front of a chunk's bytes in its value (format version 2 on): they put the
 * data of a value in overflow pages 64 bytes past a page boundary, so it is cache-line aligned
 * like the tensors it is copied from and into (this CPU copies misaligned data at half the
 * speed, in the kernel as in memcpy). */
enum { CHUNK_DATA_OFFSET = 48 };
enum { FILE_INDEX = 0, FILE_SHARD = 1 };

void step_key(uint8_t key[STEP_KEY_BYTES], int64_t step);
int64_t step_from_key(const uint8_t *key);
void chunk_key(uint8_t key[CHUNK_KEY_BYTES], int64_t step, uint32_t seq);

/* ---- environment registry (env.c) ----
 * One MDB_env per file per process, shared by every handle of the process, reopened
 * read-write in place when a writer needs it. map_lock is held shared around read
 * transactions and exclusively while the map is resized, so a background writer growing
 * the map never moves it under a reader of the same process. */
typedef struct store_env {
    struct store_env *next;
    pid_t pid;
    dev_t dev;
    ino_t ino;
    char *path;
    char *name; /* "index.mdb", "shard-3.mdb" for messages */
    int kind;   /* FILE_INDEX or FILE_SHARD */
    int rank;   /* shards */
    bool writable;
    int refcount;
    MDB_env *env;
    uint64_t page_bytes;
    int read_fd;      /* the data file opened again for sequential preads, or -1 */
    const uint8_t *map_begin, *map_end; /* LMDB's map of the file in this process */
    bool disk_full;   /* shards: the disk refused the file room to grow, so the map stays
                         within the file's allocated space (MDB_MAP_FULL then means ENOSPC) */
    MDB_dbi meta_dbi; /* "meta": the format record, notes */
    MDB_dbi data_dbi; /* "manifests" or "chunks" */
    pthread_rwlock_t map_lock;
} store_env;

/* Acquire the environment of file path (kind, rank), opening or upgrading it.
 * Read-only: MS_ERR_NOT_FOUND when missing, MS_ERR_CORRUPT when not ours. */
int env_acquire(const char *path, const char *name, int kind, int rank, bool writable,
                store_env **out);
void env_release(store_env *e);
/* Read transaction under map_lock; env_read_end aborts it and unlocks. */
int env_read_begin(store_env *e, MDB_txn **txn);
void env_read_end(store_env *e, MDB_txn *txn);
/* Ending a read transaction that guard_run has forgotten already. */
void env_read_end_unguarded(store_env *e, MDB_txn *txn);
/* The environment of this process whose map holds address, or NULL (signal handlers). */
const store_env *env_mapping(const void *address);
/* Write transaction (the env must be writable). */
int env_write_begin(store_env *e, MDB_txn **txn);
/* Grow the map to bytes, or to at_least when the disk has no room for bytes (a shard's map
 * is backed by allocated file space); no transaction of this env may be open in the process
 * except readers of other threads, which it waits for. */
int env_grow(store_env *e, size_t bytes, size_t at_least);
/* File offset of a value LMDB keeps in overflow pages, read from the page header in front
 * of it (LMDB's on-disk format); false when it is not one (small values live in a page). */
bool env_value_offset(const store_env *e, const void *value, uint64_t size, off_t *offset);
/* A descriptor of the data file for sequential preads, with read-ahead of its own (LMDB's
 * descriptor also serves page faults of the map, whose random order resets read-ahead). */
int env_read_fd(store_env *e, int *fd);
/* Turn an LMDB status into a moonshard one with a message naming the file. */
int env_fail(const store_env *e, int rc, const char *doing);

/* ---- file space (space.c) ---- */
/* File space every store file keeps allocated past its used pages: the pages a transaction
 * that only deletes copies (tree pages, the free list), so deleting steps works on a full
 * disk. */
#define STORE_SPARE_BYTES ((uint64_t)256 << 10)
/* Before LMDB maps an existing file: its size and meta pages agree with the pages LMDB will
 * touch (MS_ERR_CORRUPT naming the file: empty, truncated, bad meta page). */
int space_check_file(const store_env *e);
/* After LMDB failed to open e: MS_ERR_CORRUPT when the file is empty or shorter than its
 * meta pages, else MS_OK (LMDB's own error then stands). */
int space_short_file(const store_env *e);
/* Whether a value LMDB returned lies inside the file's used pages (a damaged page can name
 * any address and size). */
bool space_value_in_file(const store_env *e, const MDB_val *value);
/* Allocate the file's space up to bytes (a writable map's size): ENOSPC as a status. */
int space_reserve(const store_env *e, uint64_t bytes);
/* Cut a shard file (opened for writing, no write transaction open) back to its used pages
 * and STORE_SPARE_BYTES, below the map: the next write transaction reserves the space again
 * (env_write_begin). */
int space_trim(const store_env *e);
/* The size of a shard file's allocated space that a map may cover without asking the disk
 * for more: its size in whole pages, at least its used pages (allocated, or ENOSPC). */
int space_in_file(const store_env *e, uint64_t *bytes);
/* After a commit of the index (written with pwrite): keep STORE_SPARE_BYTES allocated past
 * its used pages (beyond its end), so the next commit that deletes finds room on a full
 * disk. Best effort. */
void space_keep_spare(const store_env *e);
/* Create e's lock file with its space allocated (LMDB writes it through a map). */
int space_reserve_lock_file(const store_env *e);

/* ---- guarded reads (guard.c) ---- */
/* Run fn(arg); a SIGBUS in a store's map or LMDB's abort on a damaged page during it ends the
 * read transactions it opened and returns MS_ERR_CORRUPT naming the file. */
int guard_run(int (*fn)(void *), void *arg);
/* Transactions open on this thread, ended by guard_run after a signal (locked: begun by
 * env_read_begin, under map_lock). env_read_begin / env_read_end keep the list. */
void guard_note_txn(store_env *e, MDB_txn *txn, bool locked);
void guard_forget_txn(MDB_txn *txn);
/* LMDB's assertion callback: inside guard_run, the failed check ends the reads like abort. */
void guard_lmdb_assert(MDB_env *env, const char *message);
/* Whether the last guard_run of this thread ended its reads on a signal. */
bool guard_ended_reads(void);

/* ---- carrying an error's message across threads or calls ---- */
typedef struct saved_error {
    int status;
    char message[1024];
    char site[128];
} saved_error;

void error_save(saved_error *saved, int status);
/* Record the saved error again (message and site) and return its status. */
int error_restore(const saved_error *saved);

/* ---- the handle ---- */
enum { SAVE_IDLE, SAVE_WRITING, SAVE_FLUSHING, SAVE_DATA_COMMITTED };

typedef struct pending_put {
    char *fqn;
    size_t fqn_len;
    ms_tensor *chunk; /* a view holding a reference to the caller's storage */
    int64_t global_offsets[MS_MAX_DIMS];
} pending_put;

typedef struct snapshot_region snapshot_region;

typedef struct step_manifest {
    struct step_manifest *next;
    int64_t step;
    uint64_t trailer; /* checksum of the encoded manifest, to notice a rewrite */
    entry_table table;
} step_manifest;

struct ms_store {
    pid_t pid;
    char *path;
    int mode;
    store_env *index;
    store_env **shards; /* by rank, acquired on first use */
    size_t shard_capacity;
    MDB_txn **read_txns; /* per rank, open during one read call */
    step_manifest *manifests;
    checksum_state *hasher;
    byte_buffer scratch;
    bool reading_from_disk; /* a whole chunk read through this handle was not cached */

    /* the save in progress */
    int save_state;
    int64_t save_step;
    int save_rank;
    bool background;
    int64_t max_chunk_bytes;
    MDB_txn *txn;
    uint32_t next_seq;
    unsigned tree_depth; /* of its chunk B-tree when the txn began */
    uint64_t map_bytes;  /* its map size */
    uint64_t txn_pages;  /* upper bound of pages the txn may use (map high-water) */
    uint64_t txn_dirty;  /* upper bound of pages dirtied by the txn */
    uint64_t txn_slack;  /* pages its commit may add */
    bool txn_pages_exact; /* LMDB's next page number of the txn is readable (write.c) */
    int64_t *committed;  /* committed steps when the save began, ascending */
    size_t committed_count;
    entry_table own_table;
    byte_buffer bounce; /* one block of a strided chunk on its way to pwrite */
    byte_buffer table_bytes;
    entry_table merged;
    entry_table incoming;
    bool merge_failed; /* a merge stopped half way: the manifest cannot be committed */
    bool *merged_ranks;
    size_t merged_capacity;
    pending_put *pending;
    size_t pending_count;
    size_t pending_capacity;
    pthread_t writer;
    saved_error writer_error;
    int writer_lock_fd; /* writer.lock held by this handle (lock.c), or -1 */
    bool writer_lock_for_save; /* taken by ms_store_begin, dropped when the save ends */
    int shard_lock_fd;  /* shard-<rank>.mdb-writer held during this rank's writes, or -1 */
    snapshot_region **snapshots; /* lazy staging copies not finished yet (snapshot.c) */
    size_t snapshot_count;
    size_t snapshot_capacity;
};

/* store.c */
int store_check(ms_store *s, const char *op);
/* steps is sorted ascending. */
bool steps_contain(const int64_t *steps, size_t count, int64_t step);
int store_shard(ms_store *s, int rank, bool writable, store_env **out);
int store_committed_steps(ms_store *s, int64_t **steps, size_t *count);
char *store_file_path(const char *dir, const char *name);
/* read.c */
/* Prefix the message of the failure just recorded with the store and step. */
int store_fail_in_context(ms_store *s, int64_t step, int status);
int store_manifest(ms_store *s, int64_t step, step_manifest **out);
int store_find_entry(ms_store *s, int64_t step, const char *fqn, step_manifest **m,
                     store_entry **e);
/* Start reading a large stored chunk from disk now unless it is cached already. */
void prefetch_chunk(const void *data, size_t size);
/* The stored bytes of chunk c of entry (nbytes of them), valid until store_end_reads. */
int store_fetch_chunk(ms_store *s, int64_t step, const store_entry *entry, const store_chunk *c,
                      uint64_t nbytes, const uint8_t **data);
void store_end_reads(ms_store *s);
/* store_end_reads after a guard_run that returned status (its reads may be ended already). */
void store_after_guarded_reads(ms_store *s, int status);
/* MS_ERR_CORRUPT naming the entry, the chunk and both checksums. */
int chunk_corrupt(ms_store *s, int64_t step, const store_entry *e, const store_chunk *c,
                  uint64_t digest);
/* write.c: the shard file's side of a save */
/* Reclaim uncommitted chunks, make room for expected_bytes of chunks (0: unknown), open the
 * write transaction. */
int write_start(ms_store *s, uint64_t expected_bytes);
/* Grow the map (no transaction open) for expected_bytes more of chunks. */
int write_expect(ms_store *s, uint64_t expected_bytes);
/* The same for a foreground save whose transaction is open and empty (reopened after). */
int write_reserve(ms_store *s, uint64_t expected_bytes);
/* Bytes a shard's map needs for chunks of these tensor bytes, split at max_chunk_bytes. */
uint64_t chunk_space(const ms_store *s, uint64_t tensor_bytes);
/* Write chunk t of entry fqn (declared in own_table) and record it there. */
int write_chunk(ms_store *s, const char *fqn, size_t fqn_len, const ms_tensor *t,
                const int64_t *global_offsets);
/* Commit the write transaction durably (also used for intermediate commits). */
int write_commit(ms_store *s);
/* The last commit of this rank's data: commit, then cut the file back to its used pages. */
int write_finish(ms_store *s);
/* save.c */
/* Forget the save in progress (its transaction must be ended or abandoned already). */
void save_reset(ms_store *s);
/* snapshot.c */
/* Finish every lazy staging copy of the save (copy false: just make the sources writable
 * again, for a save that is abandoned). */
int snapshot_finish(ms_store *s, bool copy);
/* lock.c: one writer at a time (EBUSY naming the other writer) */
/* doing: what the holder line says it holds the lock for ("step 5"), or NULL. */
int store_lock_writer(ms_store *s, const char *what, const char *doing);
void store_unlock_writer(ms_store *s);
/* Rank 0 takes writer.lock (held already, or taken for this save); other ranks check that
 * one is held. Then this rank's shard lock. */
int store_lock_shard(ms_store *s, int rank, int64_t step);
void store_unlock_shard(ms_store *s);
/* The end of a save on this handle: drops the shard lock, and writer.lock when the save took it. */
void store_end_save_locks(ms_store *s);
/* retention.c */
int reclaim_uncommitted(store_env *e, const int64_t *committed, size_t count);

/* copy.c: moving elements between strided tensors and chunk bytes */
/* Copy count elements, starting at element first in row-major order of the strided view
 * (ndim, shape, strides in elements, base = element 0), to contiguous out. */
void gather_elements(void *out, const uint8_t *base, size_t esize, int ndim, const int64_t *shape,
                     const int64_t *strides, int64_t first, int64_t count);

/* Copy the box (ndim, box_shape) whose first element is src_first (element number in the
 * chunk, row-major with chunk_strides) into dst (element 0 of the box, dst_strides).
 * When hasher is not NULL the whole chunk is hashed along the way; [OUT] *digest. */
void copy_box_from_chunk(uint8_t *dst, const int64_t *dst_strides, const uint8_t *chunk,
                         uint64_t chunk_bytes, int64_t src_first, const int64_t *chunk_strides,
                         size_t esize, int ndim, const int64_t *box_shape, checksum_state *hasher,
                         uint64_t *digest);

#endif
