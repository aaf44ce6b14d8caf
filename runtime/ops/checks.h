/* moonshard runtime: what the files of runtime/ops/ share (not exported): the place an op
 * runs on, chosen from its first tensor's pool, and argument checks with uniform messages. */
#ifndef MS_OPS_CHECKS_H
#define MS_OPS_CHECKS_H

#include <stdint.h>

#include "backend.h"
#include "profile.h"

#pragma GCC visibility push(hidden)

/* Where an op runs: the backend of its first tensor's pool, and on a device that device
 * once the first operand is checked (-1 before, and on the CPU). */
typedef struct ms_place {
    const ms_ops_backend *backend;
    int on_device; /* backend->device_tensors, kept here for the checks */
    int device;
} ms_place;

/* The place of a tensor: the device's in a cuda:N pool once the device side is loaded, else
 * the CPU (whose checks then name a tensor on a device that this process cannot reach). */
static inline ms_place ms_place_of(const ms_tensor *t)
{
    if (t && t->storage && t->storage->pool >= MS_POOL_CUDA0) {
        const ms_ops_backend *device = ms_device_ops();
        if (device)
            return (ms_place){device, 1, -1};
        return (ms_place){&ms_cpu_ops, 0, -1};
    }
    if (__builtin_expect(ms_profile_on, 0))
        return (ms_place){&ms_profiled_cpu_ops, 0, -1};
    return (ms_place){&ms_cpu_ops, 0, -1};
}

/* The whole checks of ms_check_input and ms_check_output, with their messages. */
int ms_check_input_full(ms_place *place, const char *op, const char *name, const ms_tensor *t);
int ms_check_output_full(ms_place *place, const char *op, const char *name, const ms_tensor *t);

/* A live tensor of a CPU pool on the CPU place: the common case, decided inline. */
static inline int ms_check_cpu_fast(const ms_place *place, const ms_tensor *t)
{
    return !place->on_device && t && t->dtype >= 0 && t->dtype < MS_DTYPE_COUNT && t->storage &&
           !t->storage->released && t->ndim >= 0 && t->ndim <= MS_MAX_DIMS &&
           t->storage->pool >= 0 && t->storage->pool < MS_POOL_CUDA0 &&
           (t->numel == 0 || t->storage->data);
}

/* A readable tensor on place: non-NULL, known dtype, ndim in range, live storage (on a
 * device: the place's device, made current by the first operand; pending collectives that
 * write it awaited). */
static inline int ms_check_input(ms_place *place, const char *op, const char *name,
                                 const ms_tensor *t)
{
    return ms_check_cpu_fast(place, t) ? MS_OK : ms_check_input_full(place, op, name, t);
}

/* As ms_check_input, and no two elements share memory through a zero stride (an expanded
 * view cannot be written). */
static inline int ms_check_output(ms_place *place, const char *op, const char *name,
                                  const ms_tensor *t)
{
    if (!ms_check_cpu_fast(place, t))
        return ms_check_output_full(place, op, name, t);
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] > 1 && t->strides[d] == 0)
            return ms_check_output_full(place, op, name, t);
    return MS_OK;
}
/* An optional (NULL allowed) tensor on place, read or (is_output) written. */
int ms_check_optional(ms_place *place, const char *op, const char *name, const ms_tensor *t,
                      int is_output);
/* t's dtype is a float: f32, f64, bf16 or f16. */
int ms_check_float(const char *op, const char *name, const ms_tensor *t);
int ms_check_same_dtype(const char *op, const char *name_a, const ms_tensor *a,
                        const char *name_b, const ms_tensor *b);
int ms_check_same_shape(const char *op, const char *name_a, const ms_tensor *a,
                        const char *name_b, const ms_tensor *b);
/* t has exactly the shape (ndim, shape). */
int ms_check_shape_is(const char *op, const char *name, const ms_tensor *t, int ndim,
                      const int64_t *shape);
/* 1 when the byte ranges of a's and b's elements in one storage meet (an output that
 * shares memory with another operand). */
int ms_tensors_overlap(const ms_tensor *a, const ms_tensor *b);
/* dim in [0, t->ndim) (0 also accepted for a 0-dim tensor). */
int ms_check_dim(const char *op, const ms_tensor *t, int dim);
/* A class-index loss: scores [N, C] (float, scores_name), target [N] i32/i64 on place,
 * per_row (out or dout) of the scores' dtype, [N] for reduction 0 (none) else a scalar
 * (1 mean, 2 sum); scores and per_row already checked on place. */
int ms_check_class_loss(ms_place *place, const char *op, const ms_tensor *scores,
                        const char *scores_name, const ms_tensor *target,
                        const ms_tensor *per_row, const char *per_row_name, int reduction);

#pragma GCC visibility pop

#endif
