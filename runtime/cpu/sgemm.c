/* moonshard CPU backend: f32 GEMM. On CPUs with AVX-512, oneDNN's sgemm, cut into pieces
 * that the worker pool runs; elsewhere OpenBLAS's, on its own threads, since oneDNN's AVX2
 * kernels lose up to 40% on the sub-matrices that pieces are (bench/README.md). oneDNN is
 * always called with one OpenMP thread, so it never starts an OpenMP team (whose idle
 * threads spin). MOONSHARD_SGEMM=onednn or openblas overrides the choice.
 * oneDNN's AVX-512 sgemm keeps data below the stack pointer, past the 128 bytes a signal
 * frame leaves alone: a handler run on the thread during a call corrupts it (a 1 ms SIGPROF
 * timer, as LuaJIT's profiler sets, broke the heap within a few hundred calls; AVX2 kernels
 * and OpenBLAS's did not). So every oneDNN call runs with asynchronous signals held. */
#include <limits.h>
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <cblas.h>
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
    const float *bias; /* NULL, or n values each piece writes into its rows of c first */
    float *c;
    int64_t lda, ldb, ldc;
    int by_rows;        /* pieces are rows of out (else columns) */
    int64_t units;      /* PIECE_UNIT blocks along the cut side */
    int64_t pieces;
    _Atomic int status; /* the first piece's failure, dnnl_success if none */
} sgemm_call;

static _Thread_local int one_openmp_thread;

/* Each of c's rows [0, rows) (ldc apart) gets the n values of bias. */
static void fill_rows(float *c, int64_t ldc, int64_t rows, int64_t n, const float *bias)
{
    for (int64_t r = 0; r < rows; r++)
        memcpy(c + r * ldc, bias, (size_t)n * sizeof *bias);
}

typedef struct fill_call { float *c; int64_t ldc, n; const float *bias; } fill_call;

static void fill_range(void *ctx, int64_t begin, int64_t end)
{
    fill_call *f = ctx;
    fill_rows(f->c + begin * f->ldc, f->ldc, end - begin, f->n, f->bias);
}

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
    if (g->bias)
        fill_rows(c, g->ldc, m, n, g->bias + (g->by_rows ? 0 : first));
    dnnl_status_t status = dnnl_sgemm(g->ta, g->tb, m, n, g->k, g->alpha, a, g->lda, b, g->ldb,
                                      g->beta, c, g->ldc);
    int none = dnnl_success;
    if (status != dnnl_success)
        atomic_compare_exchange_strong(&g->status, &none, (int)status);
}

static void one_openmp_thread_here(void)
{
    if (!one_openmp_thread) {
        omp_set_num_threads(1);
        one_openmp_thread = 1;
    }
}

static void sgemm_range(void *ctx, int64_t begin, int64_t end)
{
    one_openmp_thread_here();
    for (int64_t piece = begin; piece < end; piece++)
        sgemm_piece(ctx, piece);
}

static int onednn_status(int status, int64_t m, int64_t n, int64_t k, int64_t lda,
                         int64_t ldb, int64_t ldc)
{
    if (status == dnnl_out_of_memory)
        return MS_FAIL(MS_ERR_OOM, "matmul: oneDNN sgemm found no memory for its packing "
                       "buffers (%lld x %lld x %lld)", (long long)m, (long long)n, (long long)k);
    if (status != dnnl_success)
        return MS_FAIL(MS_ERR_INVALID, "matmul: oneDNN sgemm refused %lld x %lld x %lld "
                       "(lda %lld, ldb %lld, ldc %lld; status %d)", (long long)m, (long long)n,
                       (long long)k, (long long)lda, (long long)ldb, (long long)ldc, status);
    return MS_OK;
}

/* 1: oneDNN in pieces on the pool; 0: OpenBLAS on its threads; -1: MOONSHARD_SGEMM names
 * neither, and every f32 GEMM fails saying so. Decided once. */
static int use_pieces;
static pthread_once_t use_pieces_once = PTHREAD_ONCE_INIT;

static void decide_pieces(void)
{
    const char *choice = getenv("MOONSHARD_SGEMM");
    if (choice && strcmp(choice, "onednn") == 0)
        use_pieces = 1;
    else if (choice && strcmp(choice, "openblas") == 0)
        use_pieces = 0;
    else if (choice && *choice)
        use_pieces = -1;
    else
        use_pieces = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

static int fits_int(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc)
{
    return m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
           ldc <= INT_MAX;
}

int ms_cpu_sgemm_serial(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                        float *c, int64_t ldc)
{
    one_openmp_thread_here();
    return onednn_status(dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a,
                                    lda, b, ldb, beta, c, ldc),
                         m, n, k, lda, ldb, ldc);
}

/* ms_cpu_sgemm, and with bias (beta then 1) ms_cpu_sgemm_bias. */
static int sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, const float *bias,
                 float beta, float *c, int64_t ldc)
{
    pthread_once(&use_pieces_once, decide_pieces);
    if (use_pieces < 0)
        return MS_FAIL(MS_ERR_INVALID, "matmul: MOONSHARD_SGEMM is '%s'; expected onednn or "
                       "openblas (or unset, to choose by the CPU)", getenv("MOONSHARD_SGEMM"));
    if (!use_pieces && fits_int(m, n, k, lda, ldb, ldc)) {
        if (bias) {
            fill_call f = {c, ldc, n, bias};
            ms_parallel_for(m, ms_parallel_ranges(m, (double)(m * n)), fill_range, &f);
        }
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                    trans_b ? CblasTrans : CblasNoTrans, (int)m, (int)n, (int)k, alpha, a,
                    (int)lda, b, (int)ldb, beta, c, (int)ldc);
        return MS_OK;
    }
    sgemm_call g = {trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, beta, a, b, bias,
                    c, lda, ldb, ldc, m > n, 0, 1, dnnl_success};
    g.units = ((g.by_rows ? m : n) + PIECE_UNIT - 1) / PIECE_UNIT;
    double work = (double)m * (double)n * (double)k;
    while (g.pieces * 2 <= MAX_PIECES && g.units >= g.pieces * 2 * MIN_PIECE_UNITS &&
           work >= (double)(g.pieces * 2) * PIECE_WORK)
        g.pieces *= 2;
    ms_parallel_for_signals_held(g.pieces, ms_parallel_ranges(g.pieces, work), sgemm_range, &g);
    return onednn_status(g.status, m, n, k, lda, ldb, ldc);
}

int ms_cpu_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                 int64_t ldc)
{
    return sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, NULL, beta, c, ldc);
}

int ms_cpu_sgemm_bias(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                      const float *a, int64_t lda, const float *b, int64_t ldb,
                      const float *bias, float *c, int64_t ldc)
{
    return sgemm(trans_a, trans_b, m, n, k, 1.0f, a, lda, b, ldb, bias, 1.0f, c, ldc);
}
