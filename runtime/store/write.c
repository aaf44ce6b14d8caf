/* moonshard store: writing one rank's chunks into its shard file - values reserved with
 * MDB_RESERVE in a MDB_WRITEMAP environment and filled straight from the tensor, the map
 * grown ahead of need, the transaction committed durably. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store_internal.h"

enum {
    COPY_BLOCK_BYTES = 2 << 20,   /* hash, then copy while the block is in cache; one
                                     pwrite of an aligned block fills one 2 MiB folio, which
                                     a reader maps with one fault (256 KiB folios took eight
                                     and loaded 0.86-0.92x of read(); 2 MiB: 0.94-1.07x) */
    PWRITE_MIN_BYTES = 1 << 20,   /* values this large are written with pwrite */
    DIRTY_PAGE_LIMIT = 60000,     /* LMDB allows 131071 dirty pages per transaction */
    COMMIT_SLACK_PAGES = 64,      /* pages a commit may add (free list, meta), plus 1/256 of
                                     the file's pages (the free list of a large file) */
    MAP_STEP_BYTES = 1 << 20,     /* maps (and so shard files) grow in whole MiB */
    FULL_DISK_PIECE_PAGES = 32,   /* pieces of chunks written on a full disk (write_chunk) */
};

/* The map size to grow to when need bytes do not fit: a quarter more (at least 1 MiB), so
 * growing costs few commits while the file stays near the size of what it holds. */
static uint64_t grown_map_bytes(uint64_t need)
{
    uint64_t extra = need / 4 > MAP_STEP_BYTES ? need / 4 : MAP_STEP_BYTES;
    return (need + extra + MAP_STEP_BYTES - 1) / MAP_STEP_BYTES * MAP_STEP_BYTES;
}

/* ---- transactions that know how much map they may need ---- */

/* LMDB's MDB_txn starts with its parent, its child and the next page number it would take
 * from the end of the file (so since 0.9.0). Read only while it agrees with the meta page when
 * the transaction begins; otherwise every page is counted as if it extended the file. */
typedef struct lmdb_txn_head {
    void *parent, *child;
    size_t next_page;
} lmdb_txn_head;

static uint64_t txn_next_page(MDB_txn *txn)
{
    return ((const lmdb_txn_head *)(const void *)txn)->next_page;
}

static int open_write_txn(ms_store *s)
{
    store_env *e = s->shards[s->save_rank];
    MS_CHECK(env_write_begin(e, &s->txn));
    MDB_envinfo info;
    MDB_stat db_stat;
    mdb_env_info(e->env, &info);
    mdb_stat(s->txn, e->data_dbi, &db_stat);
    s->tree_depth = db_stat.ms_depth;
    s->map_bytes = info.me_mapsize;
    s->txn_slack = COMMIT_SLACK_PAGES + ((uint64_t)info.me_last_pgno + 1) / 256;
    s->txn_pages = info.me_last_pgno + 1 + s->txn_slack;
    s->txn_dirty = 0;
    s->txn_pages_exact = txn_next_page(s->txn) == (uint64_t)info.me_last_pgno + 1;
    return MS_OK;
}

int write_commit(ms_store *s)
{
    store_env *e = s->shards[s->save_rank];
    int rc = mdb_txn_commit(s->txn);
    s->txn = NULL;
    return rc ? env_fail(e, rc, "committing chunks") : MS_OK;
}

int write_finish(ms_store *s)
{
    MS_CHECK(write_commit(s));
    return space_trim(s->shards[s->save_rank]);
}

/* Make room for one more value of value_bytes: commit and grow the map when the pages the
 * transaction may take past the file's end would not fit, commit when it nears LMDB's
 * dirty-page limit. When the disk has no room for the map to grow (disk_full), the value
 * goes where LMDB finds free pages (those of deleted steps) or its put fails with ENOSPC
 * (MDB_MAP_FULL). Intermediate commits are harmless: chunks count only once a manifest
 * names them. */
