/* moonshard CPU backend: bias + GELU after a bias-free GEMM, forward and backward in one pass
 * each (element math in kernels/bias_gelu.h). The forward splits rows across threads; the
 * backward splits columns, so each thread owns whole columns of the bias gradient and sums
 * them over the rows in order (the result never depends on the split). */
#include <stdlib.h>

#include "bias_gelu.h"
#include "cpu.h"

typedef struct bias_gelu_args {
    int64_t rows, cols;
    int tanh_approx, dtype;
    const void *acc, *bias, *dy;
    void *y, *dacc;
    double *dbias_acc; /* one per column */
} bias_gelu_args;

/* One row segment of n elements; restrict lets the loops vectorise (the build has
 * -fno-strict-aliasing, so without it every store could alias every load). */
#define BIAS_GELU_SEGMENTS(SUF, T)                                                        \
    static void forward_segment_##SUF(T *restrict y, const T *restrict acc,               \
                                      const T *restrict bias, int64_t n, int tanh_approx) \
    {                                                                                     \
        if (tanh_approx)                                                                  \
            for (int64_t j = 0; j < n; j++)                                               \
                y[j] = ms_k_bias_gelu_##SUF(acc[j], bias[j], 1);                          \
        else                                                                              \
            for (int64_t j = 0; j < n; j++)                                               \
                y[j] = ms_k_bias_gelu_##SUF(acc[j], bias[j], 0);                          \
    }                                                                                     \
    static void backward_segment_##SUF(T *restrict dacc, double *restrict sums,           \
                                       const T *restrict acc, const T *restrict bias,     \
                                       const T *restrict dy, int64_t n, int tanh_approx)  \
    {                                                                                     \
        if (tanh_approx)                                                                  \
            for (int64_t j = 0; j < n; j++) {                                             \
                T d = ms_k_bias_gelu_backward_##SUF(acc[j], bias[j], dy[j], 1);           \
                dacc[j] = d;                                                              \
                sums[j] += (double)d;                                                     \
            }                                                                             \
        else                                                                              \
            for (int64_t j = 0; j < n; j++) {                                             \
                T d = ms_k_bias_gelu_backward_##SUF(acc[j], bias[j], dy[j], 0);           \
                dacc[j] = d;                                                              \
                sums[j] += (double)d;                                                     \
            }                                                                             \
    }

#define BIAS_GELU_FORWARD(SUF, T)                                                         \
    static void forward_##SUF(const bias_gelu_args *a, int64_t first, int64_t last)       \
    {                                                                                     \
        int64_t cols = a->cols;                                                           \
        for (int64_t r = first; r < last; r++)                                            \
            forward_segment_##SUF((T *)a->y + r * cols, (const T *)a->acc + r * cols,     \
                                  a->bias, cols, a->tanh_approx);                         \
    }

/* dacc and the column sums of dacc over the columns [first, last), rows in order. */
#define BIAS_GELU_BACKWARD(SUF, T)                                                        \
    static void backward_##SUF(const bias_gelu_args *a, int64_t first, int64_t last)      \
    {                                                                                     \
        int64_t cols = a->cols, n = last - first;                                         \
        for (int64_t j = first; j < last; j++)                                            \
            a->dbias_acc[j] = 0.0;                                                        \
        for (int64_t r = 0; r < a->rows; r++) {                                           \
            int64_t at = r * cols + first;                                                \
            backward_segment_##SUF((T *)a->dacc + at, a->dbias_acc + first,               \
                                   (const T *)a->acc + at, (const T *)a->bias + first,    \
                                   (const T *)a->dy + at, n, a->tanh_approx);             \
        }                                                                                 \
    }

BIAS_GELU_SEGMENTS(f32, float)
BIAS_GELU_SEGMENTS(f64, double)
BIAS_GELU_FORWARD(f32, float)
BIAS_GELU_FORWARD(f64, double)
BIAS_GELU_BACKWARD(f32, float)
BIAS_GELU_BACKWARD(f64, double)

