/* moonshard store: committed manifests (decoded once per handle), entry look-ups, and
 * loading a destination tensor from every stored chunk that overlaps its region. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "store_internal.h"

enum { PREFETCH_AHEAD_BYTES = 64 << 20, PREAD_BLOCK_BYTES = 512 << 10 };

int store_fail_in_context(ms_store *s, int64_t step, int status)
{
    char message[1024];
    snprintf(message, sizeof message, "%s", ms_last_error());
    return MS_FAIL(status, "%s: step %lld: %s", s->path, (long long)step, message);
}

static int read_manifest(ms_store *s, int64_t step, step_manifest **out)
{
    if (step < 0)
        return MS_FAIL(MS_ERR_INVALID, "%s: step %lld is negative", s->path, (long long)step);
    MDB_txn *txn;
    MS_CHECK(env_read_begin(s->index, &txn));
    uint8_t key_bytes[STEP_KEY_BYTES];
    step_key(key_bytes, step);
    MDB_val key = {STEP_KEY_BYTES, key_bytes}, value;
    int rc = mdb_get(txn, s->index->data_dbi, &key, &value);
    int status = MS_OK;
    bool seen = false;
    for (step_manifest *m = s->manifests; m && !seen; m = m->next)
        seen = m->step == step;
    if (rc == MDB_NOTFOUND)
        status = MS_FAIL(MS_ERR_NOT_FOUND,
                         seen ? "%s: step %lld was deleted while reading" : "%s: step %lld is not committed",
                         s->path, (long long)step);
    else if (rc)
        status = env_fail(s->index, rc, "reading a manifest");
    else if (!space_value_in_file(s->index, &value))
        status = MS_FAIL(MS_ERR_CORRUPT, "%s is damaged (the manifest of step %lld lies outside it)",
                         s->index->path, (long long)step);
    if (status) {
        env_read_end(s->index, txn);
        return status;
    }
    uint64_t trailer = table_trailer(value.mv_data, value.mv_size);
    for (step_manifest *m = s->manifests; m; m = m->next)
        if (m->step == step && m->trailer == trailer) {
            env_read_end(s->index, txn);
            *out = m;
            return MS_OK;
        }
    step_manifest *m = calloc(1, sizeof *m);
    table_header header;
    if (!m)
        status = MS_FAIL(MS_ERR_OOM, "store: out of memory for a manifest");
    else if ((status = table_decode(&m->table, &header, TABLE_MANIFEST, value.mv_data,
                                    value.mv_size)) != MS_OK)
        status = store_fail_in_context(s, step, status);
    else if (header.step != step)
        status = MS_FAIL(MS_ERR_CORRUPT, "%s: the manifest of step %lld says step %lld", s->path,
                         (long long)step, (long long)header.step);
    env_read_end(s->index, txn);
    if (status) {
        if (m)
            table_free(&m->table);
        free(m);
        return status;
    }
    m->step = step;
    m->trailer = trailer;
    m->next = s->manifests;
    s->manifests = m;
    *out = m;
    return MS_OK;
}

typedef struct manifest_args {
    ms_store *s;
    int64_t step;
    step_manifest **out;
} manifest_args;

static int read_manifest_guarded(void *arg)
{
    manifest_args *a = arg;
    return read_manifest(a->s, a->step, a->out);
}

int store_manifest(ms_store *s, int64_t step, step_manifest **out)
{
    manifest_args a = {s, step, out};
    return guard_run(read_manifest_guarded, &a);
}

int store_find_entry(ms_store *s, int64_t step, const char *fqn, step_manifest **m, store_entry **e)
{
    if (!fqn)
        return MS_FAIL(MS_ERR_INVALID, "store: fqn must not be NULL");
    MS_CHECK(store_manifest(s, step, m));
    int64_t found = table_find(&(*m)->table, fqn, strlen(fqn));
    if (found < 0)
        return MS_FAIL(MS_ERR_NOT_FOUND, "%s: step %lld has no entry '%s'", s->path,
                       (long long)step, fqn);
    *e = &(*m)->table.entries[found];
    return MS_OK;
}

static void describe_entry(const store_entry *e, ms_store_entry *out)
{
    memset(out, 0, sizeof *out);
    out->fqn = e->fqn;
    out->kind = e->kind;
    if (e->kind == MS_STORE_BYTES) {
        out->bytes = e->bytes;
        out->nbytes = (int64_t)e->nbytes;
        return;
    }
    int64_t numel;
    shape_numel(e->ndim, e->shape, &numel);
    out->nbytes = numel * (int64_t)ms_dtype_size(e->dtype);
    out->dtype = e->dtype;
    out->ndim = e->ndim;
    out->chunk_count = (int32_t)e->chunk_count;
    for (int d = 0; d < e->ndim; d++)
        out->shape[d] = e->shape[d];
}

int ms_store_entry_count(ms_store *s, int64_t step, int64_t *count)
{
    MS_CHECK(store_check(s, "store_entry_count"));
    if (!count)
        return MS_FAIL(MS_ERR_INVALID, "store_entry_count: count must not be NULL");
    step_manifest *m;
    MS_CHECK(store_manifest(s, step, &m));
    *count = (int64_t)m->table.count;
    return MS_OK;
}

int ms_store_entry_at(ms_store *s, int64_t step, int64_t index, ms_store_entry *entry)
{
    MS_CHECK(store_check(s, "store_entry_at"));
    if (!entry)
        return MS_FAIL(MS_ERR_INVALID, "store_entry_at: entry must not be NULL");
    step_manifest *m;
    MS_CHECK(store_manifest(s, step, &m));
    if (index < 0 || (uint64_t)index >= m->table.count)
        return MS_FAIL(MS_ERR_INDEX, "%s: step %lld has %zu entries, not %lld", s->path,
                       (long long)step, m->table.count, (long long)index + 1);
    describe_entry(&m->table.entries[index], entry);
    return MS_OK;
}

int ms_store_entry_find(ms_store *s, int64_t step, const char *fqn, ms_store_entry *entry)
{
    MS_CHECK(store_check(s, "store_entry_find"));
    if (!entry)
        return MS_FAIL(MS_ERR_INVALID, "store_entry_find: entry must not be NULL");
    step_manifest *m;
    store_entry *e;
    MS_CHECK(store_find_entry(s, step, fqn, &m, &e));
    describe_entry(e, entry);
    return MS_OK;
}

int ms_store_chunk_at(ms_store *s, int64_t step, const char *fqn, int64_t index,
                      ms_store_chunk *chunk)
{
    MS_CHECK(store_check(s, "store_chunk_at"));
    if (!chunk)
        return MS_FAIL(MS_ERR_INVALID, "store_chunk_at: chunk must not be NULL");
    step_manifest *m;
    store_entry *e;
    MS_CHECK(store_find_entry(s, step, fqn, &m, &e));
    if (index < 0 || (uint64_t)index >= e->chunk_count)
        return MS_FAIL(MS_ERR_INDEX, "%s: step %lld: '%s' has %u chunks, not %lld", s->path,
                       (long long)step, fqn, e->chunk_count, (long long)index + 1);
    const store_chunk *c = &e->chunks[index];
    memset(chunk, 0, sizeof *chunk);
    chunk->rank = (int32_t)c->rank;
    chunk->ndim = e->ndim;
    for (int d = 0; d < e->ndim; d++) {
        chunk->offsets[d] = c->offsets[d];
        chunk->sizes[d] = c->sizes[d];
    }
    chunk->nbytes = chunk_numel(c, e->ndim) * (int64_t)ms_dtype_size(e->dtype);
    chunk->checksum = c->checksum;
    return MS_OK;
}

/* Whether the chunk's first and last pages are in the page cache (a cheap guess for all). */
static bool chunk_cached(const void *data, size_t size)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)data & ~(page - 1);
    uintptr_t last = ((uintptr_t)data + size - 1) & ~(page - 1);
    unsigned char first_cached = 0, last_cached = 0;
    return mincore((void *)start, page, &first_cached) == 0 &&
           mincore((void *)last, page, &last_cached) == 0 && (first_cached & last_cached & 1);
}

