/* moonshard CUDA backend: what the files of runtime/cuda/ share (not exported): device state,
 * streams, the status check and launch geometry built from tensors. */
#ifndef MS_CUDA_INTERNAL_H
#define MS_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "ops/backend.h"
#include "launch.cuh"

#pragma GCC visibility push(hidden)

/* Record a failed CUDA runtime call as MS_ERR_DEVICE ("what: cuda error text") and return
 * it; MS_OK for cudaSuccess. */
int ms_cuda_status_at(const char *file, int line, cudaError_t error, const char *what);
#define MS_CUDA_STATUS(error, what) ms_cuda_status_at(__FILE__, __LINE__, (error), (what))
#define MS_CUDA_CHECK(call, what) MS_CHECK(MS_CUDA_STATUS((call), (what)))
int ms_cublas_status_at(const char *file, int line, cublasStatus_t status, const char *what);
#define MS_CUBLAS_CHECK(call, what)                                                                \
    MS_CHECK(ms_cublas_status_at(__FILE__, __LINE__, (call), (what)))

/* The device of a tensor in a cuda:N pool. */
static inline int ms_cuda_device_of(const ms_tensor *t)
{
    return t->storage->pool - MS_POOL_CUDA0;
}

/* ---- the device side's part of the tables of ops/backend.h (backend.c: ms_cuda_backend) ----
 * The functions of cuda/gpu.h and pool.h that runtime/device.c forwards here. */
int ms_cuda_count_devices(int *count);
const char *ms_cuda_probe_reason(void);
int ms_cuda_pool_available(int device);
const char *ms_cuda_pool_reason(void);
int ms_cuda_sync_streams(int device);
void *ms_cuda_raw_alloc(int device, size_t rounded);
void ms_cuda_raw_free(int device, void *p);
void *ms_cuda_host_alloc(size_t rounded);
void ms_cuda_host_free(void *p);
/* comm/nccl.c, in a build with NCCL: ms_nccl_init and ms_nccl_finalize of cuda/gpu.h. */
int ms_nccl_open(void);
int ms_nccl_close(void);

/* 1 once this process has made a device current (CUDA has started here). */
int ms_cuda_started(void);
/* Make device current on this thread, creating its streams and cuBLAS handle on first use. */
int ms_cuda_use_device(int device);
cudaStream_t ms_cuda_compute_stream(int device);
cudaStream_t ms_cuda_comm_stream(int device);
cublasHandle_t ms_cuda_blas(int device);

/* ---- ordering the communication stream with the compute stream ----
 * A collective makes the communication stream wait for the compute stream, then marks the
 * byte ranges it reads or writes as pending on done (an event recorded after it). The first
 * op that touches a pending range makes the compute stream wait for that event, so compute
 * that does not touch the buffers overlaps the collective. */
int ms_cuda_comm_wait_compute(int device);
/* Record an event on the communication stream and mark [begin, begin + nbytes) pending. */
int ms_cuda_mark_pending(int device, const void *begin, size_t nbytes);
/* Let the compute stream wait for every pending collective that touches t's storage. */
int ms_cuda_await(const ms_tensor *t);

/* ms_tensor_new for scratch the runtime makes itself: a block reused from the pool cache
 * is written only after collectives still using its bytes. */
int ms_cuda_tensor_new(ms_tensor **out, int dtype, int ndim, const int64_t *shape, int pool);

/* ---- launch geometry ---- */
void ms_cuda_shape_of(ms_cu_shape *shape, int ndim, const int64_t *sizes);
/* t broadcast (numpy rules, aligned right) over shape; MS_ERR_SHAPE when it does not fit. */
int ms_cuda_operand(ms_cu_operand *operand, const char *op, const char *name,
                    const ms_cu_shape *shape, const ms_tensor *t);
/* Drop size-1 dims and merge dims contiguous in every operand (order kept). */
void ms_cuda_coalesce(ms_cu_shape *shape, ms_cu_operand *const *operands, int count);

/* A contiguous tensor from the same pool with t's shape and dtype; with copy_in set it holds
 * t's elements. [OUT] *dense is t itself when t is contiguous (nothing to free), else a new
 * tensor that ms_cuda_dense_done frees after writing it back into t when write_back. */
int ms_cuda_dense(const char *op, const ms_tensor *t, int copy_in, ms_tensor **dense);
int ms_cuda_dense_done(const ms_tensor *t, ms_tensor *dense, int write_back);

/* Dense copies of up to MS_CUDA_STAGED operands of one call, released together: stage
 * returns the device data a kernel reads or writes (NULL for a NULL t, or once a copy
 * failed); unstage_all writes outputs back (when every step succeeded), frees the copies and
 * returns the first failure. Zero-initialise before the first stage. */
