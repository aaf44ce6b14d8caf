/* moonshard runtime: the CPU place's kernels timed for the op profiler: while profiling is on,
 * ms_place_of hands out this table, whose slots charge their kernel's self time. */
#include "checks.h"
#include "profile.h"

#define TIMED(category, call)                    \
    do {                                         \
        ms_profile_frame frame_;                 \
        ms_profile_begin(&frame_);               \
        int status_ = (call);                    \
        ms_profile_end(&frame_, (category));     \
        return status_;                          \
    } while (0)

static const ms_ops_backend *const cpu = &ms_cpu_ops;

static int copy(ms_tensor *dst, const ms_tensor *src)
{
    TIMED(MS_PROF_COPY, cpu->copy(dst, src));
}

static int fill(ms_tensor *t, double value)
{
    TIMED(MS_PROF_COPY, cpu->fill(t, value));
}

static int arange(ms_tensor *t, double start, double step)
{
    TIMED(MS_PROF_COPY, cpu->arange(t, start, step));
}

static int equal(int *equal, const ms_tensor *a, const ms_tensor *b)
{
    TIMED(MS_PROF_COPY, cpu->equal(equal, a, b));
}

static int allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol, double atol)
{
    TIMED(MS_PROF_COPY, cpu->allclose(close, a, b, rtol, atol));
}

static int binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op)
{
    TIMED(MS_PROF_ELEMENTWISE, cpu->binary(out, a, b, op));
}

static int binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse)
{
    TIMED(MS_PROF_ELEMENTWISE, cpu->binary_scalar(out, a, s, op, reverse));
}

static int unary(ms_tensor *out, const ms_tensor *a, int op)
{
    TIMED(MS_PROF_ELEMENTWISE, cpu->unary(out, a, op));
}

static int unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op)
{
    TIMED(MS_PROF_ELEMENTWISE, cpu->unary_backward(dx, x, dy, op));
}

static int reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask,
                  const int64_t *kept_shape, int64_t count)
{
    TIMED(MS_PROF_REDUCE, cpu->reduce(out, a, op, dims_mask, kept_shape, count));
}

static int max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim,
                   const int64_t *kept_shape)
{
    TIMED(MS_PROF_REDUCE, cpu->max_dim(values, indices, a, dim, kept_shape));
}

/* A right operand with batches of its own is attention's (scores, weighted values); a 2-D
 * one is a linear layer's weight or its gradient. */
static int matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                  int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k)
{
    TIMED(b->ndim > 2 ? MS_PROF_ATTENTION : MS_PROF_GEMM,
          cpu->matmul(out, a, b, trans_a, trans_b, alpha, beta, m, n, k));
}

static int linear(ms_tensor *out, const ms_tensor *x, const ms_tensor *weight,
                  const ms_tensor *bias, int64_t m, int64_t n, int64_t k)
{
    TIMED(MS_PROF_GEMM, cpu->linear(out, x, weight, bias, m, n, k));
}

/* log_softmax belongs to the loss, softmax to attention. */
static int softmax(ms_tensor *out, const ms_tensor *x, int dim, int log)
{
    TIMED(log ? MS_PROF_SOFTMAX_LOSS : MS_PROF_ATTENTION, cpu->softmax(out, x, dim, log));
}

static int softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                            int log)
{
    TIMED(log ? MS_PROF_SOFTMAX_LOSS : MS_PROF_ATTENTION,
          cpu->softmax_backward(dx, y, dy, dim, log));
}

static int layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, ms_tensor *sum,
                      const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                      const ms_tensor *bias, double eps, int64_t rows, int64_t size)
{
    TIMED(MS_PROF_LAYER_NORM, cpu->layer_norm(out, mean, rstd, sum, x, residual, weight, bias,
                                              eps, rows, size));
}

static int layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                               const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *x,
                               const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int64_t rows, int64_t size)
{
    TIMED(MS_PROF_LAYER_NORM, cpu->layer_norm_backward(dx, dweight, dbias, dy, dsum, x, mean,
                                                       rstd, weight, rows, size));
}

static int bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                     const ms_tensor *bias, int tanh_approx, int64_t rows, int64_t cols)
{
    TIMED(MS_PROF_ELEMENTWISE,
          cpu->bias_gelu(y, derivative, acc, bias, tanh_approx, rows, cols));
}

static int bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                              const ms_tensor *derivative, int64_t rows, int64_t cols)
{
    TIMED(MS_PROF_ELEMENTWISE, cpu->bias_gelu_backward(dacc, dbias, dy, derivative, rows, cols));
}

static int embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices)
{
    TIMED(MS_PROF_EMBEDDING, cpu->embedding(out, weight, indices));
}

static int embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                              const ms_tensor *dout)
{
    TIMED(MS_PROF_EMBEDDING, cpu->embedding_backward(dweight, indices, dout));
}

static int nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                    int64_t ignore_index, int reduction)
{
    TIMED(MS_PROF_SOFTMAX_LOSS, cpu->nll_loss(out, logp, target, ignore_index, reduction));
}

static int nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                             int64_t ignore_index, int reduction)
{
    TIMED(MS_PROF_SOFTMAX_LOSS,
          cpu->nll_loss_backward(dlogp, dout, target, ignore_index, reduction));
}

static int cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                         const ms_tensor *target, int64_t ignore_index, int reduction)
{
    TIMED(MS_PROF_SOFTMAX_LOSS,
          cpu->cross_entropy(out, stats, logits, target, ignore_index, reduction));
}

