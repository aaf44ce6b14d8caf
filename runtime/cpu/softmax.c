/* moonshard CPU backend: softmax, log_softmax and safe softmax (ops.h) along one dim, forward
 * and backward.
 * dx is an activation gradient and is assigned. Row sums accumulate in double. */
#include <math.h>

#include "cpu.h"
#include "fastmath.h"

/* The iterator walks the row starts (the tensor's shape with dim set to 1); each kernel
 * call then handles n rows of `length` elements, stepping by the operands' dim strides. */
typedef struct row_ctx {
    int64_t length;
    int64_t stride[3]; /* stride along dim of each operand */
    int kind;          /* an MS_*SOFTMAX */
} row_ctx;

#define SOFTMAX_KERNEL(NAME, T, EXP)                                                      \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        const row_ctx *c = ctx;                                                           \
        int64_t so = c->stride[0], sx = c->stride[1], len = c->length;                    \
        for (int64_t r = 0; r < n; r++) {                                                 \
            T *out = (T *)p[0] + r * s[0];                                                \
            const T *x = (const T *)p[1] + r * s[1];                                      \
            T max = x[0];                                                                 \
            for (int64_t k = 1; k < len; k++) { /* a NaN, once taken, stays */         \
                T v = x[k * sx];                                                          \
                if (v > max || v != v)                                                    \
                    max = v;                                                              \
            }                                                                             \
            double sum = 0.0;                                                             \
            if (max == -INFINITY && c->kind == MS_SAFE_SOFTMAX) {                         \
                for (int64_t k = 0; k < len; k++)                                         \
                    out[k * so] = 0;                                                      \
            } else if (c->kind == MS_LOG_SOFTMAX) {                                       \
                for (int64_t k = 0; k < len; k++)                                         \
                    sum += (double)EXP(x[k * sx] - max);                                  \
                T log_sum = (T)log(sum);                                                  \
                for (int64_t k = 0; k < len; k++)                                         \
                    out[k * so] = (x[k * sx] - max) - log_sum;                            \
            } else { /* exp in its own loop so it vectorises; the sum stays in order */  \
                for (int64_t k = 0; k < len; k++)                                         \
                    out[k * so] = EXP(x[k * sx] - max);                                   \
                for (int64_t k = 0; k < len; k++)                                         \
                    sum += (double)out[k * so];                                           \
                T inverse = (T)(1.0 / sum);                                               \
                for (int64_t k = 0; k < len; k++)                                         \
                    out[k * so] *= inverse;                                               \
            }                                                                             \
        }                                                                                 \
    }

SOFTMAX_KERNEL(softmax_f32, float, ms_k_expf)
SOFTMAX_KERNEL(softmax_f64, double, exp)

/* softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy). */
#define SOFTMAX_BACKWARD_KERNEL(NAME, T, EXP)                                             \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        const row_ctx *c = ctx;                                                           \
        int64_t sdx = c->stride[0], sy = c->stride[1], sdy = c->stride[2];                \
        int64_t len = c->length;                                                          \
        for (int64_t r = 0; r < n; r++) {                                                 \
            T *dx = (T *)p[0] + r * s[0];                                                 \
            const T *y = (const T *)p[1] + r * s[1];                                      \
            const T *dy = (const T *)p[2] + r * s[2];                                     \
            double sum = 0.0;                                                             \
            if (c->kind == MS_LOG_SOFTMAX) {                                              \
                for (int64_t k = 0; k < len; k++)                                         \
                    sum += (double)dy[k * sdy];                                           \
                T total = (T)sum;                                                         \
                for (int64_t k = 0; k < len; k++)                                         \
                    dx[k * sdx] = dy[k * sdy] - EXP(y[k * sy]) * total;                   \
            } else {                                                                      \
                for (int64_t k = 0; k < len; k++)                                         \
                    sum += (double)dy[k * sdy] * (double)y[k * sy];                       \
                T total = (T)sum;                                                         \
                for (int64_t k = 0; k < len; k++)                                         \
                    dx[k * sdx] = y[k * sy] * (dy[k * sdy] - total);                      \
            }                                                                             \
        }                                                                                 \
    }

SOFTMAX_BACKWARD_KERNEL(softmax_backward_f32, float, ms_k_expf)
SOFTMAX_BACKWARD_KERNEL(softmax_backward_f64, double, exp)

/* Iterate the row starts of `count` same-shaped tensors along dim. */
static void run_rows(const ms_tensor *const *tensors, int count, int dim, int kind,
                     ms_iter_fn kernel, int cost)
{
    const ms_tensor *first = tensors[0];
    row_ctx c = {first->ndim ? first->shape[dim] : 1, {0, 0, 0}, kind};
    int64_t starts[MS_MAX_DIMS] = {0};
    for (int d = 0; d < first->ndim; d++)
        starts[d] = d == dim ? 1 : first->shape[d];
    ms_iter it;
    ms_iter_begin(&it, first->ndim, starts);
    for (int i = 0; i < count; i++) {
        const ms_tensor *t = tensors[i];
        int64_t strides[MS_MAX_DIMS];
        for (int d = 0; d < t->ndim; d++)
            strides[d] = d == dim || t->shape[d] == 1 ? 0 : t->strides[d];
        c.stride[i] = t->ndim ? t->strides[dim] : 0;
        ms_iter_raw(&it, ms_tensor_data(t), ms_dtype_size(t->dtype), strides);
    }
    it.split_outputs = 1; /* rows are independent */
    it.cost = cost * c.length;
    if (c.length > 0)
        ms_iter_run(&it, kernel, &c);
}

int ms_cpu_softmax(ms_tensor *out, const ms_tensor *x, int dim, int kind)
{
    const ms_tensor *tensors[2] = {out, x};
    run_rows(tensors, 2, dim, kind, x->dtype == MS_F32 ? softmax_f32 : softmax_f64, 12);
    return MS_OK;
}

int ms_cpu_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                            int kind)
{
    const ms_tensor *tensors[3] = {dx, y, dy};
    int log = kind == MS_LOG_SOFTMAX;
    run_rows(tensors, 3, dim, kind,
             y->dtype == MS_F32 ? softmax_backward_f32 : softmax_backward_f64, log ? 12 : 3);
    return MS_OK;
}
