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

#define EMBEDDING_COPY(T)                                                           \
    for (int64_t i = 0; i < count; i++) {                                           \
        const T *row = (const T *)weight_data + index_at(idx, indices->dtype, i) * s0; \
        T *dst = (T *)out_data + i * dim;                                           \
        if (s1 == 1)                                                                \
            memcpy(dst, row, (size_t)dim * sizeof(T));                              \
        else                                                                        \
            for (int64_t j = 0; j < dim; j++)                                       \
                dst[j] = row[j * s1];                                               \
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
        const void *weight_data = ms_tensor_data(weight);
        int64_t s0 = weight->strides[0], s1 = weight->strides[1];
        if (weight->dtype == MS_F32) {
            EMBEDDING_COPY(float)
        } else {
            EMBEDDING_COPY(double)
        }
        ms_cpu_dense_done(out, out_owned, 1);
    }
    ms_cpu_dense_done(indices, idx_owned, 0);
    return status;
}

#define EMBEDDING_ACCUMULATE(T)                                                     \
    for (int64_t i = 0; i < count; i++) {                                           \
        T *row = (T *)dweight_data + index_at(idx, indices->dtype, i) * s0;         \
        const T *src = (const T *)dout_data + i * dim;                              \
        if (s1 == 1)                                                                \
            for (int64_t j = 0; j < dim; j++)                                       \
                row[j] += src[j];                                                   \
        else                                                                        \
            for (int64_t j = 0; j < dim; j++)                                       \
                row[j * s1] += src[j];                                              \
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
        void *dweight_data = ms_tensor_data(dweight);
        int64_t s0 = dweight->strides[0], s1 = dweight->strides[1];
        if (dweight->dtype == MS_F32) {
            EMBEDDING_ACCUMULATE(float)
        } else {
            EMBEDDING_ACCUMULATE(double)
        }
        ms_cpu_dense_done(dout, dout_owned, 0);
    }
    ms_cpu_dense_done(indices, idx_owned, 0);
    return status;
}
