/* moonshard CPU backend: embedding lookup and its backward.
 * out is assigned; dweight is a parameter gradient and accumulates (+=) row by row. */
#include <string.h>

#include "cpu.h"

static int64_t index_at(const void *indices, int dtype, int64_t i)
{
    return dtype == MS_I32 ? (int64_t)((const int32_t *)indices)[i]
                           : ((const int64_t *)indices)[i];
}

/* Every index in [0, num) before anything is written, so a bad batch changes nothing. */
static int check_indices(const char *op, const void *indices, int dtype, int64_t count,
                         int64_t num)
{
    for (int64_t i = 0; i < count; i++) {
        int64_t index = index_at(indices, dtype, i);
        if (index < 0 || index >= num)
            return MS_FAIL(MS_ERR_INDEX, "%s: index %lld at position %lld is outside [0, %lld)",
                           op, (long long)index, (long long)i, (long long)num);
    }
    return MS_OK;
}

/* What a lookup or its backward reads and writes; threads take rows of the lookup and
 * columns of the backward (each gradient row sums its uses in index order). */
typedef struct lookup {
    const void *idx;
    int index_dtype, dtype;
    int64_t dim, s0, s1;
    char *table;      /* weight or dweight */
    char *rows;       /* out or dout, dense [count, dim] */
    int64_t count;
} lookup;

#define EMBEDDING_COPY(T)                                                           \
    for (int64_t i = first; i < last; i++) {                                        \
        const T *row = (const T *)l->table + index_at(l->idx, l->index_dtype, i) * l->s0; \
        T *dst = (T *)l->rows + i * l->dim;                                         \
        if (l->s1 == 1)                                                             \
            memcpy(dst, row, (size_t)l->dim * sizeof(T));                           \
        else                                                                        \
            for (int64_t j = 0; j < l->dim; j++)                                    \
                dst[j] = row[j * l->s1];                                            \
    }

static void copy_rows(void *arg, int64_t first, int64_t last)
{
    const lookup *l = arg;
    if (l->dtype == MS_F32) {
        EMBEDDING_COPY(float)
    } else {
        EMBEDDING_COPY(double)
    }
}

int ms_cpu_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices)
{
    const char *op = "embedding";
    int64_t num = weight->shape[0], dim = weight->shape[1];
    int64_t count = indices->numel;
    if (count == 0)
        return MS_OK;
    void *idx, *idx_owned, *out_data, *out_owned;
    MS_CHECK(ms_cpu_dense(op, indices, 1, &idx, &idx_owned));
    int status = check_indices(op, idx, indices->dtype, count, num);
    if (status == MS_OK && dim > 0)
        status = ms_cpu_dense(op, out, 0, &out_data, &out_owned);
    if (status == MS_OK && dim > 0) {
        lookup l = {idx, indices->dtype, weight->dtype, dim, weight->strides[0],
                    weight->strides[1], ms_tensor_data(weight), out_data, count};
        ms_parallel_for(count, ms_parallel_ranges(count, (double)count * (double)dim),
                        copy_rows, &l);
        ms_cpu_dense_done(out, out_owned, 1);
    }
    ms_cpu_dense_done(indices, idx_owned, 0);
    return status;
}

#define EMBEDDING_ACCUMULATE(T)                                                     \
    for (int64_t i = 0; i < l->count; i++) {                                        \
        T *row = (T *)l->table + index_at(l->idx, l->index_dtype, i) * l->s0;       \
        const T *src = (const T *)l->rows + i * l->dim;                             \
        if (l->s1 == 1)                                                             \
            for (int64_t j = first; j < last; j++)                                  \
                row[j] += src[j];                                                   \
        else                                                                        \
            for (int64_t j = first; j < last; j++)                                  \
                row[j * l->s1] += src[j];                                           \
    }

static void accumulate_columns(void *arg, int64_t first, int64_t last)
{
    const lookup *l = arg;
    if (l->dtype == MS_F32) {
        EMBEDDING_ACCUMULATE(float)
    } else {
        EMBEDDING_ACCUMULATE(double)
    }
}

static void accumulate_line_columns(void *arg, int64_t first, int64_t last)
{
    const lookup *l = arg;
    accumulate_columns(arg, first * 16, last * 16 < l->dim ? last * 16 : l->dim);
}

int ms_cpu_embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                              const ms_tensor *dout)
{
    const char *op = "embedding_backward";
    int64_t num = dweight->shape[0], dim = dweight->shape[1];
    int64_t count = indices->numel;
    if (count == 0)
        return MS_OK;
    void *idx, *idx_owned, *dout_data, *dout_owned;
    MS_CHECK(ms_cpu_dense(op, indices, 1, &idx, &idx_owned));
    int status = check_indices(op, idx, indices->dtype, count, num);
    if (status == MS_OK && dim > 0)
        status = ms_cpu_dense(op, dout, 1, &dout_data, &dout_owned);
    if (status == MS_OK && dim > 0) {
        lookup l = {idx, indices->dtype, dweight->dtype, dim, dweight->strides[0],
                    dweight->strides[1], ms_tensor_data(dweight), dout_data, count};
        /* columns in whole cache lines, so threads never write one line */
        int64_t lines = (dim + 15) / 16;
        int ranges = ms_parallel_ranges(lines, (double)count * (double)dim);
        if (ranges > 1)
            ms_parallel_for(lines, ranges, accumulate_line_columns, &l);
        else
            accumulate_columns(&l, 0, dim);
        ms_cpu_dense_done(dout, dout_owned, 0);
    }
    ms_cpu_dense_done(indices, idx_owned, 0);
    return status;
}
