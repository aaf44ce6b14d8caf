/* moonshard CPU backend: layer norm over the last normalized_ndim dims, forward and backward,
 * optionally fused with a residual add (forward: sum = x + residual is written and normalised
 * in the same pass over the row; backward: dsum, the sum's own gradient, is added to dx).
 * dx is assigned; dweight and dbias are parameter gradients and accumulate (+=). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "lanes.h"
#include "reduce.h"

/* Row statistics in double over MS_LANES interleaved lanes (lanes.h): a fixed order for a
 * given row size, without serialising on one add. The elements past the last whole MS_LANES
 * go to lane 0. The statistics of GROUP rows are made in one pass, so the adds of different
 * rows overlap (each row's order is unchanged); a short group repeats its last row. */
enum { LANES = MS_LANES, GROUP = 4 };

/* The rows of one group: GROUP pointers, the last repeated in a short group. */
#define GROUP_ROWS(SUF, T)                                                                \
    static void group_rows_##SUF(const T *rows[GROUP], const T *base, int64_t r,          \
                                 int64_t count, int64_t size)                             \
    {                                                                                     \
        for (int g = 0; g < GROUP; g++)                                                   \
            rows[g] = base + (r + (g < count ? g : count - 1)) * size;                    \
    }

GROUP_ROWS(f32, float)
GROUP_ROWS(f64, double)

#define GROUP_STATS(SUF, T)                                                               \
    /* total[g] = the sum of row g; with residual, row g is x + residual, written to sum */ \
    static void group_sums_##SUF(double total[GROUP], T *const sum[GROUP],                \
                                 const T *const x[GROUP], const T *const residual[GROUP], \
                                 int64_t n)                                               \
    {                                                                                     \
        ms_lanes_f64 acc[GROUP] = {{0}};                                                     \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES)                                                \
            for (int g = 0; g < GROUP; g++) {                                             \
                if (residual) {                                                           \
                    __typeof__(ms_lanes_load_##SUF(x[g])) v =                                      \
                        ms_lanes_load_##SUF(x[g] + j) + ms_lanes_load_##SUF(residual[g] + j);               \
                    ms_lanes_store_##SUF(sum[g] + j, v);                                           \
                    acc[g] += ms_lanes_wide_##SUF(v);                                              \
                } else {                                                                  \
                    acc[g] += ms_lanes_wide_##SUF(ms_lanes_load_##SUF(x[g] + j));                           \
                }                                                                         \
            }                                                                             \
        for (int g = 0; g < GROUP; g++) {                                                 \
            double lanes[LANES];                                                          \
            memcpy(lanes, &acc[g], sizeof lanes);                                         \
            for (int64_t k = j; k < n; k++) {                                             \
                T v = residual ? x[g][k] + residual[g][k] : x[g][k];                      \
                if (residual)                                                             \
                    sum[g][k] = v;                                                        \
                lanes[0] += (double)v;                                                    \
            }                                                                             \
            total[g] = ms_lanes_total(lanes);                                                \
        }                                                                                 \
    }                                                                                     \
    /* total[g] = sum over row g of (x - mean[g])^2 */                                    \
    static void group_squared_deviations_##SUF(double total[GROUP],                       \
                                               const T *const x[GROUP],                   \
                                               const double mean[GROUP], int64_t n)       \
    {                                                                                     \
        ms_lanes_f64 acc[GROUP] = {{0}};                                                     \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES)                                                \
            for (int g = 0; g < GROUP; g++) {                                             \
                ms_lanes_f64 d = ms_lanes_wide_##SUF(ms_lanes_load_##SUF(x[g] + j)) - mean[g];                 \
                acc[g] += d * d;                                                          \
            }                                                                             \
        for (int g = 0; g < GROUP; g++) {                                                 \
            double lanes[LANES];                                                          \
            memcpy(lanes, &acc[g], sizeof lanes);                                         \
            for (int64_t k = j; k < n; k++) {                                             \
                double d = (double)x[g][k] - mean[g];                                     \
                lanes[0] += d * d;                                                        \
            }                                                                             \
            total[g] = ms_lanes_total(lanes);                                                \
        }                                                                                 \
    }                                                                                     \
    /* sum_g[g], sum_gx[g] = the sums of g = dy * weight and g * xhat over row g */        \
    static void group_backward_sums_##SUF(double sum_g[GROUP], double sum_gx[GROUP],      \
                                          const T *const x[GROUP], const T *const dy[GROUP], \
                                          const T *weight, const T mean[GROUP],           \
                                          const T rstd[GROUP], int64_t n)                 \
    {                                                                                     \
        ms_lanes_f64 acc_g[GROUP] = {{0}}, acc_gx[GROUP] = {{0}};                            \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES) {                                              \
            __typeof__(ms_lanes_load_##SUF(weight)) w = ms_lanes_load_##SUF(weight + j);                    \
            for (int g = 0; g < GROUP; g++) {                                             \
                ms_lanes_f64 xhat = ms_lanes_wide_##SUF((ms_lanes_load_##SUF(x[g] + j) - mean[g]) * rstd[g]);  \
                ms_lanes_f64 grad = ms_lanes_wide_##SUF(ms_lanes_load_##SUF(dy[g] + j) * w);                   \
                acc_g[g] += grad;                                                         \
                acc_gx[g] += grad * xhat;                                                 \
            }                                                                             \
        }                                                                                 \
        for (int g = 0; g < GROUP; g++) {                                                 \
            double lanes_g[LANES], lanes_gx[LANES];                                       \
            memcpy(lanes_g, &acc_g[g], sizeof lanes_g);                                   \
            memcpy(lanes_gx, &acc_gx[g], sizeof lanes_gx);                                \
            for (int64_t k = j; k < n; k++) {                                             \
                T xhat = (x[g][k] - mean[g]) * rstd[g];                                   \
                T grad = dy[g][k] * weight[k];                                            \
                lanes_g[0] += (double)grad;                                               \
                lanes_gx[0] += (double)grad * (double)xhat;                               \
            }                                                                             \
            sum_g[g] = ms_lanes_total(lanes_g);                                              \
            sum_gx[g] = ms_lanes_total(lanes_gx);                                            \
        }                                                                                 \
    }