static int make_room(ms_store *s, uint64_t value_bytes)
{
    store_env *e = s->shards[s->save_rank];
    uint64_t page_bytes = e->page_bytes;
    uint64_t value_pages = (value_bytes + LMDB_PAGE_HEADER_BYTES + page_bytes - 1) / page_bytes;
    uint64_t tree_pages = 2 * ((uint64_t)s->tree_depth + 2);
    if (s->txn_dirty + 1 + tree_pages > DIRTY_PAGE_LIMIT) {
        MS_CHECK(write_commit(s));
        MS_CHECK(open_write_txn(s));
    }
    /* Values reuse free pages where LMDB finds them; only pages past the end grow the file. */
    uint64_t used =
        s->txn_pages_exact ? txn_next_page(s->txn) + s->txn_slack : s->txn_pages;
    uint64_t need = (used + value_pages + tree_pages) * page_bytes;
    if (need > s->map_bytes && !e->disk_full) {
        MS_CHECK(write_commit(s));
        int status = env_grow(e, grown_map_bytes(need), need);
        if (status == ENOSPC)
            e->disk_full = true;
        else
            MS_CHECK(status);
        MS_CHECK(open_write_txn(s));
    }
    return MS_OK;
}

/* Count the pages of a value make_room made room for, and the tree pages its insertion may
 * copy or split. */
static void count_value(ms_store *s, uint64_t value_bytes)
{
    uint64_t page_bytes = s->shards[s->save_rank]->page_bytes;
    uint64_t value_pages = (value_bytes + LMDB_PAGE_HEADER_BYTES + page_bytes - 1) / page_bytes;
    uint64_t tree_pages = 2 * ((uint64_t)s->tree_depth + 2);
    s->txn_pages += value_pages + tree_pages;
    s->txn_dirty += 1 + tree_pages;
}

/* Reserve a value for size bytes of chunk data under key and zero the CHUNK_DATA_OFFSET
 * bytes in front of the data. [OUT] *data: where the data goes in the map; *file_offset:
 * where a large value's data starts in the file, or -1 for a value LMDB keeps inside a page. */
static int reserve_value(ms_store *s, const uint8_t *key_bytes, uint64_t size, uint8_t **data,
                         off_t *file_offset)
{
    store_env *e = s->shards[s->save_rank];
    uint64_t value_bytes = CHUNK_DATA_OFFSET + size;
    count_value(s, value_bytes);
    MDB_val key = {CHUNK_KEY_BYTES, (void *)key_bytes}, value = {value_bytes, NULL};
    int rc = mdb_put(s->txn, e->data_dbi, &key, &value, MDB_RESERVE);
    if (rc)
        return env_fail(e, rc, "reserving a chunk");
    memset(value.mv_data, 0, CHUNK_DATA_OFFSET);
    *data = (uint8_t *)value.mv_data + CHUNK_DATA_OFFSET;
    if (size < PWRITE_MIN_BYTES || !env_value_offset(e, value.mv_data, value_bytes, file_offset))
        *file_offset = -1;
    else
        *file_offset += CHUNK_DATA_OFFSET;
    return MS_OK;
}

static int write_at(ms_store *s, int fd, const uint8_t *data, uint64_t n, off_t offset)
{
    while (n) {
        ssize_t written = pwrite(fd, data, n, offset);
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0) {
            int err = written < 0 ? errno : EIO;
            return MS_FAIL(err, "%s: writing a chunk: %s", s->shards[s->save_rank]->path,
                           strerror(err));
        }
        data += written;
        offset += written;
        n -= (uint64_t)written;
    }
    return MS_OK;
}

/* Copy t's row-major bytes (size of them) into a reserved value, hashing them block by
 * block. Large values are written with pwrite at their file offset rather
 * than through the map: a store into a map page that is not cached makes the kernel read it
 * from disk first, while pwrite knows whole pages are overwritten (and reports a full disk
 * as an error, not SIGBUS). Either way it is one copy from the tensor; strided tensors go
 * through a reused block-sized buffer on the pwrite path. */
