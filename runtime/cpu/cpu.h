/* moonshard CPU backend: helpers shared by the op files in runtime/cpu/ (not exported).
 * Argument checks with uniform messages (each op's also run by runtime/cuda/), the strided
 * N-d iterator and dense staging. */
#ifndef MS_CPU_H
#define MS_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* ---- the CUDA backend ----
 * An op whose first tensor (for ms_copy: either tensor) lives in a cuda pool runs in
 * runtime/cuda/ instead. Without CUDA no tensor can live there and the hooks are empty. */
#ifdef MS_WITH_CUDA
#include "cuda/dispatch.h"
#define MS_CPU_ON_DEVICE(t, call)       \
    do {                                \
        if (ms_on_device(t))            \
            return (call);              \
    } while (0)
#define MS_CPU_ON_DEVICE2(a, b, call)                 \
    do {                                              \
        if (ms_on_device(a) || ms_on_device(b))       \
            return (call);                            \
    } while (0)
#else
#define MS_CPU_ON_DEVICE(t, call) do { } while (0)
#define MS_CPU_ON_DEVICE2(a, b, call) do { } while (0)
#endif

/* Everything declared below is private to the library, not part of its ABI. */
#pragma GCC visibility push(hidden)

/* ---- argument checks: each records "op: ..." and returns the status ---- */

/* A readable tensor on a CPU pool: non-NULL, known dtype, ndim in range, live storage. */
int ms_cpu_input(const char *op, const char *name, const ms_tensor *t);
/* An input that is also written: as ms_cpu_input, and no two elements share memory
 * through a zero stride (an expanded view cannot be written). */
int ms_cpu_output(const char *op, const char *name, const ms_tensor *t);
/* t's dtype is f32 or f64. */
int ms_cpu_float(const char *op, const char *name, const ms_tensor *t);
int ms_cpu_same_dtype(const char *op, const char *name_a, const ms_tensor *a,
                      const char *name_b, const ms_tensor *b);
int ms_cpu_same_shape(const char *op, const char *name_a, const ms_tensor *a,
                      const char *name_b, const ms_tensor *b);
/* 1 when a and b have the same shape (a predicate: records nothing). */
int ms_cpu_shapes_match(const ms_tensor *a, const ms_tensor *b);
/* 1 when src broadcasts to dst's shape (numpy rules, aligned right; records nothing). */
int ms_cpu_broadcasts(const ms_tensor *src, const ms_tensor *dst);
/* t has exactly the shape (ndim, shape). */
int ms_cpu_shape_is(const char *op, const char *name, const ms_tensor *t, int ndim,
                    const int64_t *shape);
/* dim in [0, t->ndim) (0 also accepted for a 0-dim tensor). */
int ms_cpu_dim(const char *op, const ms_tensor *t, int dim);

/* ---- where an op's tensors live ----
 * The argument checks of an op are written once, in its runtime/cpu/ file, and run by both
 * backends: the residency of each tensor is checked through the place the call runs on,
 * the CPU pools (ms_cpu_input / ms_cpu_output) or one cuda device (ms_cuda_input /
 * ms_cuda_output, which also make that device current). */
typedef struct ms_place {
    int on_device; /* 0: cpu and host pools; 1: cuda pools */
    int device;    /* on a device: the operands' device once the first is checked, else -1 */
} ms_place;

#define MS_PLACE_CPU ((ms_place){0, -1})
#define MS_PLACE_CUDA ((ms_place){1, -1})

int ms_place_input(ms_place *place, const char *op, const char *name, const ms_tensor *t);
int ms_place_output(ms_place *place, const char *op, const char *name, const ms_tensor *t);

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

/* ---- the argument checks of each op, run by both backends on their place ----
 * Each checks every argument of its ms_* entry point (ops.h) but the data-dependent ones
 * (index and target values), and fills the sizes the kernels need. */

/* [OUT] rows and size of the normalised rows. */
int ms_cpu_check_layer_norm(ms_place *place, const ms_tensor *out, const ms_tensor *mean,
                            const ms_tensor *rstd, const ms_tensor *x, const ms_tensor *weight,
                            const ms_tensor *bias, int normalized_ndim, double eps,
                            int64_t *rows, int64_t *size);