GROUP_STATS(f32, float)
GROUP_STATS(f64, double)

/* The loops over one row, apart so that restrict lets them vectorise (the build has
 * -fno-strict-aliasing, so without it every store could alias every load). */
#define ROW_LOOPS(SUF, T)                                                                 \
    /* out = (x - m) * s * weight + bias, or (x - m) * s + bias without a weight */        \
    static void normalize_row_##SUF(T *restrict out, const T *restrict x,                 \
                                    const T *restrict weight, const T *restrict bias,     \
                                    T m, T s, int64_t n)                                  \
    {                                                                                     \
        if (weight)                                                                       \
            for (int64_t j = 0; j < n; j++)                                               \
                out[j] = (x[j] - m) * s * weight[j] + bias[j];                            \
        else                                                                              \
            for (int64_t j = 0; j < n; j++)                                               \
                out[j] = (x[j] - m) * s + bias[j];                                        \
    }                                                                                     \
    /* dx = rstd * (g - mean_g - xhat * mean_g_xhat), plus dsum where given */             \
    static void backward_row_##SUF(T *restrict dx, const T *restrict x,                   \
                                   const T *restrict dy, const T *restrict weight,        \
                                   const T *restrict dsum, T mean, T rstd, T mean_g,      \
                                   T mean_g_xhat, int64_t n)                              \
    {                                                                                     \
        for (int64_t j = 0; j < n; j++) {                                                 \
            T xhat = (x[j] - mean) * rstd;                                                \
            T g = dy[j] * weight[j];                                                      \
            dx[j] = rstd * (g - mean_g - xhat * mean_g_xhat);                             \
        }                                                                                 \
        if (dsum)                                                                         \
            for (int64_t j = 0; j < n; j++)                                               \
                dx[j] += dsum[j];                                                         \
    }                                                                                     \
    /* dweight += dy * xhat and dbias += dy over columns [0, n) of count rows, row by     \
     * row: each accumulator stays in a register across the rows */                        \
    static void param_grad_rows_##SUF(double *restrict dweight, double *restrict dbias,   \
                                      const T *const x[GROUP], const T *const dy[GROUP],  \
                                      const T mean[GROUP], const T rstd[GROUP],           \
                                      int count, int64_t n)                               \
    {                                                                                     \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES) {                                              \
            ms_lanes_f64 acc_w, acc_b;                                                       \
            memcpy(&acc_w, dweight + j, sizeof acc_w);                                    \
            memcpy(&acc_b, dbias + j, sizeof acc_b);                                      \
            for (int g = 0; g < count; g++) {                                             \
                ms_lanes_f64 d = ms_lanes_wide_##SUF(ms_lanes_load_##SUF(dy[g] + j));                          \
                acc_w += d * ms_lanes_wide_##SUF((ms_lanes_load_##SUF(x[g] + j) - mean[g]) * rstd[g]);      \
                acc_b += d;                                                               \
            }                                                                             \
            memcpy(dweight + j, &acc_w, sizeof acc_w);                                    \
            memcpy(dbias + j, &acc_b, sizeof acc_b);                                      \
        }                                                                                 \
        for (int g = 0; g < count; g++) /* row by row, as above */                        \
            for (int64_t k = j; k < n; k++) {                                             \
                T xhat = (x[g][k] - mean[g]) * rstd[g];                                   \
                dweight[k] += (double)dy[g][k] * (double)xhat;                            \
                dbias[k] += (double)dy[g][k];                                             \
            }                                                                             \
    }

