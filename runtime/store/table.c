/* moonshard store: entry tables in memory - a rank's chunk table, the manifest that rank 0
 * merges from every rank's table, and decoded manifests - with a by-fqn hash index. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

bool shape_numel(int ndim, const int64_t *shape, int64_t *numel)
{
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0 || (shape[d] != 0 && n > INT64_MAX / shape[d]))
            return false;
        n *= shape[d];
    }
    *numel = n;
    return true;
}

int64_t chunk_numel(const store_chunk *c, int ndim)
{
    int64_t n = 1;
    for (int d = 0; d < ndim; d++)
        n *= c->sizes[d];
    return n;
}

const char *region_str(char *buf, size_t size, int ndim, const int64_t *offsets,
                       const int64_t *sizes)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, d ? ", %lld:%lld" : "%lld:%lld",
                                 (long long)offsets[d], (long long)(offsets[d] + sizes[d]));
    if (used < size)
        snprintf(buf + used, size - used, "]");
    return buf;
}

static uint64_t fqn_hash(const char *fqn, size_t len)
{
    return checksum_bytes(fqn, len);
}

static void index_insert(entry_table *t, size_t entry_number)
{
    const store_entry *e = &t->entries[entry_number];
    size_t mask = t->slot_count - 1;
    size_t slot = (size_t)fqn_hash(e->fqn, e->fqn_len) & mask;
    while (t->slots[slot])
        slot = (slot + 1) & mask;
    t->slots[slot] = (uint32_t)(entry_number + 1);
}

static int index_rebuild(entry_table *t, size_t slot_count)
{
    uint32_t *slots = calloc(slot_count, sizeof *slots);
    if (!slots)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory for an index of %zu slots", slot_count);
    free(t->slots);
    t->slots = slots;
    t->slot_count = slot_count;
    for (size_t i = 0; i < t->count; i++)
        index_insert(t, i);
    return MS_OK;
}

int64_t table_find(const entry_table *t, const char *fqn, size_t len)
{
    if (!t->slot_count)
        return -1;
    size_t mask = t->slot_count - 1;
    for (size_t slot = (size_t)fqn_hash(fqn, len) & mask;; slot = (slot + 1) & mask) {
        uint32_t number = t->slots[slot];
        if (!number)
            return -1;
        const store_entry *e = &t->entries[number - 1];
        if (e->fqn_len == len && memcmp(e->fqn, fqn, len) == 0)
            return number - 1;
    }
}

int table_add(entry_table *t, const char *fqn, size_t len, int kind, int dtype, int ndim,
              const int64_t *shape, store_entry **entry)
{
    if (t->count >= UINT32_MAX - 1)
        return MS_FAIL(MS_ERR_INVALID, "store: more than 2^32 entries");
    if (t->count == t->capacity) {
        size_t capacity = t->capacity ? 2 * t->capacity : 64;
        store_entry *entries = realloc(t->entries, capacity * sizeof *entries);
        if (!entries)
            return MS_FAIL(MS_ERR_OOM, "store: out of memory for %zu entries", capacity);
        t->entries = entries;
        t->capacity = capacity;
    }
    if (2 * (t->count + 1) > t->slot_count)
        MS_CHECK(index_rebuild(t, t->slot_count ? 2 * t->slot_count : 128));
    char *name = malloc(len + 1);
    if (!name)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory for an fqn");
    memcpy(name, fqn, len);
    name[len] = 0;
    store_entry *e = &t->entries[t->count];
    *e = (store_entry){.fqn = name, .fqn_len = len, .kind = kind, .dtype = dtype, .ndim = ndim};
    for (int d = 0; d < ndim; d++)
        e->shape[d] = shape[d];
    index_insert(t, t->count);
    t->count++;
    *entry = e;
    return MS_OK;
}

int entry_add_chunk(store_entry *e, const store_chunk *c)
{
    if (e->chunk_count == e->chunk_capacity) {
        if (e->chunk_capacity >= UINT32_MAX / 2)
            return MS_FAIL(MS_ERR_INVALID, "store: '%s' has too many chunks", e->fqn);
        uint32_t capacity = e->chunk_capacity ? 2 * e->chunk_capacity : 4;
        store_chunk *chunks = realloc(e->chunks, capacity * sizeof *chunks);
        if (!chunks)
            return MS_FAIL(MS_ERR_OOM, "store: out of memory for chunks of '%s'", e->fqn);
        e->chunks = chunks;
        e->chunk_capacity = capacity;
    }
    e->chunks[e->chunk_count++] = *c;
    return MS_OK;
}

int entry_set_bytes(store_entry *e, const void *data, uint64_t n)
{
    uint8_t *copy = malloc(n ? n : 1);
    if (!copy)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory for the %llu-byte value of '%s'",
                       (unsigned long long)n, e->fqn);
    if (n)
        memcpy(copy, data, n);
    free(e->bytes);
    e->bytes = copy;
    e->nbytes = n;
    return MS_OK;
}

void table_clear(entry_table *t)
{
    for (size_t i = 0; i < t->count; i++) {
        free(t->entries[i].fqn);
        free(t->entries[i].chunks);
        free(t->entries[i].bytes);
    }
    t->count = 0;
    if (t->slots)
        memset(t->slots, 0, t->slot_count * sizeof *t->slots);
}

void table_free(entry_table *t)
{
    table_clear(t);
    free(t->entries);
    free(t->slots);
    *t = (entry_table){0};
}

static int compare_entries(const void *a, const void *b)
{
    return strcmp(((const store_entry *)a)->fqn, ((const store_entry *)b)->fqn);
}

int table_sort(entry_table *t)
{
    if (t->count > 1)
        qsort(t->entries, t->count, sizeof *t->entries, compare_entries);
    if (!t->slot_count)
        return MS_OK;
    return index_rebuild(t, t->slot_count);
}

static int compare_regions(const void *a, const void *b, void *context)
{
    const store_chunk *x = a, *y = b;
    int ndim = *(const int *)context;
    for (int d = 0; d < ndim; d++)
        if (x->offsets[d] != y->offsets[d])
            return x->offsets[d] < y->offsets[d] ? -1 : 1;
    for (int d = 0; d < ndim; d++)
        if (x->sizes[d] != y->sizes[d])
            return x->sizes[d] < y->sizes[d] ? -1 : 1;
    return x->rank < y->rank ? -1 : x->rank > y->rank;
}

static bool same_region(const store_chunk *a, const store_chunk *b, int ndim)
{
    for (int d = 0; d < ndim; d++)
        if (a->offsets[d] != b->offsets[d] || a->sizes[d] != b->sizes[d])
            return false;
    return true;
}

static bool regions_overlap(const store_chunk *a, const store_chunk *b, int ndim)
{
    for (int d = 0; d < ndim; d++)
        if (a->offsets[d] >= b->offsets[d] + b->sizes[d] ||
            b->offsets[d] >= a->offsets[d] + a->sizes[d])
            return false;
    return true;
}

static const char *declaration_str(char *buf, size_t size, const store_entry *e)
{
    char shape[160];
    if (e->kind == MS_STORE_BYTES)
        snprintf(buf, size, "a non-tensor value");
    else
        snprintf(buf, size, "%s %s", ms_dtype_name(e->dtype),
                 ms_shape_str(shape, sizeof shape, e->ndim, e->shape));
    return buf;
}

static bool same_declaration(const store_entry *a, const store_entry *b)
{
    if (a->kind != b->kind)
        return false;
    if (a->kind == MS_STORE_BYTES)
        return true;
    if (a->dtype != b->dtype || a->ndim != b->ndim)
        return false;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d])
            return false;
    return true;
}

int table_merge(entry_table *into, const entry_table *from, uint32_t from_rank, const char *where)
{
    for (size_t i = 0; i < from->count; i++) {
        const store_entry *e = &from->entries[i];
        int64_t found = table_find(into, e->fqn, e->fqn_len);
        store_entry *target;
        if (found < 0) {
            MS_CHECK(
                table_add(into, e->fqn, e->fqn_len, e->kind, e->dtype, e->ndim, e->shape, &target));
            if (e->kind == MS_STORE_BYTES)
                MS_CHECK(entry_set_bytes(target, e->bytes, e->nbytes));
        } else {
            target = &into->entries[found];
            char have[200], incoming[200];
            if (!same_declaration(target, e))
                return MS_FAIL(MS_ERR_MISMATCH,
                               "%s: '%s': rank %u saved it as %s, another rank as %s", where,
                               e->fqn, from_rank, declaration_str(incoming, sizeof incoming, e),
                               declaration_str(have, sizeof have, target));
            if (e->kind == MS_STORE_BYTES &&
                (e->nbytes != target->nbytes ||
                 (e->nbytes && memcmp(e->bytes, target->bytes, e->nbytes) != 0)))
                return MS_FAIL(MS_ERR_MISMATCH,
                               "%s: '%s': rank %u saved a different value than another rank", where,
                               e->fqn, from_rank);
        }
        for (uint32_t c = 0; c < e->chunk_count; c++)
            MS_CHECK(entry_add_chunk(target, &e->chunks[c]));
    }
    return MS_OK;
}

/* Sort the chunks by region, fold identical replicas into one, and check that the rest
 * tile the global shape: inside it, pairwise disjoint, and as many elements as it has.
 * Sorted by offset in dim 0, a chunk can only overlap the ones after it that start before
 * it ends in dim 0, so slab layouts are checked in O(k log k). */