static void forward_rows(void *arg, int64_t first, int64_t last)
{
    const bias_gelu_args *a = arg;
    if (a->dtype == MS_F32)
        forward_f32(a, first, last);
    else
        forward_f64(a, first, last);
}

static void backward_columns(void *arg, int64_t first, int64_t last)
{
    const bias_gelu_args *a = arg;
    if (a->dtype == MS_F32)
        backward_f32(a, first, last);
    else
        backward_f64(a, first, last);
}

/* Work per element: the exact GELU's erf and exp cost about as much as 20 adds. */
static double work_of(int64_t rows, int64_t cols) { return 20.0 * (double)rows * (double)cols; }

int ms_cpu_bias_gelu(ms_tensor *y, const ms_tensor *acc, const ms_tensor *bias, int tanh_approx,
                     int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu";
    if (rows == 0 || cols == 0)
        return MS_OK;
    bias_gelu_args a = {.rows = rows, .cols = cols, .tanh_approx = tanh_approx,
                        .dtype = acc->dtype};
    void *acc_owned = NULL, *bias_owned = NULL, *y_owned = NULL;
    int status = ms_cpu_dense(op, acc, 1, (void **)&a.acc, &acc_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, bias, 1, (void **)&a.bias, &bias_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, y, 0, &a.y, &y_owned);
    if (status == MS_OK)
        ms_parallel_for(rows, ms_parallel_ranges(rows, work_of(rows, cols)), forward_rows, &a);
    if (a.y)
        ms_cpu_dense_done(y, y_owned, status == MS_OK);
    if (a.bias)
        ms_cpu_dense_done(bias, bias_owned, 0);
    if (a.acc)
        ms_cpu_dense_done(acc, acc_owned, 0);
    return status;
}

int ms_cpu_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                              const ms_tensor *acc, const ms_tensor *bias, int tanh_approx,
                              int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu_backward";
    if (cols == 0)
        return MS_OK;
    if (rows == 0)
        return ms_cpu_fill(dbias, 0.0);
    bias_gelu_args a = {.rows = rows, .cols = cols, .tanh_approx = tanh_approx,
                        .dtype = acc->dtype};
    void *dacc_owned = NULL, *dy_owned = NULL, *acc_owned = NULL, *bias_owned = NULL;
    void *dbias_data = NULL, *dbias_owned = NULL;
    int status = ms_cpu_alloc(op, (size_t)cols * sizeof(double), (void **)&a.dbias_acc);
    if (status == MS_OK)
        status = ms_cpu_dense(op, acc, 1, (void **)&a.acc, &acc_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, bias, 1, (void **)&a.bias, &bias_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, dy, 1, (void **)&a.dy, &dy_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, dacc, 0, &a.dacc, &dacc_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, dbias, 0, &dbias_data, &dbias_owned);
    if (status == MS_OK) {
        ms_parallel_for(cols, ms_parallel_ranges(cols, work_of(rows, cols)), backward_columns,
                        &a);
        for (int64_t j = 0; j < cols; j++) {
            if (dbias->dtype == MS_F32)
                ((float *)dbias_data)[j] = (float)a.dbias_acc[j];
            else
                ((double *)dbias_data)[j] = a.dbias_acc[j];
        }
    }
    if (dbias_data)
        ms_cpu_dense_done(dbias, dbias_owned, status == MS_OK);
    if (a.dacc)
        ms_cpu_dense_done(dacc, dacc_owned, status == MS_OK);
    if (a.dy)
        ms_cpu_dense_done(dy, dy_owned, 0);
    if (a.bias)
        ms_cpu_dense_done(bias, bias_owned, 0);
    if (a.acc)
        ms_cpu_dense_done(acc, acc_owned, 0);
    free(a.dbias_acc);
    return status;
}
