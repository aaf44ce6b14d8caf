/* moonshard kernels: layer norm on the device, with an optional residual add fused in (the
 * sum is stored, rounded to the stored type, and that rounded sum is normalised, as the
 * separate add would give). One block per row for the statistics and dx; dweight and dbias
 * are summed over the rows in column blocks (column_sums.cuh), in an order fixed by the
 * shape. bf16 and f16 are read and written as they are, computed in f32. */
#include "layernorm.cuh"
#include "block.cuh"
#include "column_sums.cuh"
#include "reduce.h"
#include "value.cuh"

/* mean and rstd: the stats' own float dtype, stored through f32 unless f64. */
__device__ __forceinline__ double load_stat(const void *stats, int dtype, int64_t i)
{
    return ms_cu_load(dtype, (const char *)stats + i * ms_cu_dtype_size(dtype)).f;
}

__device__ __forceinline__ void store_stat(void *stats, int dtype, int64_t i, double value)
{
    ms_cu_value v = {0, dtype == MS_CU_F64 ? value : (double)(float)value, 0};
    ms_cu_store(dtype, (char *)stats + i * ms_cu_dtype_size(dtype), v);
}

/* v rounded to the stored type S, as a separate op's store and load would round it. */
template <typename S, typename T> __device__ __forceinline__ T rounded(T v)
{
    S stored;
    ms_cu_narrow(&stored, v);
    return ms_cu_widen(stored);
}

/* ---- kernels ---- */

