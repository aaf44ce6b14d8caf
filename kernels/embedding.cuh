/* moonshard kernels: launchers of the embedding lookup and its backward. out is assigned;
 * dweight is a parameter gradient and accumulates (+=). Indices are i32 or i64. */
#ifndef MS_KERNELS_EMBEDDING_CUH
#define MS_KERNELS_EMBEDDING_CUH

#include "launch.cuh"

/* A table of num rows of dim elements (f32 or f64) with strides row_stride, col_stride. */
typedef struct ms_cu_table {
    void *data;
    int64_t num, dim, row_stride, col_stride;
    int dtype;
} ms_cu_table;

/* *first_bad (device, set to count by the caller) becomes the lowest position whose index
 * lies outside [0, num). */
MS_CU_API int ms_cu_check_indices(cudaStream_t stream, const void *indices, int index_dtype,
                                  int64_t count, int64_t num, int64_t *first_bad);
/* out[i, :] (dense, count x dim) = table row indices[i]. */
MS_CU_API int ms_cu_embedding(cudaStream_t stream, void *out, ms_cu_table weight,
                              const void *indices, int index_dtype, int64_t count);
/* dweight row indices[i] += dout[i, :], positions in order per column (deterministic). */
MS_CU_API int ms_cu_embedding_backward(cudaStream_t stream, ms_cu_table dweight,
                                       const void *indices, int index_dtype,
                                       const void *dout, int64_t count);

#endif