void prefetch_chunk(const void *data, size_t size)
{
    if (size == 0 || chunk_cached(data, size))
        return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)data & ~(page - 1);
    madvise((void *)start, (uintptr_t)data + size - start, MADV_WILLNEED);
}

/* Whether the index still holds step's manifest (true when that cannot be read). */
static bool still_committed(ms_store *s, int64_t step)
{
    MDB_txn *txn;
    if (env_read_begin(s->index, &txn))
        return true;
    uint8_t key_bytes[STEP_KEY_BYTES];
    step_key(key_bytes, step);
    MDB_val key = {STEP_KEY_BYTES, key_bytes}, value;
    int rc = mdb_get(txn, s->index->data_dbi, &key, &value);
    env_read_end(s->index, txn);
    return rc != MDB_NOTFOUND;
}

int store_fetch_chunk(ms_store *s, int64_t step, const store_entry *entry, const store_chunk *c,
                      uint64_t nbytes, const uint8_t **data)
{
    store_env *e;
    MS_CHECK(store_shard(s, (int)c->rank, false, &e));
    if (!s->read_txns[c->rank])
        MS_CHECK(env_read_begin(e, &s->read_txns[c->rank]));
    uint8_t key_bytes[CHUNK_KEY_BYTES];
    chunk_key(key_bytes, step, c->seq);
    MDB_val key = {CHUNK_KEY_BYTES, key_bytes}, value;
    int rc = mdb_get(s->read_txns[c->rank], e->data_dbi, &key, &value);
    char region[200];
    if (rc == MDB_NOTFOUND && s->save_state == SAVE_IDLE && !still_committed(s, step))
        return MS_FAIL(MS_ERR_NOT_FOUND, "%s: step %lld was deleted while reading", s->path,
                       (long long)step);
    if (rc == MDB_NOTFOUND)
        return MS_FAIL(MS_ERR_NOT_FOUND,
                       "%s: step %lld: '%s': chunk %s is missing from %s (was the step deleted?)",
                       s->path, (long long)step, entry->fqn,
                       region_str(region, sizeof region, entry->ndim, c->offsets, c->sizes),
                       e->name);
    if (rc)
        return env_fail(e, rc, "reading a chunk");
    if (!space_value_in_file(e, &value))
        return MS_FAIL(MS_ERR_CORRUPT, "%s is damaged (chunk %s of '%s', step %lld, lies outside it)",
                       e->path, region_str(region, sizeof region, entry->ndim, c->offsets, c->sizes),
                       entry->fqn, (long long)step);
    if (value.mv_size != c->data_offset + nbytes)
        return MS_FAIL(MS_ERR_CORRUPT,
                       "%s: step %lld: '%s': chunk %s in %s has %zu bytes, not %llu", s->path,
                       (long long)step, entry->fqn,
                       region_str(region, sizeof region, entry->ndim, c->offsets, c->sizes),
                       e->name, value.mv_size, (unsigned long long)(c->data_offset + nbytes));
    *data = (const uint8_t *)value.mv_data + c->data_offset;
    return MS_OK;
}

