/* moonshard CPU backend: layer norm over the last normalized_ndim dims, forward and backward,
 * optionally fused with a residual add (forward: sum = x + residual is written and normalised
 * in the same pass over the row; backward: dsum, the sum's own gradient, is added to dx).
 * dx is assigned; dweight and dbias are parameter gradients and accumulate (+=). */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"
#include "reduce.h"

/* Row statistics in double over 8 interleaved lanes combined pairwise: a fixed order for a
 * given row size, without serialising on one add. */
enum { LANES = 8 };

#define ROW_SUMS(SUF, T)                                                                  \
    static double row_sum_##SUF(const T *x, int64_t n)                                    \
    {                                                                                     \
        double lanes[LANES] = {0};                                                        \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES)                                                \
            for (int l = 0; l < LANES; l++)                                               \
                lanes[l] += (double)x[j + l];                                             \
        for (; j < n; j++)                                                                \
            lanes[0] += (double)x[j];                                                     \
        for (int width = LANES / 2; width > 0; width /= 2)                                \
            for (int l = 0; l < width; l++)                                               \
                lanes[l] += lanes[l + width];                                             \
        return lanes[0];                                                                  \
    }                                                                                     \
    static double row_squared_deviation_##SUF(const T *x, int64_t n, double mean)         \
    {                                                                                     \
        double lanes[LANES] = {0};                                                        \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES)                                                \
            for (int l = 0; l < LANES; l++) {                                             \
                double d = (double)x[j + l] - mean;                                       \
                lanes[l] += d * d;                                                        \
            }                                                                             \
        for (; j < n; j++) {                                                              \
            double d = (double)x[j] - mean;                                               \
            lanes[0] += d * d;                                                            \
        }                                                                                 \
        for (int width = LANES / 2; width > 0; width /= 2)                                \
            for (int l = 0; l < width; l++)                                               \
                lanes[l] += lanes[l + width];                                             \
        return lanes[0];                                                                  \
    }

ROW_SUMS(f32, float)
ROW_SUMS(f64, double)

/* sum = x + residual over one row (the fused residual add; distinct buffers), returning
 * row_sum of it: the same lanes in the same order, so the same mean as a separate pass. */
#define ADD_ROW(SUF, T)                                                                   \
    static double add_row_##SUF(T *restrict sum, const T *restrict x,                     \
                                const T *restrict residual, int64_t n)                    \
    {                                                                                     \
        double lanes[LANES] = {0};                                                        \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES)                                                \
            for (int l = 0; l < LANES; l++) {                                             \
                T v = x[j + l] + residual[j + l];                                         \
                sum[j + l] = v;                                                           \
                lanes[l] += (double)v;                                                    \
            }                                                                             \
        for (; j < n; j++) {                                                              \
            T v = x[j] + residual[j];                                                     \
            sum[j] = v;                                                                   \
            lanes[0] += (double)v;                                                        \
        }                                                                                 \
        for (int width = LANES / 2; width > 0; width /= 2)                                \
            for (int l = 0; l < width; l++)                                               \
                lanes[l] += lanes[l + width];                                             \
        return lanes[0];                                                                  \
    }

ADD_ROW(f32, float)
ADD_ROW(f64, double)

/* The loops over one row, apart so that restrict lets them vectorise (the build has
 * -fno-strict-aliasing, so without it every store could alias every load). */