static int copy_into_value(ms_store *s, uint8_t *value, off_t file_offset, const ms_tensor *t,
                           bool contiguous, uint64_t size)
{
    size_t esize = ms_dtype_size(t->dtype);
    const uint8_t *base = ms_tensor_data(t);
    mdb_filehandle_t fd = -1;
    if (file_offset >= 0)
        mdb_env_get_fd(s->shards[s->save_rank]->env, &fd);
    if (file_offset >= 0 && !contiguous)
        MS_CHECK(buffer_reserve(&s->bounce, COPY_BLOCK_BYTES));
    /* pwrite blocks end on block-aligned file offsets, so the page cache holds whole
     * aligned blocks as large folios (cheaper to read back than many small ones). */
    uint64_t first_block = COPY_BLOCK_BYTES;
    uint64_t to_boundary = COPY_BLOCK_BYTES - (uint64_t)file_offset % COPY_BLOCK_BYTES;
    if (file_offset >= 0 && to_boundary % esize == 0)
        first_block = to_boundary;
    for (uint64_t done = 0, n; done < size; done += n) {
        uint64_t limit = done == 0 ? first_block : COPY_BLOCK_BYTES;
        n = size - done < limit ? size - done : limit;
        const uint8_t *block = base + done;
        if (!contiguous) {
            uint8_t *out = file_offset >= 0 ? s->bounce.data : value + done;
            gather_elements(out, base, esize, t->ndim, t->shape, t->strides,
                            (int64_t)(done / esize), (int64_t)(n / esize));
            block = out;
        }
        checksum_update(s->hasher, block, n);
        if (file_offset >= 0)
            MS_CHECK(write_at(s, fd, block, n, file_offset + (off_t)done));
        else if (contiguous)
            memcpy(value + done, block, n);
    }
    if (file_offset >= 0)
        sync_file_range(fd, file_offset, (off_t)size, SYNC_FILE_RANGE_WRITE);
    return MS_OK;
}

static int write_split(ms_store *s, store_entry *entry, const ms_tensor *t,
                       const int64_t *global_offsets, int64_t limit);

/* Store one piece (at most max_chunk_bytes) as one value and record it in own_table. On a
 * full disk a piece is split again into pieces of at most FULL_DISK_PIECE_PAGES pages: they go
 * into the free pages of deleted steps, whose runs the tree pages a transaction copies first
 * (LMDB takes the lowest free pages) cut a little short of a chunk of the same size, so such
 * a run holds all but less than one small piece. */
static int write_piece(ms_store *s, store_entry *entry, const ms_tensor *t,
                       const int64_t *global_offsets)
{
    store_env *e = s->shards[s->save_rank];
    uint64_t nbytes = ms_tensor_nbytes(t);
    MS_CHECK(make_room(s, CHUNK_DATA_OFFSET + nbytes));
    int64_t small = FULL_DISK_PIECE_PAGES * (int64_t)e->page_bytes - CHUNK_DATA_OFFSET -
                    LMDB_PAGE_HEADER_BYTES;
    if (e->disk_full && (int64_t)nbytes > small)
        return write_split(s, entry, t, global_offsets, small);
    store_chunk chunk = {
        .rank = (uint32_t)s->save_rank, .seq = s->next_seq++, .data_offset = CHUNK_DATA_OFFSET};
    for (int d = 0; d < t->ndim; d++) {
        chunk.offsets[d] = global_offsets[d];
        chunk.sizes[d] = t->shape[d];
    }
    uint8_t key[CHUNK_KEY_BYTES], *value = NULL;
    off_t file_offset = -1;
    chunk_key(key, s->save_step, chunk.seq);
    MS_CHECK(reserve_value(s, key, nbytes, &value, &file_offset));
    checksum_reset(s->hasher);
    MS_CHECK(copy_into_value(s, value, file_offset, t, ms_tensor_is_contiguous(t), nbytes));
    chunk.checksum = checksum_digest(s->hasher);
    return entry_add_chunk(entry, &chunk);
}