void store_after_guarded_reads(ms_store *s, int status)
{
    if (status == MS_ERR_CORRUPT && guard_ended_reads())
        for (size_t r = 0; r < s->shard_capacity; r++)
            s->read_txns[r] = NULL; /* ended by the guard */
    store_end_reads(s);
}

void store_end_reads(ms_store *s)
{
    for (size_t r = 0; r < s->shard_capacity; r++)
        if (s->read_txns[r]) {
            env_read_end(s->shards[r], s->read_txns[r]);
            s->read_txns[r] = NULL;
        }
}

static int check_destination(ms_store *s, int64_t step, const store_entry *e, const ms_tensor *dst,
                             const int64_t *offsets)
{
    char stored[160], wanted[160], region[200];
    if (e->kind != MS_STORE_TENSOR)
        return MS_FAIL(MS_ERR_DTYPE, "%s: step %lld: '%s' is a non-tensor value", s->path,
                       (long long)step, e->fqn);
    if (dst->storage && dst->storage->pool >= MS_POOL_CUDA0)
        return MS_FAIL(MS_ERR_DEVICE,
                       "%s: step %lld: '%s': the destination is in pool %s; read into a host "
                       "tensor",
                       s->path, (long long)step, e->fqn, ms_pool_name(dst->storage->pool));
    if (dst->dtype != e->dtype)
        return MS_FAIL(MS_ERR_DTYPE, "%s: step %lld: '%s' is stored as %s, the destination is %s",
                       s->path, (long long)step, e->fqn, ms_dtype_name(e->dtype),
                       ms_dtype_name(dst->dtype));
    bool fits = dst->ndim == e->ndim;
    for (int d = 0; fits && d < dst->ndim; d++)
        fits = offsets[d] >= 0 && dst->shape[d] >= 0 && offsets[d] <= e->shape[d] - dst->shape[d];
    if (!fits)
        return MS_FAIL(MS_ERR_SHAPE,
                       "%s: step %lld: '%s' has global shape %s; the destination of shape %s "
                       "asks for region %s",
                       s->path, (long long)step, e->fqn,
                       ms_shape_str(stored, sizeof stored, e->ndim, e->shape),
                       ms_shape_str(wanted, sizeof wanted, dst->ndim, dst->shape),
                       region_str(region, sizeof region, dst->ndim, offsets, dst->shape));
    return MS_OK;
}

