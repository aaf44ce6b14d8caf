/* moonshard store fuzz target: the manifest decoder and the chunk-table reader, then merging
 * decoded tables into a manifest and reading it back. Built by fuzz/run.sh (libFuzzer).
 *
 * Input: one mode byte, then the bytes. Mode bit 7 rewrites the checksum trailer first, so
 * mutations get past it and reach the structure checks. Mode & 3:
 *   0  decode as a manifest; a success must re-encode to the same bytes (an older format
 *      version: to bytes that decode to the same entries)
 *   1  decode as a chunk table, merge, finalize; a manifest made of it must decode again
 *   2  two chunk tables (split at the u16 after the mode byte), merged together */
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

static entry_table decoded, merged, again;
static byte_buffer encoded;

static void require(bool condition)
{
    if (!condition)
        abort();
}

static void check_manifest_round_trip(const uint8_t *data, size_t size)
{
    table_header header;
    if (table_decode(&decoded, &header, TABLE_MANIFEST, data, size) != MS_OK)
        return;
    require(table_encode(&decoded, &header, &encoded) == MS_OK);
    if (header.version == MS_STORE_FORMAT_VERSION) {
        require(encoded.size == size && memcmp(encoded.data, data, size) == 0);
    } else { /* an older format re-encodes as the current one: the same entries come back */
        table_header back;
        require(table_decode(&again, &back, TABLE_MANIFEST, encoded.data, encoded.size) == MS_OK);
        require(again.count == decoded.count && back.step == header.step);
    }
    for (size_t i = 0; i < decoded.count; i++)
        require(table_find(&decoded, decoded.entries[i].fqn, decoded.entries[i].fqn_len) ==
                (int64_t)i);
}

static bool merge_table(const uint8_t *data, size_t size, table_header *header, uint64_t *ranks)
{
    if (table_decode(&decoded, header, TABLE_CHUNKS, data, size) != MS_OK)
        return false;
    if (header->rank >= *ranks)
        *ranks = (uint64_t)header->rank + 1;
    return table_merge(&merged, &decoded, header->rank, "fuzz") == MS_OK;
}

/* A manifest built from merged tables decodes to the same entries. */
static void check_built_manifest(int64_t step, uint64_t world_size)
{
    if (table_finalize(&merged, "fuzz") != MS_OK || world_size > (1u << 24))
        return;
    table_header header = {.kind = TABLE_MANIFEST, .step = step, .rank = (uint32_t)world_size};
    require(table_encode(&merged, &header, &encoded) == MS_OK);
    table_header back;
    require(table_decode(&again, &back, TABLE_MANIFEST, encoded.data, encoded.size) == MS_OK);
    require(again.count == merged.count && back.step == step && back.rank == world_size);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mode = data[0];
    size_t n = size - 1;
    uint8_t *bytes = malloc(n ? n : 1);
    memcpy(bytes, data + 1, n);
    if ((mode & 0x80) && n >= 8) {
        uint64_t trailer = checksum_bytes(bytes, n - 8);
        for (int i = 0; i < 8; i++)
            bytes[n - 8 + i] = (uint8_t)(trailer >> (8 * i));
    }
    table_clear(&merged);
    table_header header = {0};
    uint64_t ranks = 0;
    switch (mode & 3) {
    case 0:
        check_manifest_round_trip(bytes, n);
        break;
    case 1:
        if (merge_table(bytes, n, &header, &ranks))
            check_built_manifest(header.step, ranks);
        break;
    default:
        if (n >= 2) {
            size_t split = ((size_t)bytes[0] | (size_t)bytes[1] << 8) % (n - 1);
            table_header second;
            if (merge_table(bytes + 2, split, &header, &ranks) &&
                merge_table(bytes + 2 + split, n - 2 - split, &second, &ranks))
                check_built_manifest(header.step, ranks);
        }
        break;
    }
    free(bytes);
    return 0;
}
