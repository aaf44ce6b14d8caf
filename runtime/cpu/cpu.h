/* moonshard CPU backend: what the files of runtime/cpu/ share (not exported): the kernels of
 * its ops table, the strided N-d iterator and dense staging. */
#ifndef MS_CPU_H
#define MS_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "ops/backend.h"

/* Everything declared below is private to the library, not part of its ABI. */
#pragma GCC visibility push(hidden)

/* ---- the worker pool (parallel.c) ----
 * ms_parallel_for runs fn over [0, n) on `ranges` threads (the caller one of them) and
 * returns when all of it is done: [0, n) is cut into up to 4 contiguous chunks per thread,
 * which the threads claim in turn, so a worker slow to wake takes fewer. ranges < 2 (or a
 * call from inside a job, or while another thread's job runs) calls fn(ctx, 0, n). fn must
 * write disjoint outputs per call, so results never depend on the split.
 * ms_parallel_ranges picks the thread count for n units of about `work` element operations
 * in all (an add of one f32 element is 1): 1 below MS_PARALLEL_GRAIN per range. The grain
 * is the measured break-even of a split: waking a worker costs some microseconds, and
 * memory-bound loops gain little from a second thread. */
enum { MS_PARALLEL_GRAIN = 524288 };
typedef void (*ms_parallel_fn)(void *ctx, int64_t begin, int64_t end);
int ms_parallel_ranges(int64_t n, double work);
void ms_parallel_for(int64_t n, int ranges, ms_parallel_fn fn, void *ctx);
/* ms_parallel_for with the caller's asynchronous signals held until the job is done (the
 * workers hold them always): for kernels that must not have a signal handler run on their
 * thread's stack, as oneDNN's AVX-512 sgemm (sgemm.c). A held signal is delivered after. */
void ms_parallel_for_signals_held(int64_t n, int ranges, ms_parallel_fn fn, void *ctx);

/* ---- the strided N-d iterator ----
 * Visits the elements of a shape in row-major order. Every operand has its own data,
 * element size and element strides over that shape (0 where it is broadcast). Dims of size
 * 1 are dropped and dims contiguous in every operand are merged, then the inner function
 * runs once per innermost run of n elements. The visiting order never changes, so kernels
 * that accumulate (reductions, counters) see elements in the same order every time,
 * unless the caller sets any_order. */
enum { MS_ITER_MAX_OPS = 4 };

typedef struct ms_iter {
    int nops;
    int ndim;
    /* Set by element-wise callers whose result does not depend on the visiting order: the
     * iterator may then walk 2-D tiles when an input's unit stride is not in the last dim
     * (a transposed read), so both sides stay in cache. */
    int any_order;
    /* Set by callers whose kernel writes each element of operand 0 from the elements that
     * map to it alone (reductions into an accumulator, row kernels): the iterator may then
     * split the work across threads along dims where operand 0 moves, which keeps every
     * output's visiting order. any_order implies it. */
    int split_outputs;
    /* Element operations per visited element (a row kernel's row length); 1 when 0. */
    int64_t cost;
    int64_t numel;
    int64_t shape[MS_MAX_DIMS];
    int64_t strides[MS_ITER_MAX_OPS][MS_MAX_DIMS];
    char *data[MS_ITER_MAX_OPS];
    int64_t elem_size[MS_ITER_MAX_OPS];
} ms_iter;

/* ptrs[k] is operand k's first element of the run and strides[k] its inner stride. */
typedef void (*ms_iter_fn)(void *ctx, int64_t n, char *const *ptrs, const int64_t *strides);

void ms_iter_begin(ms_iter *it, int ndim, const int64_t *shape);
/* Add t broadcast (numpy rules, aligned right) to the iterator's shape; MS_ERR_SHAPE when
 * it does not broadcast. */
int ms_iter_tensor(ms_iter *it, const char *op, const char *name, const ms_tensor *t);
/* Add a raw operand; strides (elements, one per iterator dim) NULL means a single value. */
void ms_iter_raw(ms_iter *it, void *data, size_t elem_size, const int64_t *strides);
void ms_iter_run(ms_iter *it, ms_iter_fn fn, void *ctx);

