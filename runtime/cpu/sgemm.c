/* moonshard CPU backend: f32 GEMM through oneDNN's sgemm, split across the worker pool.
 * oneDNN picks its kernel (AVX-512, AVX2, ...) from the CPU it runs on. Each thread calls it
 * with one OpenMP thread, so oneDNN never starts an OpenMP team (whose idle threads spin):
 * the pool's threads, which sleep, are the only ones. */
#include <omp.h>
#include <stdatomic.h>
#include <oneapi/dnnl/dnnl.h>

#include "cpu.h"

/* Columns (or rows) of out per split unit: whole cache lines of f32. */
enum { SPLIT_UNIT = 16 };

/* Multiply-adds per range below which a split costs more than it gains (a worker's wake-up
 * is some microseconds; 2^21 multiply-adds take about 10 us on one core). */
#define SPLIT_GRAIN 2097152.0

typedef struct sgemm_call {
    char ta, tb;
    int64_t m, n, k;
    float alpha, beta;
    const float *a, *b;
    float *c;
    int64_t lda, ldb, ldc;
    int by_rows; /* split out's rows (else its columns) */
    _Atomic int status; /* the first range's failure, dnnl_success if none */
} sgemm_call;

static _Thread_local int one_openmp_thread;

static void sgemm_range(void *ctx, int64_t begin, int64_t end)
{
    sgemm_call *g = ctx;
    if (!one_openmp_thread) {
        omp_set_num_threads(1);
        one_openmp_thread = 1;
    }
    int64_t first = begin * SPLIT_UNIT, count;
    const float *a = g->a, *b = g->b;
    float *c = g->c;
    int64_t m = g->m, n = g->n;
    if (g->by_rows) {
        count = (end * SPLIT_UNIT < m ? end * SPLIT_UNIT : m) - first;
        a += g->ta == 'N' ? first * g->lda : first;
        c += first * g->ldc;
        m = count;
    } else {
        count = (end * SPLIT_UNIT < n ? end * SPLIT_UNIT : n) - first;
        b += g->tb == 'N' ? first : first * g->ldb;
        c += first;
        n = count;
    }
    if (count <= 0)
        return;
    dnnl_status_t status = dnnl_sgemm(g->ta, g->tb, m, n, g->k, g->alpha, a, g->lda, b, g->ldb,
                                      g->beta, c, g->ldc);
    int none = dnnl_success;
    if (status != dnnl_success)
        atomic_compare_exchange_strong(&g->status, &none, (int)status);
}

int ms_cpu_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                 int64_t ldc)
{
    sgemm_call g = {trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, beta, a, b, c,
                    lda, ldb, ldc, m > n, dnnl_success};
    int64_t units = ((g.by_rows ? m : n) + SPLIT_UNIT - 1) / SPLIT_UNIT;
    double work = (double)m * (double)n * (double)k;
    ms_parallel_for(units, ms_parallel_ranges(units, work / SPLIT_GRAIN * MS_PARALLEL_GRAIN),
                    sgemm_range, &g);
    if (g.status == dnnl_out_of_memory)
        return MS_FAIL(MS_ERR_OOM, "matmul: oneDNN sgemm found no memory for its packing "
                       "buffers (%lld x %lld x %lld)", (long long)m, (long long)n, (long long)k);
    if (g.status != dnnl_success)
        return MS_FAIL(MS_ERR_INVALID, "matmul: oneDNN sgemm refused %lld x %lld x %lld "
                       "(lda %lld, ldb %lld, ldc %lld; status %d)", (long long)m, (long long)n,
                       (long long)k, (long long)lda, (long long)ldb, (long long)ldc, g.status);
    return MS_OK;
}
