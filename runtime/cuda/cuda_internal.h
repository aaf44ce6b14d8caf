/* moonshard CUDA backend: what the files of runtime/cuda/ share (not exported): device state,
 * streams, the status check and launch geometry built from tensors. */
#ifndef MS_CUDA_INTERNAL_H
#define MS_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "internal.h"
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

/* An i64 tensor of count elements in pool holding values (flags and counters of checks). */
int ms_cuda_scratch(ms_tensor **out, int pool, const int64_t *values, int count);
/* nbytes from device memory into host, after the compute stream's earlier work. */
int ms_cuda_download(int device, void *host, const void *device_data, size_t nbytes);

/* Device-to-device strided copy (and dtype conversion) of src into dst, same shape. */
int ms_cuda_copy_device(ms_tensor *dst, const ms_tensor *src);
/* ms_copy when one tensor is in a CPU pool or the two are on different devices. */
int ms_cuda_copy_across(ms_tensor *dst, const ms_tensor *src);

/* The status of the last launch on this thread, recorded for op. */
int ms_cuda_launched(const char *op, int error);

#pragma GCC visibility pop

#endif
