/* moonshard CPU backend: cross-entropy fused with its log_softmax, forward and backward, one
 * pass over each row of logits; the arithmetic is that of softmax.c and nll.c (bit for bit). */
#include <math.h>

#include "cpu.h"
#include "cross_entropy.h"
#include "fastmath.h"

enum { REDUCE_NONE = 0, REDUCE_MEAN = 1, REDUCE_SUM = 2 };

static int64_t target_at(const ms_tensor *target, int64_t i)
{
    const char *base = ms_tensor_data(target);
    int64_t offset = i * target->strides[0];
    return target->dtype == MS_I32 ? (int64_t)((const int32_t *)base)[offset]
                                   : ((const int64_t *)base)[offset];
}

/* One row's maximum and log(sum(exp(x - max))) (as log_softmax), and the loss at target t
 * (0 when ignored), as nll reads it from the log-probabilities. */
#define ROW_FORWARD(NAME, T, EXP, LOGP)                                                   \
    static double NAME(const T *x, int64_t len, int64_t step, int64_t t, int ignored,      \
                       T *max_out, T *log_sum_out)                                        \
    {                                                                                     \
        T max = x[0];                                                                     \
        for (int64_t k = 1; k < len; k++) {                                               \
            T v = x[k * step];                                                            \
            if (v > max || v != v)                                                        \
                max = v;                                                                  \
        }                                                                                 \
        double sum = 0.0;                                                                 \
        for (int64_t k = 0; k < len; k++)                                                 \
            sum += (double)EXP(x[k * step] - max);                                        \
        T log_sum = (T)log(sum);                                                          \
        *max_out = max;                                                                   \
        *log_sum_out = log_sum;                                                           \
        return ignored ? 0.0 : -(double)LOGP(x[t * step], max, log_sum);                  \
    }

ROW_FORWARD(row_forward_f32, float, ms_k_expf, ms_k_ce_logp_f32)
ROW_FORWARD(row_forward_f64, double, exp, ms_k_ce_logp_f64)

#define FORWARD(NAME, T, ROW)                                                             \
    static void NAME(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,           \
                     const ms_tensor *target, int64_t ignore_index, int reduction,         \
                     int64_t counted)                                                     \
    {                                                                                     \
        int64_t rows = logits->shape[0], len = logits->shape[1];                          \
        const T *x = ms_tensor_data(logits);                                              \
        T *st = ms_tensor_data(stats), *o = ms_tensor_data(out);                          \
        double total = 0.0;                                                               \
        for (int64_t i = 0; i < rows; i++) {                                              \
            int64_t t = target_at(target, i);                                             \
            T *row_stats = st + i * stats->strides[0];                                    \
            double loss = len == 0 ? 0.0                                                  \
                : ROW(x + i * logits->strides[0], len, logits->strides[1], t,             \
                      t == ignore_index, row_stats, row_stats + stats->strides[1]);       \
            if (reduction == REDUCE_NONE)                                                 \
                o[i * out->strides[0]] = (T)loss;                                         \
            else                                                                          \
                total += loss;                                                            \
        }                                                                                 \
        if (reduction == REDUCE_SUM)                                                      \
            *o = (T)total;                                                                \
        else if (reduction == REDUCE_MEAN) /* no counted target: 0/0 = NaN, as PyTorch */ \
            *o = (T)(total / (double)counted);                                            \
    }

FORWARD(forward_f32, float, row_forward_f32)
FORWARD(forward_f64, double, row_forward_f64)

int ms_cpu_cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                         const ms_tensor *target, int64_t ignore_index, int reduction)
{
    int64_t counted;
    MS_CHECK(ms_cpu_count_targets("cross_entropy", logits, target, ignore_index, &counted));
    if (logits->dtype == MS_F32)
        forward_f32(out, stats, logits, target, ignore_index, reduction, counted);
    else
        forward_f64(out, stats, logits, target, ignore_index, reduction, counted);
    return MS_OK;
}

/* dx = dy - exp(logp) * sum(dy) with dy = nll's gradient: -dout's share at the target. */
#define BACKWARD(NAME, T, EXP, LOGP, GRAD)                                                \
    static void NAME(ms_tensor *dlogits, const ms_tensor *dout, const ms_tensor *logits,  \
                     const ms_tensor *stats, const ms_tensor *target,                     \
                     int64_t ignore_index, int reduction, int64_t counted)                \
    {                                                                                     \
        int64_t rows = logits->shape[0], len = logits->shape[1];                          \
        const T *x = ms_tensor_data(logits), *st = ms_tensor_data(stats);                 \
        const T *d = ms_tensor_data(dout);                                                \
        T *dx = ms_tensor_data(dlogits);                                                  \
        double shared = reduction == REDUCE_SUM    ? (double)d[0]                         \
                        : reduction == REDUCE_MEAN ? (double)d[0] / (double)counted       \
                                                   : 0.0;                                 \
        for (int64_t i = 0; i < rows; i++) {                                              \
            int64_t t = target_at(target, i);                                             \
            T *g = dx + i * dlogits->strides[0];                                          \
            int64_t gs = dlogits->strides[1];                                             \
            if (t == ignore_index) {                                                      \
                for (int64_t k = 0; k < len; k++)                                         \
                    g[k * gs] = 0;                                                        \
                continue;                                                                 \
            }                                                                             \
            const T *row = x + i * logits->strides[0];                                    \
            int64_t xs = logits->strides[1];                                              \
            T max = st[i * stats->strides[0]];                                            \
            T log_sum = st[i * stats->strides[0] + stats->strides[1]];                    \
            double share = reduction == REDUCE_NONE ? (double)d[i * dout->strides[0]]     \
                                                    : shared;                             \
            T target_grad = (T)-share;                                                    \
            for (int64_t k = 0; k < len; k++)                                             \
                g[k * gs] = GRAD(EXP(LOGP(row[k * xs], max, log_sum)), target_grad,       \
                                 k == t);                                                 \
        }                                                                                 \
    }

BACKWARD(backward_f32, float, ms_k_expf, ms_k_ce_logp_f32, ms_k_ce_grad_f32)
BACKWARD(backward_f64, double, exp, ms_k_ce_logp_f64, ms_k_ce_grad_f64)

int ms_cpu_cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                                  const ms_tensor *logits, const ms_tensor *stats,
                                  const ms_tensor *target, int64_t ignore_index, int reduction)
{
    int64_t counted;
    MS_CHECK(ms_cpu_count_targets("cross_entropy_backward", logits, target, ignore_index,
                                  &counted));
    if (logits->dtype == MS_F32)
        backward_f32(dlogits, dout, logits, stats, target, ignore_index, reduction, counted);
    else
        backward_f64(dlogits, dout, logits, stats, target, ignore_index, reduction, counted);
    return MS_OK;
}