int chunk_corrupt(ms_store *s, int64_t step, const store_entry *e, const store_chunk *c,
                  uint64_t digest)
{
    char region[200];
    return MS_FAIL(MS_ERR_CORRUPT,
                   "%s: step %lld: '%s': chunk %s in shard-%u.mdb failed its checksum (stored "
                   "%016llx, read %016llx)",
                   s->path, (long long)step, e->fqn,
                   region_str(region, sizeof region, e->ndim, c->offsets, c->sizes), c->rank,
                   (unsigned long long)c->checksum, (unsigned long long)digest);
}

/* The overlap of chunk c and the destination region: box shape, the box's first element in
 * the chunk and in dst (elements). False when they do not overlap. */
static bool overlap(const store_entry *e, const store_chunk *c, const ms_tensor *dst,
                    const int64_t *offsets, int64_t *box, int64_t *src_first, int64_t *dst_first)
{
    int64_t chunk_strides[MS_MAX_DIMS];
    ms_contiguous_strides(e->ndim, c->sizes, chunk_strides);
    *src_first = *dst_first = 0;
    for (int d = 0; d < e->ndim; d++) {
        int64_t lo = c->offsets[d] > offsets[d] ? c->offsets[d] : offsets[d];
        int64_t c_end = c->offsets[d] + c->sizes[d], d_end = offsets[d] + dst->shape[d];
        int64_t hi = c_end < d_end ? c_end : d_end;
        if (hi <= lo)
            return false;
        box[d] = hi - lo;
        *src_first += (lo - c->offsets[d]) * chunk_strides[d];
        *dst_first += (lo - offsets[d]) * dst->strides[d];
    }
    return true;
}

static uint64_t chunk_bytes(const store_entry *e, const store_chunk *c)
{
    return (uint64_t)chunk_numel(c, e->ndim) * ms_dtype_size(e->dtype);
}