/* Split t into pieces of at most limit bytes: blocks of whole slices along the outermost
 * dim whose slices fit, one piece per index of the dims outside it. */
static int write_split(ms_store *s, store_entry *entry, const ms_tensor *t,
                       const int64_t *global_offsets, int64_t limit)
{
    int64_t esize = (int64_t)ms_dtype_size(t->dtype);
    if ((int64_t)ms_tensor_nbytes(t) <= limit)
        return write_piece(s, entry, t, global_offsets);
    int split = t->ndim - 1;
    int64_t slice_bytes = esize;
    while (split > 0 && slice_bytes * t->shape[split] <= limit)
        slice_bytes *= t->shape[split--];
    int64_t block = limit / slice_bytes;
    int64_t outer[MS_MAX_DIMS] = {0};
    for (;;) {
        for (int64_t first = 0; first < t->shape[split]; first += block) {
            ms_tensor piece = *t;
            int64_t offsets[MS_MAX_DIMS];
            for (int d = 0; d < t->ndim; d++) {
                int64_t start = d < split ? outer[d] : d == split ? first : 0;
                piece.offset += start * t->strides[d];
                offsets[d] = global_offsets[d] + start;
                if (d < split)
                    piece.shape[d] = 1;
            }
            piece.shape[split] = t->shape[split] - first < block ? t->shape[split] - first : block;
            piece.numel = 1;
            for (int d = 0; d < t->ndim; d++)
                piece.numel *= piece.shape[d];
            MS_CHECK(write_piece(s, entry, &piece, offsets));
        }
        int d = split - 1;
        while (d >= 0 && ++outer[d] == t->shape[d])
            outer[d--] = 0;
        if (d < 0)
            return MS_OK;
    }
}

/* Split t into pieces of at most max_chunk_bytes (write_split): a read then verifies only
 * the pieces it touches, and every piece fits one LMDB value. */
int write_chunk(ms_store *s, const char *fqn, size_t fqn_len, const ms_tensor *t,
                const int64_t *global_offsets)
{
    store_entry *entry = &s->own_table.entries[table_find(&s->own_table, fqn, fqn_len)];
    return write_split(s, entry, t, global_offsets, s->max_chunk_bytes);
}

/* Reclaim, then open the write transaction with a map that holds expected_bytes more (the
 * chunks of the save when they are known), as if none of them reused free pages: growing
 * inside the transaction needs a commit, and small chunks committed apart from large ones
 * take pieces of the free runs the large ones would reuse. The room is file space only for
 * the save's duration (write_finish trims the file); on a disk without it, or when the bytes
 * are not known, the map grows as the chunks come. */
int write_start(ms_store *s, uint64_t expected_bytes)
{
    store_env *e = s->shards[s->save_rank];
    e->disk_full = false; /* ask the disk again */
    MS_CHECK(reclaim_uncommitted(e, s->committed, s->committed_count));
    MS_CHECK(write_expect(s, expected_bytes));
    return open_write_txn(s);
}

int write_reserve(ms_store *s, uint64_t expected_bytes)
{
    mdb_txn_abort(s->txn); /* nothing is in it yet: begin committed the reclaimed space */
    s->txn = NULL;
    MS_CHECK(write_expect(s, expected_bytes));
    return open_write_txn(s);
}

int write_expect(ms_store *s, uint64_t expected_bytes)
{
    store_env *e = s->shards[s->save_rank];
    MDB_envinfo info;
    mdb_env_info(e->env, &info);
    uint64_t pages = (uint64_t)info.me_last_pgno + 1;
    uint64_t want = (pages + COMMIT_SLACK_PAGES + pages / 256) * e->page_bytes +
                    expected_bytes;
    if (expected_bytes && info.me_mapsize < want)
        MS_CHECK(env_grow(e, grown_map_bytes(want), info.me_mapsize));
    return MS_OK;
}
