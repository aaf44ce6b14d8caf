/* moonshard CPU backend: bias + GELU after a bias-free GEMM (element math in
 * kernels/bias_gelu.h). The forward writes y and, when asked, gelu' in one pass, splitting
 * rows across threads. The backward multiplies dy by that derivative and sums the result
 * over the rows for the bias; it splits columns, so each thread owns whole columns of the bias
 * gradient and sums them over the rows in order (the result never depends on the split). */
#include <stdlib.h>

#include "bias_gelu.h"
#include "cpu.h"
#include "lanes.h"

/* Rows whose column sums the backward adds in one pass, each column's accumulator held
 * across them. */
enum { ROW_GROUP = 4 };

typedef struct bias_gelu_args {
    int64_t rows, cols;
    int tanh_approx, dtype;
    const void *acc, *bias, *dy, *derivative;
    void *y, *dacc, *derivative_out;
    double *dbias_acc; /* one per column */
} bias_gelu_args;

/* One row segment of n elements; restrict lets the loops vectorise (the build has
 * -fno-strict-aliasing, so without it every store could alias every load). */
#define BIAS_GELU_SEGMENTS(SUF, T)                                                        \
    static void forward_segment_##SUF(T *restrict y, T *restrict derivative,              \
                                      const T *restrict acc, const T *restrict bias,      \
                                      int64_t n, int tanh_approx)                         \
    {                                                                                     \
        if (derivative && tanh_approx)                                                    \
            for (int64_t j = 0; j < n; j++)                                               \
                y[j] = ms_k_bias_gelu_and_derivative_##SUF(acc[j], bias[j], 1,            \
                                                           derivative + j);               \
        else if (derivative)                                                              \
            for (int64_t j = 0; j < n; j++)                                               \
                y[j] = ms_k_bias_gelu_and_derivative_##SUF(acc[j], bias[j], 0,            \
                                                           derivative + j);               \
        else if (tanh_approx)                                                             \
            for (int64_t j = 0; j < n; j++)                                               \
                y[j] = ms_k_bias_gelu_##SUF(acc[j], bias[j], 1);                          \
        else                                                                              \
            for (int64_t j = 0; j < n; j++)                                               \
                y[j] = ms_k_bias_gelu_##SUF(acc[j], bias[j], 0);                          \
    }                                                                                     \
    /* dacc = dy * derivative over count rows (row_stride apart) of n columns; sums[j]    \
     * adds the rows' dacc in row order, MS_LANES columns at a time in registers */        \
    static void backward_rows_##SUF(T *restrict dacc, double *restrict sums,              \
                                    const T *restrict dy, const T *restrict derivative,   \
                                    int64_t row_stride, int count, int64_t n)             \
    {                                                                                     \
        int64_t j = 0;                                                                    \
        for (; j + MS_LANES <= n; j += MS_LANES) {                                        \
            ms_lanes_f64 sum;                                                             \
            memcpy(&sum, sums + j, sizeof sum);                                           \
            for (int r = 0; r < count; r++) {                                             \
                int64_t at = r * row_stride + j;                                          \
                __typeof__(ms_lanes_load_##SUF(dy)) d =                                   \
                    ms_lanes_load_##SUF(dy + at) * ms_lanes_load_##SUF(derivative + at);  \
                ms_lanes_store_##SUF(dacc + at, d);                                       \
                sum += ms_lanes_wide_##SUF(d);                                            \
            }                                                                             \
            memcpy(sums + j, &sum, sizeof sum);                                           \
        }                                                                                 \
        for (int r = 0; r < count; r++)                                                   \
            for (int64_t k = j; k < n; k++) {                                             \
                int64_t at = r * row_stride + k;                                          \
                T d = dy[at] * derivative[at];                                            \
                dacc[at] = d;                                                             \
                sums[k] += (double)d;                                                     \
            }                                                                             \
    }

#define BIAS_GELU_FORWARD(SUF, T)                                                         \
    static void forward_##SUF(const bias_gelu_args *a, int64_t first, int64_t last)       \
    {                                                                                     \
        int64_t cols = a->cols;                                                           \
        for (int64_t r = first; r < last; r++)                                            \
            forward_segment_##SUF((T *)a->y + r * cols,                                   \
                                  a->derivative_out ? (T *)a->derivative_out + r * cols   \
                                                    : NULL,                               \
                                  (const T *)a->acc + r * cols, a->bias, cols,            \
                                  a->tanh_approx);                                        \
    }

