/* moonshard runtime: tensor operations (front door in runtime/ops/, kernels in cpu/, cuda/).
 * Argument order is fixed: outputs first ([OUT]), then inputs, then scalars.
 * Outputs are preallocated by the caller with the documented shape and dtype.
 * Activation gradients assign (=); parameter gradients (dweight, dbias) accumulate (+=).
 * Compute ops take f32, f64, bf16 or f16 (MS_ERR_DTYPE otherwise, naming the op and dtype);
 * bf16 and f16 compute in f32 and each output is rounded once, when it is stored;
 * ms_copy, ms_fill, ms_arange and ms_equal take every dtype, ms_allclose any pair, and
 * ms_binary(_scalar) also i32/i64 (all ops but div and pow). An output may alias an input
 * only when both have the same geometry (element-wise in-place updates). */
#ifndef MS_OPS_H
#define MS_OPS_H

#include <stdint.h>
#include "ms.h"

/* ffi-begin */
/* ---- copy, fill, compare ---- */
/* dst = src, broadcasting src to dst's shape, converting dtype, any strides. A src that
 * does not broadcast but has dst's numel is copied in row-major order (a reshaping copy). */
int ms_copy(ms_tensor *dst, const ms_tensor *src);
/* Every element of t = value (converted to t's dtype). */
int ms_fill(ms_tensor *t, double value);
/* t[i] = start + i * step over t's elements in row-major order. */
int ms_arange(ms_tensor *t, double start, double step);
/* [OUT] *equal = 1 when shapes, dtypes and every bit of every element match. */
int ms_equal(int *equal, const ms_tensor *a, const ms_tensor *b);
/* [OUT] *close = 1 when shapes match and |a-b| <= atol + rtol*|b| everywhere (NaN never). */
int ms_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol, double atol);

/* ---- element-wise ---- */
typedef enum ms_binary_op {
    MS_ADD = 0, MS_SUB = 1, MS_MUL = 2, MS_DIV = 3, MS_MAXIMUM = 4, MS_MINIMUM = 5,
    MS_POW = 6, MS_EQ = 7, MS_NE = 8, MS_LT = 9, MS_LE = 10, MS_GT = 11, MS_GE = 12
} ms_binary_op;
/* out = a op b with numpy broadcasting of a and b to out's shape. Comparisons give 1 or 0
 * in out's dtype. All three share one dtype. */
int ms_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op);
/* out = a op s. With reverse != 0, out = s op a. */
int ms_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse);

typedef enum ms_unary_op {
    MS_NEG = 0, MS_EXP = 1, MS_LOG = 2, MS_SQRT = 3, MS_RSQRT = 4, MS_ABS = 5,
    MS_TANH = 6, MS_SIGMOID = 7, MS_RELU = 8, MS_GELU = 9, MS_GELU_TANH = 10,
    MS_SIN = 11, MS_COS = 12, MS_SIGN = 13, MS_RECIPROCAL = 14, MS_SQUARE = 15
} ms_unary_op;
/* out = f(a); same shape and dtype. */
int ms_unary(ms_tensor *out, const ms_tensor *a, int op);
/* dx = dy * f'(x) for MS_RELU, MS_GELU, MS_GELU_TANH, MS_TANH, MS_SIGMOID (x is the
 * input of the forward op). Same shapes and dtype. */
int ms_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op);

/* ---- reductions ---- */
typedef enum ms_reduce_op {
    MS_SUM = 0, MS_MEAN = 1, MS_MAX = 2, MS_MIN = 3, MS_SUMSQ = 4
} ms_reduce_op;
/* Reduce a over every dim d with bit d set in dims_mask. out has a's ndim with the
 * reduced dims of size 1. Sums accumulate in double in a fixed order (deterministic). */
int ms_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask);
/* Maximum along dim: values and i64 indices have a's shape with dim of size 1. The first
 * maximum wins on ties. */
int ms_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim);

/* ---- matrix multiply (f32: oneDNN, f64: OpenBLAS) ----
 * out = alpha * op(a) @ op(b) + beta * out, op = transpose when trans_* != 0 (the last two
 * dims). 2-D, or batched: a, b and out with equal leading dims, or b 2-D and shared by every
 * batch of a. Any strides: a matrix with a unit stride in either of its last two dims goes
 * to BLAS directly, any other is copied first. */
int ms_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
              int trans_b, double alpha, double beta);
/* A linear layer's product: out[m, n] = x[m, k] @ weight[n, k]^T + bias[n] (bias NULL: none),
 * 2-D operands of one float dtype, bias 1-D. The bias is written into out and the GEMM
 * accumulates onto it; on the CPU each GEMM piece writes its own block of the bias just before
 * its GEMM, so the block is still in cache (the same bits as ms_copy of the broadcast bias,
 * then ms_matmul with beta = 1). */