/* Whether chunk c fills one contiguous range of the destination (the overlap is all of it). */
static bool fills_contiguous_range(const store_entry *e, const store_chunk *c, const ms_tensor *dst,
                                   const int64_t *box)
{
    int64_t expected = 1;
    for (int d = e->ndim - 1; d >= 0; d--) {
        if (box[d] != c->sizes[d])
            return false;
        if (box[d] != 1 && dst->strides[d] != expected)
            return false;
        expected *= box[d];
    }
    return true;
}

static int pread_verified(ms_store *s, int64_t step, const store_entry *e, const store_chunk *c,
                          int fd, off_t offset, uint8_t *dst, uint64_t nbytes, uint64_t *digest)
{
    checksum_reset(s->hasher);
    for (uint64_t done = 0; done < nbytes;) {
        uint64_t n = nbytes - done < PREAD_BLOCK_BYTES ? nbytes - done : PREAD_BLOCK_BYTES;
        ssize_t got = pread(fd, dst + done, n, offset + (off_t)done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            int err = got < 0 ? errno : EIO;
            return MS_FAIL(err, "%s: step %lld: '%s': reading shard-%u.mdb: %s", s->path,
                           (long long)step, e->fqn, c->rank, strerror(err));
        }
        checksum_update(s->hasher, dst + done, (size_t)got);
        done += (uint64_t)got;
    }
    *digest = checksum_digest(s->hasher);
    return MS_OK;
}

/* Copy the overlap of chunk c and the destination region, verifying c on first touch.
 * [OUT] *copied: elements written. */
static int read_chunk(ms_store *s, int64_t step, store_entry *e, store_chunk *c, ms_tensor *dst,
                      const int64_t *offsets, int64_t *copied)
{
    int64_t box[MS_MAX_DIMS], chunk_strides[MS_MAX_DIMS], src_first, dst_first;
    overlap(e, c, dst, offsets, box, &src_first, &dst_first);
    ms_contiguous_strides(e->ndim, c->sizes, chunk_strides);
    size_t esize = ms_dtype_size(e->dtype);
    uint64_t nbytes = chunk_bytes(e, c);
    const uint8_t *stored;
    MS_CHECK(store_fetch_chunk(s, step, e, c, nbytes, &stored));
    uint8_t *dst_base = (uint8_t *)ms_tensor_data(dst) + dst_first * (int64_t)esize;
    uint64_t digest = 0;
    off_t file_offset;
    store_env *shard = s->shards[c->rank];
    bool whole = !c->verified && fills_contiguous_range(e, c, dst, box);
    /* A whole chunk on disk is read with pread in blocks, each hashed while it is in cache:
     * the kernel's sequential read-ahead keeps the disk busy, which faults on the map do not.
     * Once one was on disk, so are the ones after it: those the read-ahead has reached look
     * cached, and copying them from the map would leave the read-ahead unrenewed (the disk
     * idle until the next pread). A cached one is copied from the map, hashed as it passes
     * (checksum_copy). */
    if (whole && !s->reading_from_disk && !chunk_cached(stored, nbytes))
        s->reading_from_disk = true;
    if (whole && s->reading_from_disk &&
        env_value_offset(shard, stored - c->data_offset, c->data_offset + nbytes, &file_offset)) {
        int fd;
        file_offset += c->data_offset;
        MS_CHECK(env_read_fd(shard, &fd));
        MS_CHECK(pread_verified(s, step, e, c, fd, file_offset, dst_base, nbytes, &digest));
    } else if (whole) {
        digest = checksum_copy(dst_base, stored, nbytes, nbytes >= STREAM_MIN_BYTES);
    } else {
        copy_box_from_chunk(dst_base, dst->strides, stored, nbytes, src_first, chunk_strides, esize,
                            e->ndim, box, c->verified ? NULL : s->hasher, &digest);
    }
    if (!c->verified && digest != c->checksum)
        return chunk_corrupt(s, step, e, c, digest);
    c->verified = true;
    int64_t numel = 1;
    for (int d = 0; d < e->ndim; d++)
        numel *= box[d];
    *copied += numel;
    return MS_OK;
}

