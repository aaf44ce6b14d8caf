/* moonshard runtime: the op backend interface (not part of the FFI). A backend is one table
 * of kernels per place (cpu, cuda); runtime/ops/ checks every argument and then calls it. */
#ifndef MS_OPS_BACKEND_H
#define MS_OPS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* The kernels of one place. Each has the contract of its ms_* entry point in ops.h, called
 * with arguments already checked there: every tensor lives on this place (one device), with
 * the dtypes and shapes the entry point documents; values computed by the checks come as
 * extra arguments. Only data-dependent checks (index and target values) remain to the
 * kernel. Each returns an int status recorded with MS_FAIL. Slots marked OPTIONAL may be
 * NULL. */
/* Families of kernels that read and write bf16 and f16 themselves (computing in f32, one
 * rounding at the store); for the others runtime/ops/widen.c passes f32 copies of 16-bit
 * operands and rounds the outputs on the way back. matmul always takes 16-bit. */
enum {
    MS_HALF_ELEMENTWISE = 1u << 0, /* binary, binary_scalar, unary, unary_backward */
    MS_HALF_REDUCE = 1u << 1,      /* reduce, max_dim */
    MS_HALF_SOFTMAX = 1u << 2,     /* softmax, softmax_backward */
    MS_HALF_LAYER_NORM = 1u << 3,
    MS_HALF_EMBEDDING = 1u << 4,
    MS_HALF_NLL = 1u << 5,
    MS_HALF_RANDOM = 1u << 6,      /* rand_uniform, rand_normal, dropout(_backward) */
    MS_HALF_OPTIM = 1u << 7,
    MS_HALF_ATTENTION = 1u << 8,   /* attention, attention_backward */
    MS_HALF_CROSS_ENTROPY = 1u << 9,
    MS_HALF_BIAS_GELU = 1u << 10,  /* bias_gelu, bias_gelu_backward */
};

typedef struct ms_ops_backend {
    const char *name;   /* "cpu", "cuda" */
    int device_tensors; /* 1: tensors live in cuda:N pools; 0: in the cpu and host pools */
    unsigned half_native; /* MS_HALF_* of the families that take 16-bit tensors */

    /* OPTIONAL: make device current on this thread (before an op's first operand). */
    int (*use_device)(int device);
    /* OPTIONAL: order the op after pending work that writes t's bytes (collectives). */
    int (*await)(const ms_tensor *t);

    /* src broadcasts to dst, or has dst's numel and is read in row-major order. */
    int (*copy)(ms_tensor *dst, const ms_tensor *src);
    int (*fill)(ms_tensor *t, double value);
    int (*arange)(ms_tensor *t, double start, double step);
    /* a and b have the same dtype and shape. */
    int (*equal)(int *equal, const ms_tensor *a, const ms_tensor *b);
    /* a and b have the same shape. */
    int (*allclose)(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                    double atol);

    /* The broadcast of a and b to out is checked by the kernel where it maps them. */
    int (*binary)(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op);
    int (*binary_scalar)(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse);
    int (*unary)(ms_tensor *out, const ms_tensor *a, int op);
    int (*unary_backward)(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op);

    /* kept_shape: a's shape with the reduced dims 1; count: elements reduced into each. */
    int (*reduce)(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask,
                  const int64_t *kept_shape, int64_t count);
    /* kept_shape: a's shape with dim 1. */
    int (*max_dim)(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim,
                   const int64_t *kept_shape);

    /* op(a) is [m, k], op(b) [k, n] (m, n, k fit an int); trans_* are 0 or 1; out shares
     * no bytes with a or b; any float dtype, f32 accumulation for bf16 and f16. */
    int (*matmul)(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                  int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k);
    /* OPTIONAL (NULL: the op layer copies the broadcast bias into out, then matmul with
     * beta = 1): out[m, n] = x @ weight^T + bias, checked 2-D operands,
     * bias NULL or [n]. */
    int (*linear)(ms_tensor *out, const ms_tensor *x, const ms_tensor *weight,
                  const ms_tensor *bias, int64_t m, int64_t n, int64_t k);

    int (*softmax)(ms_tensor *out, const ms_tensor *x, int dim, int log);
    int (*softmax_backward)(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                            int log);

    /* rows and size of the normalised rows. residual and sum are NULL for ms_layer_norm;
     * with them (ms_add_layer_norm) sum = x + residual is written and normalised. dsum is
     * NULL for ms_layer_norm_backward; with it dx gets dsum added (x is then the sum). */
    int (*layer_norm)(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, ms_tensor *sum,
                      const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                      const ms_tensor *bias, double eps, int64_t rows, int64_t size);
    int (*layer_norm_backward)(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                               const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *x,
                               const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int64_t rows, int64_t size);

    /* acc, y, derivative, dacc and dy are [rows, cols] (any strides), bias and dbias [cols];
     * derivative may be NULL in the forward and has acc's dtype (the f32 one of a 16-bit op);
     * tanh_approx is 0 or 1. dbias is assigned. */
    int (*bias_gelu)(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                     const ms_tensor *bias, int tanh_approx, int64_t rows, int64_t cols);
    int (*bias_gelu_backward)(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                              const ms_tensor *derivative, int64_t rows, int64_t cols);

    int (*embedding)(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices);
    int (*embedding_backward)(ms_tensor *dweight, const ms_tensor *indices,
                              const ms_tensor *dout);
    int (*nll_loss)(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                    int64_t ignore_index, int reduction);
    int (*nll_loss_backward)(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                             int64_t ignore_index, int reduction);

    /* logits [N, C], target [N], stats [N, 2] and out are checked as in ops.h. */
    int (*cross_entropy)(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                         const ms_tensor *target, int64_t ignore_index, int reduction);
    int (*cross_entropy_backward)(ms_tensor *dlogits, const ms_tensor *dout,
                                  const ms_tensor *logits, const ms_tensor *stats,
                                  const ms_tensor *target, int64_t ignore_index,
                                  int reduction);

    /* Shapes, dtypes and strides checked as in ops.h; mask may be NULL. */
    int (*attention)(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
                     const ms_tensor *v, const ms_tensor *mask, double scale, int causal);
    int (*attention_backward)(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv,
                              const ms_tensor *dout, const ms_tensor *q, const ms_tensor *k,
                              const ms_tensor *v, const ms_tensor *mask, const ms_tensor *out,
                              const ms_tensor *lse, double scale, int causal);

    int (*rand_uniform)(ms_tensor *out, double low, double high, uint64_t seed,
                        uint64_t offset);
    int (*rand_normal)(ms_tensor *out, double mean, double std, uint64_t seed,
                       uint64_t offset);
    int (*dropout)(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed,
                   uint64_t offset);
    int (*dropout_backward)(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                            uint64_t offset);

    /* momentum_buf is NULL when momentum == 0. */
    int (*sgd_step)(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad,
                    double lr, double momentum, double dampening, double weight_decay,
                    int nesterov, int first_step, int maximize);
    int (*adam_step)(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                     const ms_tensor *grad, int64_t step, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int decoupled,
                     int maximize);
    /* OPTIONAL (NULL: the op layer steps each parameter through adam_step): count checked
     * parameters, all dense, of one dtype (f32 or f64), with dense state of theirs. */
    int (*adam_step_many)(int count, ms_tensor *const *params, ms_tensor *const *exp_avgs,
                          ms_tensor *const *exp_avg_sqs, const ms_tensor *const *grads,
                          int64_t step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int decoupled, int maximize);

    /* OPTIONAL (NULL on the CPU): nbytes between host memory and device memory, and between
     * two devices, finished before returning. */
    int (*to_device)(int device, void *dst, const void *src, size_t nbytes);
    int (*to_host)(int device, void *dst, const void *src, size_t nbytes);
    int (*between_devices)(void *dst, int dst_device, const void *src, int src_device,
                           size_t nbytes);
} ms_ops_backend;