int ms_linear(ms_tensor *out, const ms_tensor *x, const ms_tensor *weight,
              const ms_tensor *bias);

/* ---- softmax family ---- */
/* What ms_softmax computes along dim: softmax, log_softmax, or softmax whose rows of -inf
 * only give 0 instead of softmax's 0/0 = NaN (attention over a fully masked query row, as
 * PyTorch's scaled_dot_product_attention; the backward is softmax's, 0 on such rows). */
enum { MS_SOFTMAX = 0, MS_LOG_SOFTMAX = 1, MS_SAFE_SOFTMAX = 2 };
/* out = softmax(x) along dim, by kind (an MS_*SOFTMAX). */
int ms_softmax(ms_tensor *out, const ms_tensor *x, int dim, int kind);
/* dx from the forward output y and dy: softmax (and safe) dx = y*(dy - sum(dy*y));
 * log_softmax dx = dy - exp(y)*sum(dy). */
int ms_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                        int kind);

/* ---- layer norm over the last normalized_ndim dims ----
 * mean and rstd are [OUT] f32/f64 tensors with numel = rows (x.numel / row size).
 * weight and bias may be NULL (no affine). */
int ms_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, const ms_tensor *x,
                  const ms_tensor *weight, const ms_tensor *bias, int normalized_ndim,
                  double eps);
/* dx assigned; dweight and dbias (NULL to skip) accumulate. */
int ms_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                           const ms_tensor *dy, const ms_tensor *x, const ms_tensor *mean,
                           const ms_tensor *rstd, const ms_tensor *weight,
                           int normalized_ndim);

/* ---- residual add fused with layer norm ----
 * sum [OUT] = x + residual (all three of x's shape and dtype), then out, mean and rstd as
 * ms_layer_norm of sum, in one pass over each row. */
int ms_add_layer_norm(ms_tensor *sum, ms_tensor *out, ms_tensor *mean, ms_tensor *rstd,
                      const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                      const ms_tensor *bias, int normalized_ndim, double eps);
/* As ms_layer_norm_backward of sum (the forward's), with dsum (the gradient reaching sum
 * directly, NULL for none) added to dx in the same pass: dx is the gradient of both x and
 * residual. */
int ms_add_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                               const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *sum,
                               const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int normalized_ndim);

/* ---- bias and GELU fused, after a bias-free GEMM ----
 * acc [..., C] (x W^T without the bias), bias [C], y [OUT] of acc's shape; all one float
 * dtype. y = gelu(acc + bias); tanh_approx 0 (exact, erf) or 1 (approximate='tanh').
 * derivative [OUT] (NULL: not made) = gelu'(acc + bias), of acc's shape in the dtype the
 * math runs in (f64 for f64, else f32): what the backward needs, made in the same pass. */
int ms_bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                 const ms_tensor *bias, int tanh_approx);
/* dacc (assigned, dy's shape and dtype) = dy * derivative (ms_bias_gelu's); dbias (assigned,
 * [C], dy's dtype) = dacc summed over the rows, in the same pass. */
int ms_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                          const ms_tensor *derivative);

/* ---- embedding ----
 * out[..., :] = weight[indices[...], :]; indices i32 or i64; weight [num, dim];
 * out has indices' shape + [dim]. An index outside [0, num) gives MS_ERR_INDEX. */
int ms_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices);
/* dweight[indices[...], :] += dout[..., :] (sequential, deterministic). */
int ms_embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                          const ms_tensor *dout);

/* ---- negative log likelihood over log-probabilities ----
 * logp [N, C]; target [N] (i32/i64). reduction 0: out [N]; 1 (mean over non-ignored
 * targets) and 2 (sum): out is 0-dim. Targets equal to ignore_index contribute 0. A target
 * outside [0, C) that is not ignore_index gives MS_ERR_INDEX. */
int ms_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                int64_t ignore_index, int reduction);
/* dlogp assigned from dout (shape of the forward out). */
int ms_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                         int64_t ignore_index, int reduction);

/* ---- cross-entropy fused with its log_softmax ----
 * logits [N, C]; target and reduction as in ms_nll_loss (out [N] or 0-dim). stats [OUT]
 * [N, 2] in logits' dtype: each row's maximum and log(sum(exp(x - max))), kept for the
 * backward. No [N, C] log-probabilities are written; the numbers are those of ms_softmax
 * (log) followed by ms_nll_loss on the CPU, bit for bit. */
int ms_cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                     const ms_tensor *target, int64_t ignore_index, int reduction);
/* dlogits assigned: (softmax(logits) - onehot(target)) times dout's share of each row (0 for
 * ignored rows), from the forward's stats. */
int ms_cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                              const ms_tensor *logits, const ms_tensor *stats,
                              const ms_tensor *target, int64_t ignore_index, int reduction);