/* Read the chunks that overlap dst in order; chunks read through the map (not cached, not
 * read with pread) have the kernel read a window of them ahead. */
static int read_overlapping(ms_store *s, int64_t step, store_entry *e, ms_tensor *dst,
                            const int64_t *offsets, int64_t *copied)
{
    MS_CHECK(buffer_reserve(&s->scratch, e->chunk_count * sizeof(uint32_t)));
    uint32_t *touched = (uint32_t *)s->scratch.data;
    uint32_t count = 0, ahead = 0;
    int64_t box[MS_MAX_DIMS], src_first, dst_first;
    for (uint32_t i = 0; i < e->chunk_count; i++)
        if (overlap(e, &e->chunks[i], dst, offsets, box, &src_first, &dst_first))
            touched[count++] = i;
    uint64_t ahead_bytes = 0;
    for (uint32_t k = 0; k < count; k++) {
        while (ahead < count && (ahead <= k || ahead_bytes < PREFETCH_AHEAD_BYTES)) {
            const store_chunk *c = &e->chunks[touched[ahead++]];
            uint64_t nbytes = chunk_bytes(e, c);
            const uint8_t *stored;
            MS_CHECK(store_fetch_chunk(s, step, e, c, nbytes, &stored));
            overlap(e, c, dst, offsets, box, &src_first, &dst_first);
            if (!c->verified && !fills_contiguous_range(e, c, dst, box))
                prefetch_chunk(stored, nbytes);
            ahead_bytes += nbytes;
        }
        store_chunk *c = &e->chunks[touched[k]];
        ahead_bytes -= chunk_bytes(e, c);
        MS_CHECK(read_chunk(s, step, e, c, dst, offsets, copied));
    }
    return MS_OK;
}

typedef struct read_args {
    ms_store *s;
    int64_t step;
    store_entry *e;
    ms_tensor *dst;
    const int64_t *offsets;
    int64_t *copied;
} read_args;

static int read_overlapping_guarded(void *arg)
{
    read_args *a = arg;
    return read_overlapping(a->s, a->step, a->e, a->dst, a->offsets, a->copied);
}

int ms_store_read_tensor(ms_store *s, int64_t step, const char *fqn, ms_tensor *dst,
                         const int64_t *global_offsets)
{
    MS_CHECK(store_check(s, "store_read_tensor"));
    MS_CHECK(ms_check_tensor("store_read_tensor", "dst", dst));
    if (dst->ndim < 0 || dst->ndim > MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_INVALID, "store_read_tensor: dst has %d dims", dst->ndim);
    step_manifest *m;
    store_entry *e;
    MS_CHECK(store_find_entry(s, step, fqn, &m, &e));
    int64_t offsets[MS_MAX_DIMS] = {0};
    for (int d = 0; global_offsets && d < dst->ndim; d++)
        offsets[d] = global_offsets[d];
    MS_CHECK(check_destination(s, step, e, dst, offsets));
    if (dst->numel == 0)
        return MS_OK;
    if (!ms_tensor_data(dst))
        return MS_FAIL(MS_ERR_INVALID, "store_read_tensor: '%s': dst has no storage", fqn);
    int64_t copied = 0;
    read_args a = {s, step, e, dst, offsets, &copied};
    int status = guard_run(read_overlapping_guarded, &a);
    store_after_guarded_reads(s, status);
    if (!status && copied != dst->numel)
        status = MS_FAIL(MS_ERR_CORRUPT,
                         "%s: step %lld: '%s': the stored chunks fill %lld of the %lld elements "
                         "asked for",
                         s->path, (long long)step, fqn, (long long)copied, (long long)dst->numel);
    return status;
}
