/* moonshard kernels: embedding on the device: a gather with one thread per output element,
 * and a backward with one thread per column walking the positions in order. */
#include "embedding.cuh"

enum { F32 = 0, I32 = 4 };

__device__ __forceinline__ int64_t index_at(const void *indices, int dtype, int64_t i)
{
    return dtype == I32 ? (int64_t)((const int32_t *)indices)[i] : ((const int64_t *)indices)[i];
}

/* ---- kernels ---- */

__global__ void check_kernel(const void *indices, int dtype, int64_t count, int64_t num,
                             int64_t *first_bad)
{
    MS_CU_FOR(i, count)
    {
        int64_t index = index_at(indices, dtype, i);
        if (index < 0 || index >= num)
            atomicMin((unsigned long long *)first_bad, (unsigned long long)i);
    }
}

template <typename T>
__global__ void gather_kernel(T *out, ms_cu_table weight, const void *indices, int dtype,
                              int64_t count)
{
    MS_CU_FOR(e, count * weight.dim)
    {
        int64_t i = e / weight.dim, j = e % weight.dim;
        const T *row = (const T *)weight.data + index_at(indices, dtype, i) * weight.row_stride;
        out[e] = row[j * weight.col_stride];
    }
}

template <typename T>
__global__ void scatter_add_kernel(ms_cu_table dweight, const void *indices, int dtype,
                                   const T *dout, int64_t count)
{
    MS_CU_FOR(j, dweight.dim)
    {
        for (int64_t i = 0; i < count; i++) {
            T *cell = (T *)dweight.data + index_at(indices, dtype, i) * dweight.row_stride +
                      j * dweight.col_stride;
            *cell += dout[i * dweight.dim + j];
        }
    }
}

/* ---- launchers ---- */

int ms_cu_check_indices(cudaStream_t stream, const void *indices, int index_dtype,
                        int64_t count, int64_t num, int64_t *first_bad)
{
    check_kernel<<<ms_cu_blocks(count), MS_CU_THREADS, 0, stream>>>(indices, index_dtype, count,
                                                                    num, first_bad);
    return ms_cu_last_error();
}

int ms_cu_embedding(cudaStream_t stream, void *out, ms_cu_table weight, const void *indices,
                    int index_dtype, int64_t count)
{
    unsigned blocks = ms_cu_blocks(count * weight.dim);
    if (weight.dtype == F32)
        gather_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>((float *)out, weight, indices,
                                                                    index_dtype, count);
    else
        gather_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>((double *)out, weight,
                                                                     indices, index_dtype, count);
    return ms_cu_last_error();
}

int ms_cu_embedding_backward(cudaStream_t stream, ms_cu_table dweight, const void *indices,
                             int index_dtype, const void *dout, int64_t count)
{
    unsigned blocks = ms_cu_blocks(dweight.dim);
    if (dweight.dtype == F32)
        scatter_add_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(
            dweight, indices, index_dtype, (const float *)dout, count);
    else
        scatter_add_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(
            dweight, indices, index_dtype, (const double *)dout, count);
    return ms_cu_last_error();
}