static int cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                                  const ms_tensor *logits, const ms_tensor *stats,
                                  const ms_tensor *target, int64_t ignore_index, int reduction)
{
    TIMED(MS_PROF_SOFTMAX_LOSS, cpu->cross_entropy_backward(dlogits, dout, logits, stats, target,
                                                            ignore_index, reduction));
}

static int attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
                     const ms_tensor *v, const ms_tensor *mask, double scale, int causal)
{
    TIMED(MS_PROF_ATTENTION, cpu->attention(out, lse, q, k, v, mask, scale, causal));
}

static int attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv, const ms_tensor *dout,
                              const ms_tensor *q, const ms_tensor *k, const ms_tensor *v,
                              const ms_tensor *mask, const ms_tensor *out, const ms_tensor *lse,
                              double scale, int causal)
{
    TIMED(MS_PROF_ATTENTION, cpu->attention_backward(dq, dk, dv, dout, q, k, v, mask, out, lse,
                                                     scale, causal));
}

static int rand_uniform(ms_tensor *out, double low, double high, uint64_t seed, uint64_t offset)
{
    TIMED(MS_PROF_RANDOM, cpu->rand_uniform(out, low, high, seed, offset));
}

static int rand_normal(ms_tensor *out, double mean, double std, uint64_t seed, uint64_t offset)
{
    TIMED(MS_PROF_RANDOM, cpu->rand_normal(out, mean, std, seed, offset));
}

static int dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed, uint64_t offset)
{
    TIMED(MS_PROF_RANDOM, cpu->dropout(out, x, p, seed, offset));
}

static int dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                            uint64_t offset)
{
    TIMED(MS_PROF_RANDOM, cpu->dropout_backward(dx, dy, p, seed, offset));
}

static int sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad, double lr,
                    double momentum, double dampening, double weight_decay, int nesterov,
                    int first_step, int maximize)
{
    TIMED(MS_PROF_OPTIMIZER, cpu->sgd_step(param, momentum_buf, grad, lr, momentum, dampening,
                                           weight_decay, nesterov, first_step, maximize));
}

static int adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                     const ms_tensor *grad, int64_t step, double lr, double beta1, double beta2,
                     double eps, double weight_decay, int decoupled, int maximize)
{
    TIMED(MS_PROF_OPTIMIZER, cpu->adam_step(param, exp_avg, exp_avg_sq, grad, step, lr, beta1,
                                            beta2, eps, weight_decay, decoupled, maximize));
}

static int adam_step_many(int count, ms_tensor *const *params, ms_tensor *const *exp_avgs,
                          ms_tensor *const *exp_avg_sqs, const ms_tensor *const *grads,
                          int64_t step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int decoupled, int maximize)
{
    TIMED(MS_PROF_OPTIMIZER,
          cpu->adam_step_many(count, params, exp_avgs, exp_avg_sqs, grads, step, lr, beta1,
                              beta2, eps, weight_decay, decoupled, maximize));
}

ms_ops_backend ms_profiled_cpu_ops;

/* The CPU table with each kernel above in place of the CPU's own; a slot without a timed
 * kernel here keeps the CPU's (untimed, never NULL). */
__attribute__((constructor)) static void build_table(void)
{
    ms_profiled_cpu_ops = ms_cpu_ops;
    ms_profiled_cpu_ops.copy = copy;
    ms_profiled_cpu_ops.fill = fill;
    ms_profiled_cpu_ops.arange = arange;
    ms_profiled_cpu_ops.equal = equal;
    ms_profiled_cpu_ops.allclose = allclose;
    ms_profiled_cpu_ops.binary = binary;
    ms_profiled_cpu_ops.binary_scalar = binary_scalar;
    ms_profiled_cpu_ops.unary = unary;
    ms_profiled_cpu_ops.unary_backward = unary_backward;
    ms_profiled_cpu_ops.reduce = reduce;
    ms_profiled_cpu_ops.max_dim = max_dim;
    ms_profiled_cpu_ops.matmul = matmul;
    ms_profiled_cpu_ops.linear = linear;
    ms_profiled_cpu_ops.softmax = softmax;
    ms_profiled_cpu_ops.softmax_backward = softmax_backward;
    ms_profiled_cpu_ops.layer_norm = layer_norm;
    ms_profiled_cpu_ops.layer_norm_backward = layer_norm_backward;
    ms_profiled_cpu_ops.bias_gelu = bias_gelu;
    ms_profiled_cpu_ops.bias_gelu_backward = bias_gelu_backward;
    ms_profiled_cpu_ops.embedding = embedding;
    ms_profiled_cpu_ops.embedding_backward = embedding_backward;
    ms_profiled_cpu_ops.nll_loss = nll_loss;
    ms_profiled_cpu_ops.nll_loss_backward = nll_loss_backward;
    ms_profiled_cpu_ops.cross_entropy = cross_entropy;
    ms_profiled_cpu_ops.cross_entropy_backward = cross_entropy_backward;
    ms_profiled_cpu_ops.attention = attention;
    ms_profiled_cpu_ops.attention_backward = attention_backward;
    ms_profiled_cpu_ops.rand_uniform = rand_uniform;
    ms_profiled_cpu_ops.rand_normal = rand_normal;
    ms_profiled_cpu_ops.dropout = dropout;
    ms_profiled_cpu_ops.dropout_backward = dropout_backward;
    ms_profiled_cpu_ops.sgd_step = sgd_step;
    ms_profiled_cpu_ops.adam_step = adam_step;
    ms_profiled_cpu_ops.adam_step_many = adam_step_many;
}