/* ---- attention, flash-style ----
 * out = softmax(scale * q k^T + mask) v, a query row at a time over tiles of keys with a
 * running max and sum: the [L, S] scores are never held. q [..., L, D], k [..., S, D],
 * v [..., S, Dv], out [..., L, Dv] with 0 to 2 equal leading dims, each with a unit stride in
 * its last dim; mask NULL or [..., L, S] (any strides, 0 to broadcast) of q's dtype, added
 * to the scores; causal != 0 leaves out keys j > i. lse [OUT] [..., L] (q's dtype, unit
 * last stride): each row's log-sum-exp of the scores, for the backward. A row whose keys are
 * all masked gives NaN, as softmax does. */
int ms_attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
                 const ms_tensor *v, const ms_tensor *mask, double scale, int causal);
/* dq, dk, dv assigned (shapes of q, k, v; unit last strides) from dout and the forward's out
 * and lse; the scores are recomputed tile by tile. The mask gets no gradient. */
int ms_attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv, const ms_tensor *dout,
                          const ms_tensor *q, const ms_tensor *k, const ms_tensor *v,
                          const ms_tensor *mask, const ms_tensor *out, const ms_tensor *lse,
                          double scale, int causal);

/* ---- counter-based random numbers ----
 * Element i (row-major) of out uses the counter (seed, offset + i): the same seed and
 * offset always give the same values, so a region can be replayed. */
int ms_rand_uniform(ms_tensor *out, double low, double high, uint64_t seed, uint64_t offset);
int ms_rand_normal(ms_tensor *out, double mean, double std, uint64_t seed, uint64_t offset);
/* Inverted dropout: element i is kept with probability 1-p and scaled by 1/(1-p);
 * the mask comes from the counter (seed, offset + i) and is regenerated in backward. */
int ms_dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed, uint64_t offset);
int ms_dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                        uint64_t offset);

/* ---- fused optimizer steps (PyTorch's update formulas), in place on param ---- */
/* SGD: g = (maximize ? -grad : grad) + weight_decay * param; with momentum, buf = g on the
 * first step, else buf = momentum*buf + (1-dampening)*g; g = nesterov ? g + momentum*buf : buf;
 * param -= lr * g. momentum_buf may be NULL when momentum == 0. */
int ms_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad, double lr,
                double momentum, double dampening, double weight_decay, int nesterov,
                int first_step, int maximize);
/* Adam (decoupled == 0: weight decay added to the gradient) and AdamW (decoupled != 0:
 * param *= 1 - lr*weight_decay); maximize negates grad first. step is the 1-based step
 * count after increment. */
int ms_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                 const ms_tensor *grad, int64_t step, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int decoupled, int maximize);
/* ms_adam_step on count parameters at once (params[i] with exp_avgs[i], exp_avg_sqs[i] and
 * grads[i]), all at the same step and hyperparameters on one place: the same numbers as count
 * calls, with dense f32 or f64 parameters of one dtype stepped in one pass split across
 * threads (one wake of the CPU workers instead of one per parameter). */
int ms_adam_step_many(int count, ms_tensor *const *params, ms_tensor *const *exp_avgs,
                      ms_tensor *const *exp_avg_sqs, const ms_tensor *const *grads, int64_t step,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      int decoupled, int maximize);
/* ---- op profiler ----
 * While enabled, every op of the CPU place and every allocation adds its self time (its time
 * less that of the ops and allocations inside it) and one call to a category: by op kind, or
 * to the scope a caller set. Off, an op pays one branch. Device ops are not timed. */
typedef enum ms_profile_category {
    MS_PROF_GEMM = 0,        /* matmul with a 2-D right operand (linear layers) */
    MS_PROF_ATTENTION = 1,   /* batched matmul (both operands batched), softmax (not log) */
    MS_PROF_LAYER_NORM = 2,
    MS_PROF_ELEMENTWISE = 3, /* binary, unary (activations), bias_gelu and their backward */
    MS_PROF_SOFTMAX_LOSS = 4, /* log_softmax, nll_loss, cross_entropy */
    MS_PROF_OPTIMIZER = 5,
    MS_PROF_EMBEDDING = 6,
    MS_PROF_REDUCE = 7,
    MS_PROF_COPY = 8,        /* copy, fill, arange, equal, allclose */
    MS_PROF_RANDOM = 9,      /* rand_uniform, rand_normal, dropout */
    MS_PROF_ALLOCATOR = 10,  /* ms_pool_alloc and ms_pool_free */
    MS_PROF_CATEGORIES = 11
} ms_profile_category;
/* on != 0 zeroes the counters, clears the scope and starts charging; 0 stops. */
int ms_profile_enable(int on);
/* Charge ops (not allocations) to category from now on (-1: each to its kind); returns the
 * previous scope. */
int ms_profile_scope(int category);
/* [OUT] ns[c], count[c] for the first n categories. */
int ms_profile_read(uint64_t *ns, uint64_t *count, int n);
/* ffi-end */

#endif
