/* moonshard CUDA backend: the op entry points of ops.h for tensors in cuda pools. The CPU
 * entry points (runtime/cpu/) forward here when their first tensor lives on a device, so
 * callers use one API; each has the signature and contract of its ms_* counterpart. */
#ifndef MS_CUDA_DISPATCH_H
#define MS_CUDA_DISPATCH_H

#include "ms.h"

#pragma GCC visibility push(hidden)

/* 1 when t lives in a cuda pool. */
static inline int ms_on_device(const ms_tensor *t)
{
    return t && t->storage && t->storage->pool >= MS_POOL_CUDA0;
}

/* ---- operand checks ("op: name ...") ----
 * t lives on a cuda pool with live storage; *device (when >= 0 on entry) must match, and
 * the first operand makes its device current. The CPU backend's shared op checks reach
 * these through ms_place_input / ms_place_output (cpu/cpu.h). */
int ms_cuda_input(const char *op, const char *name, const ms_tensor *t, int *device);
/* As ms_cuda_input, and t can be written (no zero strides over size > 1). */
int ms_cuda_output(const char *op, const char *name, const ms_tensor *t, int *device);

int ms_cuda_copy(ms_tensor *dst, const ms_tensor *src);
int ms_cuda_fill(ms_tensor *t, double value);
int ms_cuda_arange(ms_tensor *t, double start, double step);
int ms_cuda_equal(int *equal, const ms_tensor *a, const ms_tensor *b);
int ms_cuda_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                     double atol);
int ms_cuda_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op);
int ms_cuda_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse);
int ms_cuda_unary(ms_tensor *out, const ms_tensor *a, int op);
int ms_cuda_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op);
int ms_cuda_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask);
int ms_cuda_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim);
int ms_cuda_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                   int trans_b, double alpha, double beta);
int ms_cuda_softmax(ms_tensor *out, const ms_tensor *x, int dim, int log);
int ms_cuda_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                             int log);
int ms_cuda_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, const ms_tensor *x,
                       const ms_tensor *weight, const ms_tensor *bias, int normalized_ndim,
                       double eps);
int ms_cuda_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                                const ms_tensor *dy, const ms_tensor *x, const ms_tensor *mean,
                                const ms_tensor *rstd, const ms_tensor *weight,
                                int normalized_ndim);
int ms_cuda_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices);
int ms_cuda_embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                               const ms_tensor *dout);
int ms_cuda_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                     int64_t ignore_index, int reduction);
int ms_cuda_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                              int64_t ignore_index, int reduction);
int ms_cuda_rand_uniform(ms_tensor *out, double low, double high, uint64_t seed,
                         uint64_t offset);
int ms_cuda_rand_normal(ms_tensor *out, double mean, double std, uint64_t seed,
                        uint64_t offset);
int ms_cuda_dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed,
                    uint64_t offset);
int ms_cuda_dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                             uint64_t offset);
int ms_cuda_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad,
                     double lr, double momentum, double dampening, double weight_decay,
                     int nesterov, int first_step, int maximize);
int ms_cuda_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                      const ms_tensor *grad, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int decoupled,
                      int maximize);

#pragma GCC visibility pop

#endif