#define ROW_LOOPS(SUF, T)                                                                 \
    /* out = (x - m) * s, times weight and plus bias where given */                       \
    static void normalize_row_##SUF(T *restrict out, const T *restrict x,                 \
                                    const T *restrict weight, const T *restrict bias,     \
                                    T m, T s, int64_t n)                                  \
    {                                                                                     \
        for (int64_t j = 0; j < n; j++) {                                                 \
            T y = (x[j] - m) * s;                                                         \
            if (weight)                                                                   \
                y *= weight[j];                                                           \
            if (bias)                                                                     \
                y += bias[j];                                                             \
            out[j] = y;                                                                   \
        }                                                                                 \
    }                                                                                     \
    /* sums = {sum g, sum g * xhat} with g = dy * weight, in LANES interleaved lanes */   \
    static void backward_sums_##SUF(double sums[2], const T *restrict x,                  \
                                    const T *restrict dy, const T *restrict weight,       \
                                    T mean, T rstd, int64_t n)                            \
    {                                                                                     \
        double lanes_g[LANES] = {0}, lanes_gx[LANES] = {0};                               \
        int64_t j = 0;                                                                    \
        for (; j + LANES <= n; j += LANES)                                                \
            for (int l = 0; l < LANES; l++) {                                             \
                T xhat = (x[j + l] - mean) * rstd;                                        \
                T g = weight ? dy[j + l] * weight[j + l] : dy[j + l];                     \
                lanes_g[l] += (double)g;                                                  \
                lanes_gx[l] += (double)g * (double)xhat;                                  \
            }                                                                             \
        for (; j < n; j++) {                                                              \
            T xhat = (x[j] - mean) * rstd;                                                \
            T g = weight ? dy[j] * weight[j] : dy[j];                                     \
            lanes_g[0] += (double)g;                                                      \
            lanes_gx[0] += (double)g * (double)xhat;                                      \
        }                                                                                 \
        for (int width = LANES / 2; width > 0; width /= 2)                                \
            for (int l = 0; l < width; l++) {                                             \
                lanes_g[l] += lanes_g[l + width];                                         \
                lanes_gx[l] += lanes_gx[l + width];                                       \
            }                                                                             \
        sums[0] = lanes_g[0];                                                             \
        sums[1] = lanes_gx[0];                                                            \
    }                                                                                     \
    static void backward_row_##SUF(T *restrict dx, const T *restrict x,                   \
                                   const T *restrict dy, const T *restrict weight,        \
                                   T mean, T rstd, T mean_g, T mean_g_xhat, int64_t n)    \
    {                                                                                     \
        for (int64_t j = 0; j < n; j++) {                                                 \
            T xhat = (x[j] - mean) * rstd;                                                \
            T g = weight ? dy[j] * weight[j] : dy[j];                                     \
            dx[j] = rstd * (g - mean_g - xhat * mean_g_xhat);                             \
        }                                                                                 \
    }                                                                                     \
    static void add_into_##SUF(T *restrict dx, const T *restrict dsum, int64_t n)         \
    {                                                                                     \
        for (int64_t j = 0; j < n; j++)                                                   \
            dx[j] += dsum[j];                                                             \
    }                                                                                     \
    /* dweight += dy * xhat, dbias += dy (either may be NULL) over one row's columns */    \
    static void param_grad_row_##SUF(double *restrict dweight, double *restrict dbias,    \
                                     const T *restrict x, const T *restrict dy, T mean,   \
                                     T rstd, int64_t n)                                   \
    {                                                                                     \
        for (int64_t j = 0; j < n; j++) {                                                 \
            T xhat = (x[j] - mean) * rstd;                                                \
            if (dweight)                                                                  \
                dweight[j] += (double)dy[j] * (double)xhat;                               \
            if (dbias)                                                                    \
                dbias[j] += (double)dy[j];                                                \
        }                                                                                 \
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

#define LN_FORWARD(SUF, T)                                                                \
    static void ln_forward_##SUF(const ln_args *a, int64_t first, int64_t last)           \
    {                                                                                     \
        const T *weight = a->weight, *bias = a->bias;                                     \
        for (int64_t r = first; r < last; r++) {                                          \
            const T *x = (const T *)a->x + r * a->size;                                   \
            T *out = (T *)a->out + r * a->size;                                           \
            double total;                                                                 \
            if (a->residual) {                                                            \
                T *sum = (T *)a->sum + r * a->size;                                       \
                total = add_row_##SUF(sum, x, (const T *)a->residual + r * a->size,       \
                                      a->size);                                           \
                x = sum;                                                                  \
            } else {                                                                      \
                total = row_sum_##SUF(x, a->size);                                        \
            }                                                                             \
            double mean = total / (double)a->size;                                        \
            double var = row_squared_deviation_##SUF(x, a->size, mean) / (double)a->size; \
            double rstd = ms_k_rstd(var, a->eps);                                         \
            store_stat(a->mean, a->mean_dtype, r, mean);                                  \
            store_stat(a->rstd, a->rstd_dtype, r, rstd);                                  \
            normalize_row_##SUF(out, x, weight, bias, (T)mean, (T)rstd, a->size);         \
        }                                                                                 \
    }

/* With xhat = (x - mean) * rstd and g = dy * w:
 * dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsum), row by row over [first, last). */