/* dacc and the column sums of dacc over the columns [first, last), rows in order. */
#define BIAS_GELU_BACKWARD(SUF, T)                                                        \
    static void backward_##SUF(const bias_gelu_args *a, int64_t first, int64_t last)      \
    {                                                                                     \
        int64_t cols = a->cols;                                                           \
        for (int64_t j = first; j < last; j++)                                            \
            a->dbias_acc[j] = 0.0;                                                        \
        for (int64_t r = 0; r < a->rows; r += ROW_GROUP) {                                \
            int count = a->rows - r < ROW_GROUP ? (int)(a->rows - r) : ROW_GROUP;         \
            int64_t at = r * cols + first;                                                \
            backward_rows_##SUF((T *)a->dacc + at, a->dbias_acc + first,                  \
                                (const T *)a->dy + at, (const T *)a->derivative + at,     \
                                cols, count, last - first);                               \
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

/* Work per element: the exact GELU's erf and exp cost about as much as 20 adds, its
 * derivative's second exp 10 more. */
static double forward_work(int64_t rows, int64_t cols, int with_derivative)
{
    return (with_derivative ? 30.0 : 20.0) * (double)rows * (double)cols;
}

int ms_cpu_bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                     const ms_tensor *bias, int tanh_approx, int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu";
    if (rows == 0 || cols == 0)
        return MS_OK;
    bias_gelu_args a = {.rows = rows, .cols = cols, .tanh_approx = tanh_approx,
                        .dtype = acc->dtype};
    void *acc_owned = NULL, *bias_owned = NULL, *y_owned = NULL, *derivative_owned = NULL;
    int status = ms_cpu_dense(op, acc, 1, (void **)&a.acc, &acc_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, bias, 1, (void **)&a.bias, &bias_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, y, 0, &a.y, &y_owned);
    if (status == MS_OK && derivative)
        status = ms_cpu_dense(op, derivative, 0, &a.derivative_out, &derivative_owned);
    if (status == MS_OK)
        ms_parallel_for(rows,
                        ms_parallel_ranges(rows, forward_work(rows, cols, derivative != NULL)),
                        forward_rows, &a);
    if (a.derivative_out)
        ms_cpu_dense_done(derivative, derivative_owned, status == MS_OK);
    if (a.y)
        ms_cpu_dense_done(y, y_owned, status == MS_OK);
    if (a.bias)
        ms_cpu_dense_done(bias, bias_owned, 0);
    if (a.acc)
        ms_cpu_dense_done(acc, acc_owned, 0);
    return status;
}

int ms_cpu_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                              const ms_tensor *derivative, int64_t rows, int64_t cols)
{
    const char *op = "bias_gelu_backward";
    if (cols == 0)
        return MS_OK;
    if (rows == 0)
        return ms_cpu_fill(dbias, 0.0);
    bias_gelu_args a = {.rows = rows, .cols = cols, .dtype = dy->dtype};
    void *dacc_owned = NULL, *dy_owned = NULL, *derivative_owned = NULL;
    void *dbias_data = NULL, *dbias_owned = NULL;
    int status = ms_cpu_alloc(op, (size_t)cols * sizeof(double), (void **)&a.dbias_acc);
    if (status == MS_OK)
        status = ms_cpu_dense(op, dy, 1, (void **)&a.dy, &dy_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, derivative, 1, (void **)&a.derivative, &derivative_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, dacc, 0, &a.dacc, &dacc_owned);
    if (status == MS_OK)
        status = ms_cpu_dense(op, dbias, 0, &dbias_data, &dbias_owned);
    if (status == MS_OK) {
        ms_parallel_for(cols, ms_parallel_ranges(cols, 2.0 * (double)rows * (double)cols),
                        backward_columns, &a);
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
    if (a.derivative)
        ms_cpu_dense_done(derivative, derivative_owned, 0);
    if (a.dy)
        ms_cpu_dense_done(dy, dy_owned, 0);
    free(a.dbias_acc);
    return status;
}