/* An ms_iter_fn for runs of bf16 or f16 operands (half_run.c; ctx an ms_half_run): blocks of
 * each input converted to f32 on the stack go through the f32 loop, and operand 0, the
 * output, is rounded back once. Operands whose bit is in f32_operands are single f32 values
 * (a scalar), passed as they are. */
typedef struct ms_half_run {
    ms_iter_fn f32;
    void *ctx;
    int dtype, count;
    unsigned f32_operands;
} ms_half_run;
void ms_cpu_half_run(void *ctx, int64_t n, char *const *ptrs, const int64_t *strides);

/* ---- dense staging for ops whose loops want row-major contiguous data ----
 * ms_cpu_dense points *data at t's own elements when t is contiguous; otherwise it
 * mallocs a row-major block, fills it from t when copy_in is set, and returns the block in
 * *owned. ms_cpu_dense_done writes an owned block back into t when write_back is set and
 * frees it. */
int ms_cpu_dense(const char *op, const ms_tensor *t, int copy_in, void **data, void **owned);
void ms_cpu_dense_done(const ms_tensor *t, void *owned, int write_back);

/* Inner function copying operand 1 into operand 0 bit for bit; ctx points at a size_t
 * element size (1, 2, 4 or 8). */
void ms_cpu_copy_run(void *ctx, int64_t n, char *const *ptrs, const int64_t *strides);

/* Same-dtype strided copy of elements between two layouts of one shape. */
void ms_cpu_copy_layout(void *dst, const int64_t *dst_strides, const void *src,
                        const int64_t *src_strides, int ndim, const int64_t *shape,
                        size_t elem_size);

/* malloc that records MS_ERR_OOM for op on failure (size 0 gives a valid pointer). */
int ms_cpu_alloc(const char *op, size_t nbytes, void **ptr);

/* The calling thread's scratch of one use, at least nbytes, 64-byte aligned, kept (and
 * reused by the next call of that use on this thread) until the thread ends; its contents
 * do not survive another call with the same slot (scratch.c). Not in ms_memory_stats. */
enum { MS_SCRATCH_HALF_GEMM, MS_SCRATCH_ATTENTION, MS_SCRATCH_SLOTS };
int ms_cpu_scratch(const char *op, int slot, size_t nbytes, void **ptr);

/* Every target of rows [N, C] (logp, logits) in [0, C) or ignore_index (MS_ERR_INDEX naming
 * op otherwise); [OUT] the number that are not ignored (runtime/cpu/nll.c). */
int ms_cpu_count_targets(const char *op, const ms_tensor *logp, const ms_tensor *target,
                         int64_t ignore_index, int64_t *counted);

/* ---- the kernels of runtime/cpu/backend.c's table (ms_cpu_ops; see ops/backend.h) ---- */
int ms_cpu_copy(ms_tensor *dst, const ms_tensor *src);
int ms_cpu_fill(ms_tensor *t, double value);
int ms_cpu_arange(ms_tensor *t, double start, double step);
int ms_cpu_equal(int *equal, const ms_tensor *a, const ms_tensor *b);
int ms_cpu_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                    double atol);
int ms_cpu_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op);
int ms_cpu_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse);
int ms_cpu_unary(ms_tensor *out, const ms_tensor *a, int op);
int ms_cpu_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op);
int ms_cpu_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask,
                  const int64_t *kept_shape, int64_t count);
int ms_cpu_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim,
                   const int64_t *kept_shape);
int ms_cpu_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                  int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k);
int ms_cpu_linear(ms_tensor *out, const ms_tensor *x, const ms_tensor *weight,
                  const ms_tensor *bias, int64_t m, int64_t n, int64_t k);
/* f32 attention in blocks of query rows (attention_blocks.c), for ms_cpu_attention and its
 * backward: every matrix's rows at least a row apart, rows, keys, d and dv nonzero. */
