/* moonshard store: chunk tables and manifests as bytes (little-endian, versioned, with an
 * XXH3-64 trailer), and a decoder that trusts nothing it reads.
 *
 * header   magic[8] "MSHDTABL" (chunk table) or "MSHDMANI" (manifest), u32 version,
 *          u32 rank (table) or world size (manifest), i64 step, u32 entry count
 * entry    u16 fqn length, fqn bytes (no NUL), u8 kind
 *   tensor u8 dtype, u8 ndim, i64 shape[ndim], u32 chunk count, then per chunk:
 *          u32 rank, u32 seq, u64 checksum, i64 offsets[ndim], i64 sizes[ndim]
 *   bytes  u64 length, the bytes
 * trailer  u64 XXH3-64 of everything before it
 * Manifest entries are sorted by fqn and unique; table entries are unique. */
#include <string.h>

#include "store_internal.h"

static const char TABLE_MAGIC[8] = {'M', 'S', 'H', 'D', 'T', 'A', 'B', 'L'};
static const char MANIFEST_MAGIC[8] = {'M', 'S', 'H', 'D', 'M', 'A', 'N', 'I'};

enum {
    HEADER_BYTES = 8 + 4 + 4 + 8 + 4,
    TRAILER_BYTES = 8,
    CHUNK_FIXED_BYTES = 4 + 4 + 8,
    MAX_WORLD_SIZE = 1 << 24,
};

/* ---- encoding ---- */

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static size_t encoded_entry_bytes(const store_entry *e)
{
    size_t n = 2 + e->fqn_len + 1;
    if (e->kind == MS_STORE_BYTES)
        return n + 8 + e->nbytes;
    return n + 2 + 8 * (size_t)e->ndim + 4 +
           (size_t)e->chunk_count * (CHUNK_FIXED_BYTES + 16 * (size_t)e->ndim);
}

int table_encode(const entry_table *t, const table_header *h, byte_buffer *out)
{
    size_t total = HEADER_BYTES + TRAILER_BYTES;
    for (size_t i = 0; i < t->count; i++)
        total += encoded_entry_bytes(&t->entries[i]);
    MS_CHECK(buffer_reserve(out, total));
    uint8_t *p = out->data;
    memcpy(p, h->kind == TABLE_MANIFEST ? MANIFEST_MAGIC : TABLE_MAGIC, 8);
    put_u32(p + 8, MS_STORE_FORMAT_VERSION);
    put_u32(p + 12, h->rank);
    put_u64(p + 16, (uint64_t)h->step);
    put_u32(p + 24, (uint32_t)t->count);
    p += HEADER_BYTES;
    for (size_t i = 0; i < t->count; i++) {
        const store_entry *e = &t->entries[i];
        put_u16(p, (uint16_t)e->fqn_len);
        memcpy(p + 2, e->fqn, e->fqn_len);
        p += 2 + e->fqn_len;
        *p++ = (uint8_t)e->kind;
        if (e->kind == MS_STORE_BYTES) {
            put_u64(p, e->nbytes);
            if (e->nbytes)
                memcpy(p + 8, e->bytes, e->nbytes);
            p += 8 + e->nbytes;
            continue;
        }
        *p++ = (uint8_t)e->dtype;
        *p++ = (uint8_t)e->ndim;
        for (int d = 0; d < e->ndim; d++, p += 8)
            put_u64(p, (uint64_t)e->shape[d]);
        put_u32(p, e->chunk_count);
        p += 4;
        for (uint32_t c = 0; c < e->chunk_count; c++) {
            const store_chunk *chunk = &e->chunks[c];
            put_u32(p, chunk->rank);
            put_u32(p + 4, chunk->seq);
            put_u64(p + 8, chunk->checksum);
            p += CHUNK_FIXED_BYTES;
            for (int d = 0; d < e->ndim; d++, p += 8)
                put_u64(p, (uint64_t)chunk->offsets[d]);
            for (int d = 0; d < e->ndim; d++, p += 8)
                put_u64(p, (uint64_t)chunk->sizes[d]);
        }
    }
    put_u64(p, checksum_bytes(out->data, (size_t)(p - out->data)));
    out->size = total;
    return MS_OK;
}

/* ---- decoding ---- */

typedef struct reader {
    const uint8_t *p;
    const uint8_t *end;
    const char *what; /* "chunk table" or "manifest", for messages */
} reader;

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static bool take(reader *r, size_t n, const uint8_t **at)
{
    if ((size_t)(r->end - r->p) < n)
        return false;
    *at = r->p;
    r->p += n;
    return true;
}