/* S: the stored element type; T: the type computed in. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void forward_kernel(ms_cu_layer_norm a)
{
    __shared__ double scratch[MS_CU_THREADS];
    const S *weight = (const S *)a.weight, *bias = (const S *)a.bias;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const S *x = (const S *)a.x + r * a.size;
        S *out = (S *)a.out + r * a.size;
        if (a.residual) {
            const S *residual = (const S *)a.residual + r * a.size;
            S *sum = (S *)a.sum + r * a.size;
            for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x)
                ms_cu_narrow(&sum[j], (T)(ms_cu_widen(x[j]) + ms_cu_widen(residual[j])));
            x = sum;
        }
        double local = 0.0;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x)
            local += (double)ms_cu_widen(x[j]);
        double mean = ms_cu_block_sum(local, scratch) / (double)a.size;
        local = 0.0;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            double d = (double)ms_cu_widen(x[j]) - mean;
            local += d * d;
        }
        double rstd = ms_k_rstd(ms_cu_block_sum(local, scratch) / (double)a.size, a.eps);
        if (threadIdx.x == 0) {
            store_stat(a.mean, a.mean_dtype, r, mean);
            store_stat(a.rstd, a.rstd_dtype, r, rstd);
        }
        T m = (T)mean, s = (T)rstd;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            T y = (ms_cu_widen(x[j]) - m) * s;
            if (weight)
                y *= ms_cu_widen(weight[j]);
            if (bias)
                y += ms_cu_widen(bias[j]);
            ms_cu_narrow(&out[j], y);
        }
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void backward_dx_kernel(ms_cu_layer_norm a)
{
    __shared__ double scratch[MS_CU_THREADS];
    const S *weight = (const S *)a.weight;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const S *x = (const S *)a.x + r * a.size, *dy = (const S *)a.dy + r * a.size;
        S *dx = (S *)a.dx + r * a.size;
        T mean = (T)load_stat(a.mean, a.mean_dtype, r),
          rstd = (T)load_stat(a.rstd, a.rstd_dtype, r);
        double local_g = 0.0, local_g_xhat = 0.0;
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            T xhat = (ms_cu_widen(x[j]) - mean) * rstd;
            T g = weight ? ms_cu_widen(dy[j]) * ms_cu_widen(weight[j]) : ms_cu_widen(dy[j]);
            local_g += (double)g;
            local_g_xhat += (double)g * (double)xhat;
        }
        T mean_g = (T)(ms_cu_block_sum(local_g, scratch) / (double)a.size);
        T mean_g_xhat = (T)(ms_cu_block_sum(local_g_xhat, scratch) / (double)a.size);
        for (int64_t j = threadIdx.x; j < a.size; j += blockDim.x) {
            T xhat = (ms_cu_widen(x[j]) - mean) * rstd;
            T g = weight ? ms_cu_widen(dy[j]) * ms_cu_widen(weight[j]) : ms_cu_widen(dy[j]);
            T d = rstd * (g - mean_g - xhat * mean_g_xhat);
            if (a.dsum)
                d = rounded<S>(d) + ms_cu_widen(((const S *)a.dsum)[r * a.size + j]);
            ms_cu_narrow(&dx[j], d);
        }
    }
}

/* Each chunk's sums of dy xhat and dy per column, into partials[chunk][0 or 1][col]. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void backward_params_kernel(ms_cu_layer_norm a)
{
    int64_t blocks = ms_cu_column_blocks(a.rows, a.size);
    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        ms_cu_column_block t = ms_cu_column_block_of(b, a.rows, a.size);
        double dweight = 0.0, dbias = 0.0;
        if (t.col < a.size)
            for (int64_t r = t.first; r < t.last; r += MS_CU_ROW_LANES) {
                T x = ms_cu_get<S>(a.x, r * a.size + t.col);
                T dy = ms_cu_get<S>(a.dy, r * a.size + t.col);
                T xhat = (x - (T)load_stat(a.mean, a.mean_dtype, r)) *
                         (T)load_stat(a.rstd, a.rstd_dtype, r);
                dweight += (double)dy * (double)xhat;
                dbias += (double)dy;
            }
        dweight = ms_cu_lanes_total(dweight);
        dbias = ms_cu_lanes_total(dbias);
        if (threadIdx.y == 0 && t.col < a.size) {
            a.partials[2 * t.chunk * a.size + t.col] = dweight;
            a.partials[(2 * t.chunk + 1) * a.size + t.col] = dbias;
        }
    }
}

/* dweight and dbias += their chunks' partials, added in chunk order. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void params_finish_kernel(ms_cu_layer_norm a)
{
    int64_t chunks = ms_cu_column_chunks(a.rows);
    MS_CU_FOR(j, a.size)
    {
        double dweight = ms_cu_chunks_total(a.partials, chunks, 2 * a.size, j);
        double dbias = ms_cu_chunks_total(a.partials + a.size, chunks, 2 * a.size, j);
        if (a.dweight)
            ms_cu_set<S>(a.dweight, j, (T)((double)ms_cu_get<S>(a.dweight, j) + dweight));
        if (a.dbias)
            ms_cu_set<S>(a.dbias, j, (T)((double)ms_cu_get<S>(a.dbias, j) + dbias));
    }
}

/* ---- launchers ---- */

static unsigned row_blocks(int64_t rows) { return (unsigned)(rows < 65535 ? rows : 65535); }

int ms_cu_layer_norm_forward(cudaStream_t stream, const ms_cu_layer_norm *args)
{
    MS_CU_LAUNCH_FLOAT(args->dtype, forward_kernel, row_blocks(args->rows), MS_CU_THREADS, stream,
                       *args)
    return ms_cu_last_error();
}

int ms_cu_layer_norm_backward(cudaStream_t stream, const ms_cu_layer_norm *args)
{
    MS_CU_LAUNCH_FLOAT(args->dtype, backward_dx_kernel, row_blocks(args->rows), MS_CU_THREADS,
                       stream, *args)
    if (!args->dweight && !args->dbias)
        return ms_cu_last_error();
    MS_CU_LAUNCH_FLOAT(args->dtype, backward_params_kernel,
                       ms_cu_column_grid(args->rows, args->size), ms_cu_column_threads(), stream,
                       *args)
    MS_CU_LAUNCH_FLOAT(args->dtype, params_finish_kernel, ms_cu_blocks(args->size),
                       MS_CU_THREADS, stream, *args)
    return ms_cu_last_error();
}
