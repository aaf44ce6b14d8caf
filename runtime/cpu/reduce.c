/* moonshard CPU backend: ms_reduce (sum, mean, max, min, sum of squares over a dims mask)
 * and ms_max_dim. Outputs are assigned. Sums accumulate in double in a fixed order. */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"
#include "reduce.h"

/* The input is visited in row-major order into one double accumulator per output element,
 * so every output sums its inputs in the row-major order of the reduced dims, whatever the
 * strides. A run that folds into a single accumulator (the innermost dims are reduced) is
 * summed in 16 interleaved lanes combined pairwise: still a fixed order for a given
 * geometry, and fast enough that a norm over a large shard is memory-bound. */
enum { LANES = 16, LANE_MIN_RUN = 64 };

#define RUN_SUM_FN(NAME, T, TERM)                                                         \
    static double NAME(const T *x, int64_t n, int64_t sx)                                 \
    {                                                                                     \
        double total = 0.0;                                                               \
        int64_t i = 0;                                                                    \
        if (n >= LANE_MIN_RUN) {                                                          \
            double lanes[LANES] = {0};                                                    \
            if (sx == 1) {                                                                \
                for (; i + LANES <= n; i += LANES)                                        \
                    for (int j = 0; j < LANES; j++) {                                     \
                        double v = (double)x[i + j];                                      \
                        lanes[j] += TERM;                                                 \
                    }                                                                     \
            } else {                                                                      \
                for (; i + LANES <= n; i += LANES)                                        \
                    for (int j = 0; j < LANES; j++) {                                     \
                        double v = (double)x[(i + j) * sx];                               \
                        lanes[j] += TERM;                                                 \
                    }                                                                     \
            }                                                                             \
            for (int width = LANES / 2; width > 0; width /= 2)                            \
                for (int j = 0; j < width; j++)                                           \
                    lanes[j] += lanes[j + width];                                         \
            total = lanes[0];                                                             \
        }                                                                                 \
        for (; i < n; i++) {                                                              \
            double v = (double)x[i * sx];                                                 \
            total += TERM;                                                                \
        }                                                                                 \
        return total;                                                                     \
    }

RUN_SUM_FN(run_sum_f32, float, v)
RUN_SUM_FN(run_sum_f64, double, v)
RUN_SUM_FN(run_sumsq_f32, float, v * v)
RUN_SUM_FN(run_sumsq_f64, double, v * v)

/* Operand 0 is the double accumulator, operand 1 the input. */
#define SUM_KERNEL(NAME, T, RUN, STEP)                                                    \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        (void)ctx;                                                                        \
        double *acc = (double *)p[0];                                                     \
        const T *x = (const T *)p[1];                                                     \
        int64_t sacc = s[0], sx = s[1];                                                   \
        if (sacc == 0) {                                                                  \
            *acc += RUN(x, n, sx);                                                        \
        } else if (sacc == 1 && sx == 1) {                                                \
            for (int64_t i = 0; i < n; i++)                                               \
                acc[i] = STEP(acc[i], (double)x[i]);                                      \
        } else {                                                                          \
            for (int64_t i = 0; i < n; i++)                                               \
                acc[i * sacc] = STEP(acc[i * sacc], (double)x[i * sx]);                   \
        }                                                                                 \
    }

/* Contiguous runs keep LANES running extremes in T (exact for max and min) and a separate
 * NaN flag, a form the compiler vectorises; a NaN anywhere makes the result NaN. */
#define EXTREMUM_KERNEL(NAME, T, STEP, BETTER)                                            \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        (void)ctx;                                                                        \
        double *acc = (double *)p[0];                                                     \
        const T *x = (const T *)p[1];                                                     \
        int64_t sacc = s[0], sx = s[1];                                                   \
        if (sacc == 0) {                                                                  \
            double best = *acc;                                                           \
            int64_t i = 0;                                                                \
            if (sx == 1 && n >= LANE_MIN_RUN) {                                           \
                T lanes[LANES];                                                           \
                int nan_seen[LANES];                                                      \
                for (int j = 0; j < LANES; j++) {                                         \
                    lanes[j] = x[j];                                                      \
                    nan_seen[j] = 0;                                                      \
                }                                                                         \
                for (; i + LANES <= n; i += LANES)                                        \
                    for (int j = 0; j < LANES; j++) {                                     \
                        T v = x[i + j];                                                   \
                        lanes[j] = BETTER(v, lanes[j]) ? v : lanes[j];                    \
                        nan_seen[j] |= v != v;                                            \
                    }                                                                     \
                int any_nan = 0;                                                          \
                for (int j = 0; j < LANES; j++) {                                         \
                    best = STEP(best, (double)lanes[j]);                                  \
                    any_nan |= nan_seen[j];                                               \
                }                                                                         \
                if (any_nan)                                                              \
                    best = NAN;                                                           \
            }                                                                             \
            for (; i < n; i++)                                                            \
                best = STEP(best, (double)x[i * sx]);                                     \
            *acc = best;                                                                  \
        } else {                                                                          \
            for (int64_t i = 0; i < n; i++)                                               \
                acc[i * sacc] = STEP(acc[i * sacc], (double)x[i * sx]);                   \
        }                                                                                 \
    }

#define GREATER(a, b) ((a) > (b))
#define LESS(a, b) ((a) < (b))