static bool take_u(reader *r, int n, uint64_t *v)
{
    const uint8_t *at;
    if (!take(r, (size_t)n, &at))
        return false;
    *v = get_le(at, n);
    return true;
}

static int truncated(const reader *r)
{
    return MS_FAIL(MS_ERR_CORRUPT, "%s is truncated", r->what);
}

uint64_t table_trailer(const void *data, size_t size)
{
    return size < TRAILER_BYTES ? 0 : get_le((const uint8_t *)data + size - TRAILER_BYTES, 8);
}

static int decode_chunk(reader *r, const store_entry *e, const table_header *h, store_chunk *c)
{
    uint64_t rank, seq, checksum;
    if (!take_u(r, 4, &rank) || !take_u(r, 4, &seq) || !take_u(r, 8, &checksum))
        return truncated(r);
    *c = (store_chunk){.rank = (uint32_t)rank,
                       .seq = (uint32_t)seq,
                       .checksum = checksum,
                       .data_offset = h->version >= 2 ? CHUNK_DATA_OFFSET : 0};
    bool rank_ok = h->kind == TABLE_MANIFEST ? rank < h->rank : rank == h->rank;
    if (!rank_ok)
        return MS_FAIL(MS_ERR_CORRUPT, "%s: '%s' has a chunk of rank %llu", r->what, e->fqn,
                       (unsigned long long)rank);
    for (int half = 0; half < 2; half++) {
        int64_t *values = half ? c->sizes : c->offsets;
        for (int d = 0; d < e->ndim; d++) {
            uint64_t v;
            if (!take_u(r, 8, &v))
                return truncated(r);
            values[d] = (int64_t)v;
        }
    }
    for (int d = 0; d < e->ndim; d++)
        if (c->offsets[d] < 0 || c->sizes[d] <= 0 || c->offsets[d] > e->shape[d] - c->sizes[d])
            return MS_FAIL(MS_ERR_CORRUPT, "%s: '%s' has a chunk outside its shape", r->what,
                           e->fqn);
    if (chunk_numel(c, e->ndim) > (int64_t)(STORE_MAX_CHUNK_BYTES / ms_dtype_size(e->dtype)))
        return MS_FAIL(MS_ERR_CORRUPT, "%s: '%s' has a chunk larger than %lld bytes", r->what,
                       e->fqn, (long long)STORE_MAX_CHUNK_BYTES);
    return MS_OK;
}

static int decode_tensor(reader *r, store_entry *e, const table_header *h)
{
    uint64_t dtype, ndim, count;
    if (!take_u(r, 1, &dtype) || !take_u(r, 1, &ndim))
        return truncated(r);
    if (dtype >= MS_DTYPE_COUNT || ndim > MS_MAX_DIMS)
        return MS_FAIL(MS_ERR_CORRUPT, "%s: '%s' has dtype %llu and %llu dims", r->what, e->fqn,
                       (unsigned long long)dtype, (unsigned long long)ndim);
    e->dtype = (int)dtype;
    e->ndim = (int)ndim;
    for (int d = 0; d < e->ndim; d++) {
        uint64_t v;
        if (!take_u(r, 8, &v))
            return truncated(r);
        e->shape[d] = (int64_t)v;
    }
    int64_t numel;
    if (!shape_numel(e->ndim, e->shape, &numel) ||
        numel > INT64_MAX / (int64_t)ms_dtype_size(e->dtype))
        return MS_FAIL(MS_ERR_CORRUPT, "%s: '%s' has an invalid shape", r->what, e->fqn);
    if (!take_u(r, 4, &count))
        return truncated(r);
    if (count > (uint64_t)(r->end - r->p) / (CHUNK_FIXED_BYTES + 16 * (size_t)e->ndim))
        return truncated(r);
    if (numel == 0 && count)
        return MS_FAIL(MS_ERR_CORRUPT, "%s: empty tensor '%s' has chunks", r->what, e->fqn);
    int64_t covered = 0;
    for (uint64_t i = 0; i < count; i++) {
        store_chunk c;
        MS_CHECK(decode_chunk(r, e, h, &c));
        MS_CHECK(entry_add_chunk(e, &c));
        int64_t n = chunk_numel(&c, e->ndim);
        covered = covered > numel - n ? numel + 1 : covered + n;
    }
    if (h->kind == TABLE_MANIFEST && covered != numel)
        return MS_FAIL(MS_ERR_CORRUPT, "%s: the chunks of '%s' do not cover its shape", r->what,
                       e->fqn);
    return MS_OK;
}

