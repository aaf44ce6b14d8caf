/* moonshard store fuzz seeds: writes valid chunk tables and manifests, each with its mode
 * byte, into a corpus directory so fuzzing starts past the magic and the checksum. */
#include <stdio.h>
#include <string.h>

#include "store_internal.h"

static void add_tensor(entry_table *t, const char *fqn, int dtype, int ndim, const int64_t *shape,
                       uint32_t rank, int rows_per_chunk, int chunks)
{
    store_entry *e;
    table_add(t, fqn, strlen(fqn), MS_STORE_TENSOR, dtype, ndim, shape, &e);
    for (int c = 0; c < chunks; c++) {
        store_chunk chunk = {.checksum = 0x1234u + (uint64_t)c, .rank = rank, .seq = (uint32_t)c};
        for (int d = 0; d < ndim; d++)
            chunk.sizes[d] = shape[d];
        if (ndim) {
            chunk.offsets[0] = (int64_t)c * rows_per_chunk;
            chunk.sizes[0] = rows_per_chunk;
        }
        entry_add_chunk(e, &chunk);
    }
}

static void write_seed(const char *dir, const char *name, uint8_t mode, const entry_table *t,
                       const table_header *h)
{
    byte_buffer out = {0};
    char path[512];
    table_encode(t, h, &out);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fputc(mode, f);
        fwrite(out.data, 1, out.size, f);
        fclose(f);
    }
    buffer_free(&out);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: seeds <corpus directory>\n");
        return 2;
    }
    entry_table table = {0};
    int64_t matrix[2] = {8, 3}, vector[1] = {4};
    add_tensor(&table, "model.w", MS_F32, 2, matrix, 1, 4, 2);
    add_tensor(&table, "model.b", MS_BF16, 1, vector, 1, 4, 1);
    add_tensor(&table, "model.s", MS_I64, 0, NULL, 1, 0, 1);
    store_entry *bytes;
    table_add(&table, "extra.step", 10, MS_STORE_BYTES, 0, 0, NULL, &bytes);
    entry_set_bytes(bytes, "100", 3);
    table_header h = {.kind = TABLE_CHUNKS, .step = 7, .rank = 1};
    write_seed(argv[1], "seed-table", 0x81, &table, &h);
    table_finalize(&table, "seeds");
    h = (table_header){.kind = TABLE_MANIFEST, .step = 7, .rank = 2};
    write_seed(argv[1], "seed-manifest", 0x80, &table, &h);
    table_free(&table);
    return 0;
}