SUM_KERNEL(sum_f32, float, run_sum_f32, ms_k_sum_step)
SUM_KERNEL(sum_f64, double, run_sum_f64, ms_k_sum_step)
SUM_KERNEL(sumsq_f32, float, run_sumsq_f32, ms_k_sumsq_step)
SUM_KERNEL(sumsq_f64, double, run_sumsq_f64, ms_k_sumsq_step)
EXTREMUM_KERNEL(max_f32, float, ms_k_max_step, GREATER)
EXTREMUM_KERNEL(max_f64, double, ms_k_max_step, GREATER)
EXTREMUM_KERNEL(min_f32, float, ms_k_min_step, LESS)
EXTREMUM_KERNEL(min_f64, double, ms_k_min_step, LESS)

typedef struct finish_ctx { double divisor; } finish_ctx;

#define FINISH_KERNEL(NAME, T)                                                            \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        double divisor = ((const finish_ctx *)ctx)->divisor;                                  \
        T *out = (T *)p[0];                                                               \
        const double *acc = (const double *)p[1];                                         \
        for (int64_t i = 0; i < n; i++)                                                   \
            out[i * s[0]] = (T)(acc[i * s[1]] / divisor);                                   \
    }

FINISH_KERNEL(finish_f32, float)
FINISH_KERNEL(finish_f64, double)

int ms_cpu_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask,
                  const int64_t *kept_shape, int64_t count)
{
    if (out->numel == 0)
        return MS_OK;

    double stack_acc[64];
    double *acc = stack_acc;
    void *heap_acc = NULL;
    if (out->numel > 64) {
        MS_CHECK(ms_cpu_alloc("reduce", (size_t)out->numel * sizeof(double), &heap_acc));
        acc = heap_acc;
    }
    double init = op == MS_MAX ? -INFINITY : op == MS_MIN ? INFINITY : 0.0;
    for (int64_t i = 0; i < out->numel; i++)
        acc[i] = init;

    /* The accumulator is out's shape laid out densely; stride 0 along reduced dims. */
    int64_t acc_strides[MS_MAX_DIMS];
    ms_contiguous_strides(a->ndim, kept_shape, acc_strides);
    int64_t acc_broadcast[MS_MAX_DIMS];
    for (int d = 0; d < a->ndim; d++)
        acc_broadcast[d] = ((dims_mask >> d) & 1u) ? 0 : acc_strides[d];

    int f32 = a->dtype == MS_F32;
    ms_iter_fn kernel;
    switch (op) {
    case MS_SUM:
    case MS_MEAN: kernel = f32 ? sum_f32 : sum_f64; break;
    case MS_SUMSQ: kernel = f32 ? sumsq_f32 : sumsq_f64; break;
    case MS_MAX: kernel = f32 ? max_f32 : max_f64; break;
    default: kernel = f32 ? min_f32 : min_f64; break;
    }
    ms_iter it;
    ms_iter_begin(&it, a->ndim, a->shape);
    ms_iter_raw(&it, acc, sizeof(double), acc_broadcast);
    MS_CHECK(ms_iter_tensor(&it, "reduce", "a", a));
    it.split_outputs = 1; /* each accumulator sums its own inputs in the same order */
    ms_iter_run(&it, kernel, NULL);

    /* the mean of nothing is 0/0 = NaN, as in PyTorch */
    finish_ctx finish = {op == MS_MEAN ? (double)count : 1.0};
    ms_iter_begin(&it, out->ndim, out->shape);
    MS_CHECK(ms_iter_tensor(&it, "reduce", "out", out));
    ms_iter_raw(&it, acc, sizeof(double), acc_strides);
    ms_iter_run(&it, f32 ? finish_f32 : finish_f64, &finish);
    free(heap_acc);
    return MS_OK;
}

/* ---- max along one dim with the index of the first maximum ---- */

typedef struct argmax_ctx {
    int64_t length;        /* size of the searched dim */
    int64_t stride;        /* its stride in a */
} argmax_ctx;

#define ARGMAX_KERNEL(NAME, T)                                                            \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        const argmax_ctx *c = ctx;                                                        \
        T *values = (T *)p[0];                                                            \
        int64_t *indices = (int64_t *)p[1];                                               \
        const T *a = (const T *)p[2];                                                     \
        for (int64_t i = 0; i < n; i++) {                                                 \
            const T *row = a + i * s[2];                                                  \
            T best = row[0];                                                              \
            int64_t best_index = 0;                                                       \
            for (int64_t k = 1; k < c->length; k++) {                                     \
                T v = row[k * c->stride];                                                 \
                if (ms_k_argmax_better(v, best)) {                                        \
                    best = v;                                                             \
                    best_index = k;                                                       \
                }                                                                         \
            }                                                                             \
            values[i * s[0]] = best;                                                      \
            indices[i * s[1]] = best_index;                                               \
        }                                                                                 \
    }

ARGMAX_KERNEL(argmax_f32, float)
ARGMAX_KERNEL(argmax_f64, double)

int ms_cpu_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim,
                   const int64_t *kept_shape)
{
    if (values->numel == 0)
        return MS_OK;
    argmax_ctx c = {a->ndim ? a->shape[dim] : 1, a->ndim ? a->strides[dim] : 0};
    ms_iter it;
    ms_iter_begin(&it, a->ndim, kept_shape);
    MS_CHECK(ms_iter_tensor(&it, "max_dim", "values", values));
    MS_CHECK(ms_iter_tensor(&it, "max_dim", "indices", indices));
    int64_t a_strides[MS_MAX_DIMS];
    for (int d = 0; d < a->ndim; d++)
        a_strides[d] = d == dim ? 0 : a->strides[d];
    ms_iter_raw(&it, ms_tensor_data(a), ms_dtype_size(a->dtype), a_strides);
    it.split_outputs = 1;
    it.cost = c.length;
    ms_iter_run(&it, a->dtype == MS_F32 ? argmax_f32 : argmax_f64, &c);
    return MS_OK;
}