static int decode_entry(reader *r, entry_table *t, const table_header *h)
{
    uint64_t len, kind;
    const uint8_t *fqn;
    if (!take_u(r, 2, &len) || !take(r, len, &fqn) || !take_u(r, 1, &kind))
        return truncated(r);
    if (len == 0 || memchr(fqn, 0, len))
        return MS_FAIL(MS_ERR_CORRUPT, "%s has an empty fqn or one with a NUL byte", r->what);
    if (kind != MS_STORE_TENSOR && kind != MS_STORE_BYTES)
        return MS_FAIL(MS_ERR_CORRUPT, "%s: '%.*s' has kind %llu", r->what, (int)len,
                       (const char *)fqn, (unsigned long long)kind);
    if (table_find(t, (const char *)fqn, len) >= 0)
        return MS_FAIL(MS_ERR_CORRUPT, "%s lists '%.*s' twice", r->what, (int)len,
                       (const char *)fqn);
    if (h->kind == TABLE_MANIFEST && t->count) {
        const store_entry *last = &t->entries[t->count - 1];
        size_t common = last->fqn_len < len ? last->fqn_len : len;
        int order = memcmp(last->fqn, fqn, common);
        if (order > 0 || (order == 0 && last->fqn_len > len))
            return MS_FAIL(MS_ERR_CORRUPT, "%s entries are out of order", r->what);
    }
    store_entry *e;
    MS_CHECK(table_add(t, (const char *)fqn, len, (int)kind, 0, 0, NULL, &e));
    if (kind == MS_STORE_TENSOR)
        return decode_tensor(r, e, h);
    uint64_t nbytes;
    const uint8_t *bytes;
    if (!take_u(r, 8, &nbytes) || nbytes > (uint64_t)(r->end - r->p) || !take(r, nbytes, &bytes))
        return truncated(r);
    return entry_set_bytes(e, bytes, nbytes);
}

int table_decode(entry_table *t, table_header *h, int expected_kind, const void *data, size_t size)
{
    table_clear(t);
    const uint8_t *bytes = data;
    const char *what = expected_kind == TABLE_MANIFEST ? "manifest" : "chunk table";
    if (!bytes || size < HEADER_BYTES + TRAILER_BYTES)
        return MS_FAIL(MS_ERR_CORRUPT, "%s of %zu bytes is too short", what, size);
    const char *magic = expected_kind == TABLE_MANIFEST ? MANIFEST_MAGIC : TABLE_MAGIC;
    if (memcmp(bytes, magic, 8) != 0)
        return MS_FAIL(MS_ERR_CORRUPT, "not a moonshard %s (bad magic)", what);
    uint32_t version = (uint32_t)get_le(bytes + 8, 4);
    if (version == 0)
        return MS_FAIL(MS_ERR_CORRUPT, "%s has format version 0", what);
    if (version > MS_STORE_FORMAT_VERSION)
        return MS_FAIL(MS_ERR_VERSION,
                       "%s was written by format version %u; this build reads up to %d", what,
                       version, MS_STORE_FORMAT_VERSION);
    if (checksum_bytes(bytes, size - TRAILER_BYTES) != table_trailer(bytes, size))
        return MS_FAIL(MS_ERR_CORRUPT, "%s failed its checksum", what);
    *h = (table_header){.kind = expected_kind,
                        .rank = (uint32_t)get_le(bytes + 12, 4),
                        .step = (int64_t)get_le(bytes + 16, 8),
                        .version = version};
    if (h->step < 0)
        return MS_FAIL(MS_ERR_CORRUPT, "%s has step %lld", what, (long long)h->step);
    if (expected_kind == TABLE_MANIFEST && (h->rank == 0 || h->rank > MAX_WORLD_SIZE))
        return MS_FAIL(MS_ERR_CORRUPT, "manifest has world size %u", h->rank);
    reader r = {.p = bytes + HEADER_BYTES, .end = bytes + size - TRAILER_BYTES, .what = what};
    uint64_t count = get_le(bytes + 24, 4);
    for (uint64_t i = 0; i < count; i++)
        MS_CHECK(decode_entry(&r, t, h));
    if (r.p != r.end)
        return MS_FAIL(MS_ERR_CORRUPT, "%s has %zu bytes after its last entry", what,
                       (size_t)(r.end - r.p));
    return MS_OK;
}
