/* moonshard CPU backend: helpers shared by the op files in runtime/cpu/ (not exported).
 * Argument checks with uniform messages, the strided N-d iterator and dense staging. */
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
/* t has exactly the shape (ndim, shape). */
int ms_cpu_shape_is(const char *op, const char *name, const ms_tensor *t, int ndim,
                    const int64_t *shape);
/* dim in [0, t->ndim) (0 also accepted for a 0-dim tensor). */
int ms_cpu_dim(const char *op, const ms_tensor *t, int dim);

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

#pragma GCC visibility pop

#endif