enum { MS_CUDA_STAGED = 10 };
typedef struct ms_cuda_staging {
    int count, status;
    const ms_tensor *tensors[MS_CUDA_STAGED];
    ms_tensor *dense[MS_CUDA_STAGED];
    int is_output[MS_CUDA_STAGED];
} ms_cuda_staging;
void *ms_cuda_stage(ms_cuda_staging *st, const char *op, const ms_tensor *t, int copy_in,
                    int is_output);
int ms_cuda_unstage_all(ms_cuda_staging *st);

/* An i64 tensor of count elements in pool holding values (flags and counters of checks). */
int ms_cuda_scratch(ms_tensor **out, int pool, const int64_t *values, int count);
/* nbytes from device memory into host, after the compute stream's earlier work. */
int ms_cuda_download(int device, void *host, const void *device_data, size_t nbytes);

/* Strided copy (and dtype conversion) of src into dst on one device; src broadcasts to dst
 * or has its numel (read in row-major order). */
int ms_cuda_copy_device(ms_tensor *dst, const ms_tensor *src);

/* The status of the last launch on this thread, recorded for op. */
int ms_cuda_launched(const char *op, int error);

/* Every target of rows [N, C] in [0, C) or ignore_index (MS_ERR_INDEX naming op otherwise);
 * fills args (kernels/nll.cuh) over logp, counting the targets not ignored (cuda/nll.c). */
struct ms_cu_nll;
int ms_cuda_check_targets(const char *op, const ms_tensor *logp, const ms_tensor *target,
                          int64_t ignore_index, int reduction, int device,
                          struct ms_cu_nll *args);

/* ---- the kernels of runtime/cuda/backend.c's table (ms_cuda_ops; see ops/backend.h) ---- */
int ms_cuda_fill(ms_tensor *t, double value);
int ms_cuda_arange(ms_tensor *t, double start, double step);
int ms_cuda_equal(int *equal, const ms_tensor *a, const ms_tensor *b);
int ms_cuda_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                     double atol);
int ms_cuda_binary(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int op);
int ms_cuda_binary_scalar(ms_tensor *out, const ms_tensor *a, double s, int op, int reverse);
int ms_cuda_unary(ms_tensor *out, const ms_tensor *a, int op);
int ms_cuda_unary_backward(ms_tensor *dx, const ms_tensor *x, const ms_tensor *dy, int op);
int ms_cuda_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask,
                   const int64_t *kept_shape, int64_t count);
int ms_cuda_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim,
                    const int64_t *kept_shape);
int ms_cuda_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                   int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k);
int ms_cuda_softmax(ms_tensor *out, const ms_tensor *x, int dim, int kind);
int ms_cuda_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                             int kind);
int ms_cuda_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, ms_tensor *sum,
                       const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                       const ms_tensor *bias, double eps, int64_t rows, int64_t size);
int ms_cuda_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                                const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *x,
                                const ms_tensor *mean, const ms_tensor *rstd,
                                const ms_tensor *weight, int64_t rows, int64_t size);
int ms_cuda_bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                      const ms_tensor *bias, int tanh_approx, int64_t rows, int64_t cols);
int ms_cuda_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                               const ms_tensor *derivative, int64_t rows, int64_t cols);
int ms_cuda_embedding(ms_tensor *out, const ms_tensor *weight, const ms_tensor *indices);
int ms_cuda_embedding_backward(ms_tensor *dweight, const ms_tensor *indices,
                               const ms_tensor *dout);
int ms_cuda_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                     int64_t ignore_index, int reduction);
int ms_cuda_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                              int64_t ignore_index, int reduction);
int ms_cuda_cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                         const ms_tensor *target, int64_t ignore_index, int reduction);
int ms_cuda_cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                                  const ms_tensor *logits, const ms_tensor *stats,
                                  const ms_tensor *target, int64_t ignore_index, int reduction);
int ms_cuda_attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
        const ms_tensor *v, const ms_tensor *mask, double scale, int causal);
int ms_cuda_attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv, const ms_tensor *dout,
        const ms_tensor *q, const ms_tensor *k, const ms_tensor *v, const ms_tensor *mask,
        const ms_tensor *out, const ms_tensor *lse, double scale, int causal);
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
/* Bytes between host and device memory, and between devices (transfer.c). */
int ms_cuda_to_device(int device, void *dst, const void *src, size_t nbytes);
int ms_cuda_to_host(int device, void *dst, const void *src, size_t nbytes);
int ms_cuda_between_devices(void *dst, int dst_device, const void *src, int src_device,
                            size_t nbytes);

#pragma GCC visibility pop

#endif