int ms_cpu_attention_blocks(ms_tensor *out, ms_tensor *lse, const ms_tensor *q,
                            const ms_tensor *k, const ms_tensor *v, const ms_tensor *mask,
                            double scale, int causal);
int ms_cpu_attention_blocks_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv,
                                     const ms_tensor *dout, const ms_tensor *q,
                                     const ms_tensor *k, const ms_tensor *v,
                                     const ms_tensor *mask, const ms_tensor *out,
                                     const ms_tensor *lse, double scale, int causal);
/* Row-major f32 C[m, n] = alpha * op(A) op(B) + beta * C on this process's threads: with
 * AVX-512, oneDNN in pieces of C's rows or columns cut by the shape alone (so the result does
 * not depend on the thread count), else OpenBLAS (sgemm.c). Not from inside a pool job. */
int ms_cpu_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                 int64_t ldc);
/* C = op(A) op(B) + bias[n] added to every row (beta = 1 onto the bias): each GEMM piece
 * writes the bias into its own block of C just before its GEMM (with OpenBLAS, all of C
 * first). */
int ms_cpu_sgemm_bias(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                      const float *a, int64_t lda, const float *b, int64_t ldb,
                      const float *bias, float *c, int64_t ldc);
/* The same product on the calling thread alone (oneDNN, one call): for kernels whose pool
 * jobs each run their own small GEMMs, started by ms_parallel_for_signals_held. */
int ms_cpu_sgemm_serial(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                        float *c, int64_t ldc);
/* ms_cpu_matmul of bf16 and f16 tensors (matmul_half.c). */
int ms_cpu_matmul_half(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                       int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k);
int ms_cpu_softmax(ms_tensor *out, const ms_tensor *x, int dim, int kind);
int ms_cpu_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                            int kind);
int ms_cpu_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, ms_tensor *sum,
                      const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                      const ms_tensor *bias, double eps, int64_t rows, int64_t size);
int ms_cpu_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                               const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *x,
                               const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int64_t rows, int64_t size);
int ms_cpu_bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                     const ms_tensor *bias, int tanh_approx, int64_t rows, int64_t cols);
int ms_cpu_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                              const ms_tensor *derivative, int64_t rows, int64_t cols);
int ms_cpu_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices);
int ms_cpu_embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                              const ms_tensor *dout);
int ms_cpu_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                    int64_t ignore_index, int reduction);
int ms_cpu_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                             int64_t ignore_index, int reduction);
int ms_cpu_cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                        const ms_tensor *target, int64_t ignore_index, int reduction);
int ms_cpu_cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                                 const ms_tensor *logits, const ms_tensor *stats,
                                 const ms_tensor *target, int64_t ignore_index, int reduction);
int ms_cpu_attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
        const ms_tensor *v, const ms_tensor *mask, double scale, int causal);
int ms_cpu_attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv, const ms_tensor *dout,
        const ms_tensor *q, const ms_tensor *k, const ms_tensor *v, const ms_tensor *mask,
        const ms_tensor *out, const ms_tensor *lse, double scale, int causal);
int ms_cpu_rand_uniform(ms_tensor *out, double low, double high, uint64_t seed,
                        uint64_t offset);
int ms_cpu_rand_normal(ms_tensor *out, double mean, double std, uint64_t seed,
                       uint64_t offset);
int ms_cpu_dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed,
                   uint64_t offset);
int ms_cpu_dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                            uint64_t offset);
int ms_cpu_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad,
                    double lr, double momentum, double dampening, double weight_decay,
                    int nesterov, int first_step, int maximize);
int ms_cpu_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                     const ms_tensor *grad, int64_t step, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int decoupled,
                     int maximize);
int ms_cpu_adam_step_many(int count, ms_tensor *const *params, ms_tensor *const *exp_avgs,
                          ms_tensor *const *exp_avg_sqs, const ms_tensor *const *grads,
                          int64_t step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int decoupled, int maximize);

#pragma GCC visibility pop

#endif
