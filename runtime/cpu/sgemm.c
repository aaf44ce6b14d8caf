/* moonshard CPU backend: f32 GEMM through oneDNN's sgemm, split across the worker pool.
 * oneDNN picks its kernel (AVX-512, AVX2, ...) from the CPU it runs on. Each thread calls it
 * with one OpenMP thread, so oneDNN never starts an OpenMP team (whose idle threads spin):
 * the pool's threads, which sleep, are the only ones. */
#include <omp.h>
#include <stdatomic.h>
#include <oneapi/dnnl/dnnl.h>

#include "cpu.h"

/* A GEMM is cut into pieces by the shape alone, never by the thread count: oneDNN's sum for
 * an element can change with the sizes of the call that computes it, so the same pieces on
 * any number of threads give the same bits. Pieces are whole blocks of PIECE_UNIT rows or
 * columns of out (the longer side), at least MIN_PIECE_UNITS of them and PIECE_WORK
 * multiply-adds each, up to MAX_PIECES: 1, 2, 4 or 8 of them, so 1, 2, 4 or 8 threads share
 * them evenly. Each piece packs the shared operand again: pieces of at least 256 rows or
 * columns made bench/fsdp.lua's transformer step 5% faster at 2 threads than pieces of 128
 * (its 512-wide products in 2 pieces instead of 4). */
enum { PIECE_UNIT = 16, MIN_PIECE_UNITS = 16, MAX_PIECES = 8 };
#define PIECE_WORK 4194304.0

typedef struct sgemm_call {
    char ta, tb;
    int64_t m, n, k;
    float alpha, beta;
    const float *a, *b;
    float *c;
    int64_t lda, ldb, ldc;
    int by_rows;        /* pieces are rows of out (else columns) */
    int64_t units;      /* PIECE_UNIT blocks along the cut side */
    int64_t pieces;
    _Atomic int status; /* the first piece's failure, dnnl_success if none */
} sgemm_call;

static _Thread_local int one_openmp_thread;

static void sgemm_piece(sgemm_call *g, int64_t piece)
{
    int64_t side = g->by_rows ? g->m : g->n;
    int64_t first = g->units * piece / g->pieces * PIECE_UNIT;
    int64_t last = g->units * (piece + 1) / g->pieces * PIECE_UNIT;
    int64_t count = (last < side ? last : side) - first;
    const float *a = g->a, *b = g->b;
    float *c = g->c;
    int64_t m = g->m, n = g->n;
    if (g->by_rows) {
        a += g->ta == 'N' ? first * g->lda : first;
        c += first * g->ldc;
        m = count;
    } else {
        b += g->tb == 'N' ? first : first * g->ldb;
        c += first;
        n = count;
    }
    dnnl_status_t status = dnnl_sgemm(g->ta, g->tb, m, n, g->k, g->alpha, a, g->lda, b, g->ldb,
                                      g->beta, c, g->ldc);
    int none = dnnl_success;
    if (status != dnnl_success)
        atomic_compare_exchange_strong(&g->status, &none, (int)status);
}

static void sgemm_range(void *ctx, int64_t begin, int64_t end)
{
    if (!one_openmp_thread) {
        omp_set_num_threads(1);
        one_openmp_thread = 1;
    }
    for (int64_t piece = begin; piece < end; piece++)
        sgemm_piece(ctx, piece);
}

int ms_cpu_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                 int64_t ldc)
{
    sgemm_call g = {trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, beta, a, b, c,
                    lda, ldb, ldc, m > n, 0, 1, dnnl_success};
    g.units = ((g.by_rows ? m : n) + PIECE_UNIT - 1) / PIECE_UNIT;
    double work = (double)m * (double)n * (double)k;
    while (g.pieces * 2 <= MAX_PIECES && g.units >= g.pieces * 2 * MIN_PIECE_UNITS &&
           work >= (double)(g.pieces * 2) * PIECE_WORK)
        g.pieces *= 2;
    ms_parallel_for(g.pieces, ms_parallel_ranges(g.pieces, work), sgemm_range, &g);
    if (g.status == dnnl_out_of_memory)
        return MS_FAIL(MS_ERR_OOM, "matmul: oneDNN sgemm found no memory for its packing "
                       "buffers (%lld x %lld x %lld)", (long long)m, (long long)n, (long long)k);
    if (g.status != dnnl_success)
        return MS_FAIL(MS_ERR_INVALID, "matmul: oneDNN sgemm refused %lld x %lld x %lld "
                       "(lda %lld, ldb %lld, ldc %lld; status %d)", (long long)m, (long long)n,
                       (long long)k, (long long)lda, (long long)ldb, (long long)ldc, g.status);
    return MS_OK;
}