ROW_LOOPS(f32, float)
ROW_LOOPS(f64, double)

static void store_stat(void *stats, int dtype, int64_t i, double value)
{
    if (dtype == MS_F32)
        ((float *)stats)[i] = (float)value;
    else
        ((double *)stats)[i] = value;
}

static double load_stat(const void *stats, int dtype, int64_t i)
{
    return dtype == MS_F32 ? (double)((const float *)stats)[i] : ((const double *)stats)[i];
}

typedef struct ln_args {
    int64_t rows, size;
    double eps;
    void *out, *dx, *sum;
    const void *x, *weight, *bias, *dy, *residual, *dsum;
    void *mean, *rstd;
    int dtype, mean_dtype, rstd_dtype;
    double *dweight_acc, *dbias_acc;
} ln_args;

/* The statistics of rows [first, last) in groups, then each row normalised. */
#define LN_FORWARD(SUF, T)                                                                \
    static void ln_forward_##SUF(const ln_args *a, int64_t first, int64_t last)           \
    {                                                                                     \
        const T *weight = a->weight, *bias = a->bias;                                     \
        int64_t size = a->size;                                                           \
        for (int64_t r = first; r < last; r += GROUP) {                                   \
            int64_t count = last - r < GROUP ? last - r : GROUP;                          \
            const T *x[GROUP], *residual[GROUP], *src[GROUP];                             \
            group_rows_##SUF(x, a->x, r, count, size);                                    \
            group_rows_##SUF(residual, a->residual, r, count, size);                      \
            group_rows_##SUF(src, a->residual ? a->sum : a->x, r, count, size);           \
            double total[GROUP], mean[GROUP], deviation[GROUP];                           \
            group_sums_##SUF(total, (T *const *)src, x, a->residual ? residual : NULL,    \
                             size);                                                       \
            for (int g = 0; g < GROUP; g++)                                               \
                mean[g] = total[g] / (double)size;                                        \
            group_squared_deviations_##SUF(deviation, src, mean, size);                   \
            for (int g = 0; g < count; g++) {                                             \
                double rstd = ms_k_rstd(deviation[g] / (double)size, a->eps);             \
                store_stat(a->mean, a->mean_dtype, r + g, mean[g]);                       \
                store_stat(a->rstd, a->rstd_dtype, r + g, rstd);                          \
                normalize_row_##SUF((T *)a->out + (r + g) * size, src[g], weight, bias,   \
                                    (T)mean[g], (T)rstd, size);                           \
            }                                                                             \
        }                                                                                 \
    }

/* The statistics of rows [first, last) (loaded as T) for the group at r. */
#define GROUP_LOADED_STATS(SUF, T)                                                        \
    static void group_stats_##SUF(T mean[GROUP], T rstd[GROUP], const ln_args *a,         \
                                  int64_t r, int64_t count)                               \
    {                                                                                     \
        for (int g = 0; g < GROUP; g++) {                                                 \
            int64_t row = r + (g < count ? g : count - 1);                                \
            mean[g] = (T)load_stat(a->mean, a->mean_dtype, row);                          \
            rstd[g] = (T)load_stat(a->rstd, a->rstd_dtype, row);                          \
        }                                                                                 \
    }

GROUP_LOADED_STATS(f32, float)
GROUP_LOADED_STATS(f64, double)

/* With xhat = (x - mean) * rstd and g = dy * w:
 * dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsum), row by row over [first, last). */