/* The device side of a CUDA build: libmoonshard_cuda.so, loaded by runtime/device.c on the
 * first use of a device, exports MS_DEVICE_BACKEND_SYMBOL, this table. Its functions carry
 * out those of cuda/gpu.h and pool.h of the same meaning. */
#define MS_DEVICE_BACKEND_SYMBOL "ms_cuda_backend"
enum { MS_DEVICE_BACKEND_ABI = 1 };
typedef struct ms_device_backend {
    int abi;                   /* MS_DEVICE_BACKEND_ABI of the build that made it */
    const char *version;       /* MS_VERSION of that build */
    const ms_ops_backend *ops; /* the table of the cuda:N pools */
    int (*device_count)(int *count);
    const char *(*unavailable_reason)(void); /* probes the devices */
    int (*pool_available)(int device);
    const char *(*pool_unavailable_reason)(void);
    int (*synchronize)(int device);
    void *(*device_alloc)(int device, size_t rounded);
    void (*device_free)(int device, void *p);
    void *(*host_alloc)(size_t rounded);
    void (*host_free)(void *p);
    int (*nccl_init)(void); /* NULL without NCCL */
    int (*nccl_finalize)(void);
} ms_device_backend;

#pragma GCC visibility push(hidden)

/* The CPU's table (runtime/cpu/backend.c), and the device's (runtime/cuda/backend.c), in the
 * backend library. */
extern const ms_ops_backend ms_cpu_ops;
extern const ms_ops_backend ms_cuda_ops;
/* The CPU table with its kernels timed (runtime/ops/profile.c, built at load), used while
 * profiling. */
extern ms_ops_backend ms_profiled_cpu_ops;

/* The device ops table once runtime/device.c has loaded the device side, else NULL (no
 * tensor can live in a cuda:N pool before that). */
const ms_ops_backend *ms_device_ops(void);

#pragma GCC visibility pop

#endif