static int finalize_entry(store_entry *e, const char *where)
{
    char shape[160], a[200], b[200];
    int64_t numel, covered = 0;
    if (!shape_numel(e->ndim, e->shape, &numel))
        return MS_FAIL(MS_ERR_SHAPE, "%s: '%s': global shape overflows", where, e->fqn);
    if (e->chunk_count > 1)
        qsort_r(e->chunks, e->chunk_count, sizeof *e->chunks, compare_regions, &e->ndim);
    uint32_t kept = 0;
    for (uint32_t i = 0; i < e->chunk_count; i++) {
        const store_chunk *c = &e->chunks[i];
        if (kept && same_region(&e->chunks[kept - 1], c, e->ndim)) {
            if (e->chunks[kept - 1].checksum != c->checksum)
                return MS_FAIL(MS_ERR_MISMATCH,
                               "%s: '%s': replicas of %s saved by ranks %u and %u differ", where,
                               e->fqn, region_str(a, sizeof a, e->ndim, c->offsets, c->sizes),
                               e->chunks[kept - 1].rank, c->rank);
            continue;
        }
        e->chunks[kept++] = *c;
    }
    e->chunk_count = kept;
    for (uint32_t i = 0; i < e->chunk_count; i++) {
        const store_chunk *c = &e->chunks[i];
        for (int d = 0; d < e->ndim; d++)
            if (c->offsets[d] < 0 || c->sizes[d] <= 0 || c->offsets[d] > e->shape[d] - c->sizes[d])
                return MS_FAIL(MS_ERR_SHAPE, "%s: '%s': chunk %s from rank %u lies outside %s",
                               where, e->fqn,
                               region_str(a, sizeof a, e->ndim, c->offsets, c->sizes), c->rank,
                               ms_shape_str(shape, sizeof shape, e->ndim, e->shape));
        for (uint32_t j = i + 1; j < e->chunk_count; j++) {
            const store_chunk *later = &e->chunks[j];
            if (e->ndim && later->offsets[0] >= c->offsets[0] + c->sizes[0])
                break;
            if (regions_overlap(c, later, e->ndim))
                return MS_FAIL(
                    MS_ERR_MISMATCH, "%s: '%s': chunks %s (rank %u) and %s (rank %u) overlap",
                    where, e->fqn, region_str(a, sizeof a, e->ndim, c->offsets, c->sizes), c->rank,
                    region_str(b, sizeof b, e->ndim, later->offsets, later->sizes), later->rank);
        }
        covered += chunk_numel(c, e->ndim);
    }
    if (covered != numel)
        return MS_FAIL(MS_ERR_SHAPE,
                       "%s: '%s': the chunks saved by all ranks cover %lld of the %lld elements "
                       "of %s %s",
                       where, e->fqn, (long long)covered, (long long)numel, ms_dtype_name(e->dtype),
                       ms_shape_str(shape, sizeof shape, e->ndim, e->shape));
    return MS_OK;
}

int table_finalize(entry_table *t, const char *where)
{
    for (size_t i = 0; i < t->count; i++)
        if (t->entries[i].kind == MS_STORE_TENSOR)
            MS_CHECK(finalize_entry(&t->entries[i], where));
    return table_sort(t);
}