#define LN_BACKWARD(SUF, T)                                                               \
    static void ln_backward_##SUF(const ln_args *a, int64_t first, int64_t last)          \
    {                                                                                     \
        const T *weight = a->weight;                                                      \
        int64_t size = a->size;                                                           \
        for (int64_t r = first; r < last; r += GROUP) {                                   \
            int64_t count = last - r < GROUP ? last - r : GROUP;                          \
            const T *x[GROUP], *dy[GROUP];                                                \
            T mean[GROUP], rstd[GROUP];                                                   \
            group_rows_##SUF(x, a->x, r, count, size);                                    \
            group_rows_##SUF(dy, a->dy, r, count, size);                                  \
            group_stats_##SUF(mean, rstd, a, r, count);                                   \
            double sum_g[GROUP], sum_gx[GROUP];                                           \
            group_backward_sums_##SUF(sum_g, sum_gx, x, dy, weight, mean, rstd, size);    \
            for (int g = 0; g < count; g++)                                               \
                backward_row_##SUF((T *)a->dx + (r + g) * size, x[g], dy[g], weight,      \
                                   a->dsum ? (const T *)a->dsum + (r + g) * size : NULL,  \
                                   mean[g], rstd[g], (T)(sum_g[g] / (double)size),        \
                                   (T)(sum_gx[g] / (double)size), size);                  \
        }                                                                                 \
    }

/* dweight[j] += sum_rows dy * xhat and dbias[j] += sum_rows dy for the columns
 * [first, last), rows in order, so each column sums the same way however columns split. */
#define LN_PARAM_GRADS(SUF, T)                                                            \
    static void ln_param_grads_##SUF(const ln_args *a, int64_t first, int64_t last)       \
    {                                                                                     \
        int64_t size = a->size;                                                           \
        for (int64_t r = 0; r < a->rows; r += GROUP) {                                    \
            int64_t count = a->rows - r < GROUP ? a->rows - r : GROUP;                    \
            const T *x[GROUP], *dy[GROUP];                                                \
            T mean[GROUP], rstd[GROUP];                                                   \
            group_rows_##SUF(x, (const T *)a->x + first, r, count, size);                 \
            group_rows_##SUF(dy, (const T *)a->dy + first, r, count, size);               \
            group_stats_##SUF(mean, rstd, a, r, count);                                   \
            param_grad_rows_##SUF(a->dweight_acc + first, a->dbias_acc + first, x, dy,    \
                                  mean, rstd, (int)count, last - first);                  \
        }                                                                                 \
    }

LN_FORWARD(f32, float)
LN_FORWARD(f64, double)
LN_BACKWARD(f32, float)
LN_BACKWARD(f64, double)
LN_PARAM_GRADS(f32, float)
LN_PARAM_GRADS(f64, double)

/* Threads take whole rows (forward, dx) or whole columns (parameter gradients). */
static void forward_rows(void *arg, int64_t first, int64_t last)
{
    const ln_args *a = arg;
    if (a->dtype == MS_F32)
        ln_forward_f32(a, first, last);
    else
        ln_forward_f64(a, first, last);
}

static void backward_rows(void *arg, int64_t first, int64_t last)
{
    const ln_args *a = arg;
    if (a->dtype == MS_F32)
        ln_backward_f32(a, first, last);
    else
        ln_backward_f64(a, first, last);
}

static void param_grad_columns(void *arg, int64_t first, int64_t last)
{
    const ln_args *a = arg;
    if (a->dtype == MS_F32)
        ln_param_grads_f32(a, first, last);
    else
        ln_param_grads_f64(a, first, last);
}

/* The dense staging of up to 10 tensors of one call, released together. */
typedef struct staging {
    int count, status;
    const ms_tensor *tensors[10];
    void *owned[10];
    int is_output[10];
} staging;

/* Dense data of t (NULL for a NULL t or after an earlier failure); outputs are written back
 * by unstage_all. */
static void *stage(staging *st, const char *op, const ms_tensor *t, int is_output)
{
    if (!t || st->status != MS_OK)
        return NULL;
    void *data = NULL;
    int i = st->count++;
    st->tensors[i] = t;
    st->is_output[i] = is_output;
    st->status = ms_cpu_dense(op, t, !is_output, &data, &st->owned[i]);
    return data;
}

/* A row of size copies of value: a missing weight (1: dy * 1 == dy) or bias (-0.0: y + -0.0 == y
 * for every y, -0.0 included), so the row loops run without branches and give the same bits. */
static const void *identity_row(staging *st, const char *op, int dtype, int64_t size,
                                double value, void **owned)
{
    if (st->status != MS_OK)
        return NULL;
    st->status = ms_cpu_alloc(op, (size_t)size * ms_dtype_size(dtype), owned);
    for (int64_t j = 0; st->status == MS_OK && j < size; j++) {
        if (dtype == MS_F32)
            ((float *)*owned)[j] = (float)value;
        else
            ((double *)*owned)[j] = value;
    }
    return *owned;
}

static int unstage_all(staging *st)
{
    for (int i = 0; i < st->count; i++)
        ms_cpu_dense_done(st->tensors[i], st->owned[i], st->is_output[i] && st->status == MS_OK);
    return st->status;
}