int ms_cpu_check_layer_norm_backward(ms_place *place, const ms_tensor *dx,
                                     const ms_tensor *dweight, const ms_tensor *dbias,
                                     const ms_tensor *dy, const ms_tensor *x,
                                     const ms_tensor *mean, const ms_tensor *rstd,
                                     const ms_tensor *weight, int normalized_ndim,
                                     int64_t *rows, int64_t *size);
/* The broadcast of a and b to out is checked where the kernel maps them. */
int ms_cpu_check_binary(ms_place *place, const ms_tensor *out, const ms_tensor *a,
                        const ms_tensor *b, int op);
int ms_cpu_check_binary_scalar(ms_place *place, const ms_tensor *out, const ms_tensor *a,
                               int op);
int ms_cpu_check_unary(ms_place *place, const ms_tensor *out, const ms_tensor *a, int op);
int ms_cpu_check_unary_backward(ms_place *place, const ms_tensor *dx, const ms_tensor *x,
                                const ms_tensor *dy, int op);
/* The result pointer, set to 0 before anything else is checked, and the operands. */
int ms_cpu_check_equal(ms_place *place, int *equal, const ms_tensor *a, const ms_tensor *b);
int ms_cpu_check_allclose(ms_place *place, int *close, const ms_tensor *a, const ms_tensor *b,
                          double rtol, double atol);
/* Residency and dtypes of out, a and b; the shapes are checked by each backend, against its
 * BLAS's limits. */
int ms_cpu_check_matmul_operands(ms_place *place, const ms_tensor *out, const ms_tensor *a,
                                 const ms_tensor *b);
/* out shares no bytes with a or b (GEMM cannot write its own input). */
int ms_cpu_check_matmul_overlap(const ms_tensor *out, const ms_tensor *a, const ms_tensor *b);
/* [OUT] kept_shape (a's shape with the reduced dims 1) and count, the elements reduced into
 * each output. */
int ms_cpu_check_reduce(ms_place *place, const ms_tensor *out, const ms_tensor *a, int op,
                        uint32_t dims_mask, int64_t *kept_shape, int64_t *count);
/* [OUT] kept_shape: a's shape with dim 1 (unless a is 0-dim). */
int ms_cpu_check_max_dim(ms_place *place, const ms_tensor *values, const ms_tensor *indices,
                         const ms_tensor *a, int dim, int64_t *kept_shape);
/* Shapes and dtypes; the index values are checked by each backend before it writes. */
int ms_cpu_check_embedding(ms_place *place, const ms_tensor *out, const ms_tensor *weight,
                           const ms_tensor *indices);
int ms_cpu_check_embedding_backward(ms_place *place, const ms_tensor *dweight,
                                    const ms_tensor *indices, const ms_tensor *dout);
/* Shapes and dtypes; the target values are checked by each backend before it writes. */
int ms_cpu_check_nll_loss(ms_place *place, const ms_tensor *out, const ms_tensor *logp,
                          const ms_tensor *target, int reduction);
int ms_cpu_check_nll_loss_backward(ms_place *place, const ms_tensor *dlogp,
                                   const ms_tensor *dout, const ms_tensor *target,
                                   int reduction);
int ms_cpu_check_rand_uniform(ms_place *place, const ms_tensor *out, double low, double high);
int ms_cpu_check_rand_normal(ms_place *place, const ms_tensor *out, double mean, double std);
/* op is dropout (out, x) or dropout_backward (dx, dy). */
int ms_cpu_check_dropout(ms_place *place, const char *op, const ms_tensor *out,
                         const char *out_name, const ms_tensor *x, const char *x_name, double p);
int ms_cpu_check_softmax(ms_place *place, const ms_tensor *out, const ms_tensor *x, int dim);
int ms_cpu_check_softmax_backward(ms_place *place, const ms_tensor *dx, const ms_tensor *y,
                                  const ms_tensor *dy, int dim);
/* momentum_buf is checked (and must be given) only when momentum != 0. */
int ms_cpu_check_sgd_step(ms_place *place, const ms_tensor *param,
                          const ms_tensor *momentum_buf, const ms_tensor *grad, double lr,
                          double momentum, double dampening, double weight_decay, int nesterov);
int ms_cpu_check_adam_step(ms_place *place, const ms_tensor *param, const ms_tensor *exp_avg,
                           const ms_tensor *exp_avg_sq, const ms_tensor *grad, int64_t step,
                           double lr, double beta1, double beta2, double eps,
                           double weight_decay, int decoupled);

#pragma GCC visibility pop

#endif