#define LN_BACKWARD(SUF, T)                                                               \
    static void ln_backward_##SUF(const ln_args *a, int64_t first, int64_t last)          \
    {                                                                                     \
        const T *weight = a->weight;                                                      \
        int64_t size = a->size;                                                           \
        for (int64_t r = first; r < last; r++) {                                          \
            const T *x = (const T *)a->x + r * size;                                      \
            const T *dy = (const T *)a->dy + r * size;                                    \
            T *dx = (T *)a->dx + r * size;                                                \
            T mean = (T)load_stat(a->mean, a->mean_dtype, r);                             \
            T rstd = (T)load_stat(a->rstd, a->rstd_dtype, r);                             \
            double sums[2];                                                               \
            backward_sums_##SUF(sums, x, dy, weight, mean, rstd, size);                   \
            T mean_g = (T)(sums[0] / (double)size);                                       \
            T mean_g_xhat = (T)(sums[1] / (double)size);                                  \
            backward_row_##SUF(dx, x, dy, weight, mean, rstd, mean_g, mean_g_xhat, size); \
            if (a->dsum)                                                                  \
                add_into_##SUF(dx, (const T *)a->dsum + r * size, size);                  \
        }                                                                                 \
    }

/* dweight[j] += sum_rows dy * xhat and dbias[j] += sum_rows dy for the columns
 * [first, last), rows in order, so each column sums the same way however columns split. */
#define LN_PARAM_GRADS(SUF, T)                                                            \
    static void ln_param_grads_##SUF(const ln_args *a, int64_t first, int64_t last)       \
    {                                                                                     \
        int64_t size = a->size;                                                           \
        double *dweight = a->dweight_acc, *dbias = a->dbias_acc;                          \
        for (int64_t r = 0; r < a->rows; r++) {                                           \
            const T *x = (const T *)a->x + r * size;                                      \
            const T *dy = (const T *)a->dy + r * size;                                    \
            T mean = (T)load_stat(a->mean, a->mean_dtype, r);                             \
            T rstd = (T)load_stat(a->rstd, a->rstd_dtype, r);                             \
            param_grad_row_##SUF(dweight ? dweight + first : NULL,                        \
                                 dbias ? dbias + first : NULL, x + first, dy + first,     \
                                 mean, rstd, last - first);                               \
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
    a.weight = stage(&st, op, weight, 0);
    a.bias = stage(&st, op, bias, 0);
    a.out = stage(&st, op, out, 1);
    a.sum = stage(&st, op, residual ? sum : NULL, 1);
    a.mean = stage(&st, op, mean, 1);
    a.rstd = stage(&st, op, rstd, 1);
    if (st.status == MS_OK)
        ms_parallel_for(rows, ms_parallel_ranges(rows, 4.0 * (double)rows * (double)size),
                        forward_rows, &a);
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
    int status = MS_OK;
    if (dweight)
        status = ms_cpu_alloc(op, (size_t)size * sizeof(double), (void **)&a.dweight_acc);
    if (status == MS_OK && dbias)
        status = ms_cpu_alloc(op, (size_t)size * sizeof(double), (void **)&a.dbias_acc);
    for (int64_t j = 0; status == MS_OK && j < size; j++) {
        if (a.dweight_acc)
            a.dweight_acc[j] = 0.0;
        if (a.dbias_acc)
            a.dbias_acc[j] = 0.0;
    }
    staging st = {.status = status};
    a.x = stage(&st, op, x, 0);
    a.dy = stage(&st, op, dy, 0);
    a.dsum = stage(&st, op, dsum, 0);
    a.weight = stage(&st, op, weight, 0);
    a.mean = stage(&st, op, mean, 0);
    a.rstd = stage(&st, op, rstd, 0);
    a.dx = stage(&st, op, dx, 1);
    double work = 4.0 * (double)rows * (double)size;
    if (st.status == MS_OK)
        ms_parallel_for(rows, ms_parallel_ranges(rows, work), backward_rows, &a);
    if (st.status == MS_OK && (a.dweight_acc || a.dbias_acc))
        ms_parallel_for(size, ms_parallel_ranges(size, work / 2), param_grad_columns, &a);
    status = unstage_all(&st);
    if (status == MS_OK && dweight)
        status = accumulate_param_grad(op, dweight, a.dweight_acc);
    if (status == MS_OK && dbias)
        status = accumulate_param_grad(op, dbias, a.dbias_acc);
    free(a.dweight_acc);
    free(a.dbias_acc);
    return status;
}