int ms_cpu_layer_norm(ms_tensor *out, ms_tensor *mean, ms_tensor *rstd, ms_tensor *sum,
                      const ms_tensor *x, const ms_tensor *residual, const ms_tensor *weight,
                      const ms_tensor *bias, double eps, int64_t rows, int64_t size)
{
    const char *op = residual ? "add_layer_norm" : "layer_norm";
    if (rows == 0)
        return MS_OK;
    if (size == 0) { /* statistics of empty rows are 0/0 */
        MS_CHECK(ms_cpu_fill(mean, NAN));
        return ms_cpu_fill(rstd, NAN);
    }

    ln_args a = {.rows = rows, .size = size, .eps = eps, .dtype = x->dtype,
                 .mean_dtype = mean->dtype,
                 .rstd_dtype = rstd->dtype};
    staging st = {0};
    a.x = stage(&st, op, x, 0);
    a.residual = stage(&st, op, residual, 0);
    void *zero_bias = NULL;
    a.weight = stage(&st, op, weight, 0);
    a.bias = bias ? stage(&st, op, bias, 0)
                  : identity_row(&st, op, x->dtype, size, -0.0, &zero_bias);
    a.out = stage(&st, op, out, 1);
    a.sum = stage(&st, op, residual ? sum : NULL, 1);
    a.mean = stage(&st, op, mean, 1);
    a.rstd = stage(&st, op, rstd, 1);
    if (st.status == MS_OK)
        ms_parallel_for(rows, ms_parallel_ranges(rows, 4.0 * (double)rows * (double)size),
                        forward_rows, &a);
    free(zero_bias);
    return unstage_all(&st);
}

/* param_grad[j] += acc[j] through the parameter gradient's own strides. */
static int accumulate_param_grad(const char *op, ms_tensor *grad, const double *acc)
{
    void *data, *owned;
    MS_CHECK(ms_cpu_dense(op, grad, 1, &data, &owned));
    for (int64_t j = 0; j < grad->numel; j++) {
        if (grad->dtype == MS_F32)
            ((float *)data)[j] = (float)((double)((float *)data)[j] + acc[j]);
        else
            ((double *)data)[j] += acc[j];
    }
    ms_cpu_dense_done(grad, owned, 1);
    return MS_OK;
}

int ms_cpu_layer_norm_backward(ms_tensor *dx, ms_tensor *dweight, ms_tensor *dbias,
                               const ms_tensor *dy, const ms_tensor *dsum, const ms_tensor *x,
                               const ms_tensor *mean, const ms_tensor *rstd,
                               const ms_tensor *weight, int64_t rows, int64_t size)
{
    const char *op = dsum ? "add_layer_norm_backward" : "layer_norm_backward";
    if (rows == 0 || size == 0)
        return MS_OK;

    ln_args a = {.rows = rows, .size = size, .dtype = x->dtype, .mean_dtype = mean->dtype,
                 .rstd_dtype = rstd->dtype};
    int status = MS_OK, param_grads = dweight || dbias;
    if (param_grads) /* both sums, whichever is asked for */
        status = ms_cpu_alloc(op, 2 * (size_t)size * sizeof(double), (void **)&a.dweight_acc);
    if (status == MS_OK && param_grads) {
        a.dbias_acc = a.dweight_acc + size;
        for (int64_t j = 0; j < 2 * size; j++)
            a.dweight_acc[j] = 0.0;
    }
    staging st = {.status = status};
    void *unit_weight = NULL;
    a.x = stage(&st, op, x, 0);
    a.dy = stage(&st, op, dy, 0);
    a.dsum = stage(&st, op, dsum, 0);
    a.weight = weight ? stage(&st, op, weight, 0)
                      : identity_row(&st, op, x->dtype, size, 1.0, &unit_weight);
    a.mean = stage(&st, op, mean, 0);
    a.rstd = stage(&st, op, rstd, 0);
    a.dx = stage(&st, op, dx, 1);
    double work = 4.0 * (double)rows * (double)size;
    if (st.status == MS_OK)
        ms_parallel_for(rows, ms_parallel_ranges(rows, work), backward_rows, &a);
    if (st.status == MS_OK && param_grads)
        ms_parallel_for(size, ms_parallel_ranges(size, work / 2), param_grad_columns, &a);
    status = unstage_all(&st);
    if (status == MS_OK && dweight)
        status = accumulate_param_grad(op, dweight, a.dweight_acc);
    if (status == MS_OK && dbias)
        status = accumulate_param_grad(op, dbias, a.dbias_acc);
    free(a.dweight_acc);
    free(unit_weight);
    return status;
}
