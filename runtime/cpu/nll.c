/* moonshard CPU backend: negative log likelihood over log-probabilities, forward and backward.
 * Outputs are assigned (dlogp is an activation gradient). Sums accumulate in double. */
#include <math.h>

#include "cpu.h"

enum { REDUCE_NONE = 0, REDUCE_MEAN = 1, REDUCE_SUM = 2 };

static int64_t target_at(const ms_tensor *target, const char *base, int64_t i)
{
    int64_t offset = i * (target->ndim ? target->strides[0] : 0);
    return target->dtype == MS_I32 ? (int64_t)((const int32_t *)base)[offset]
                                   : ((const int64_t *)base)[offset];
}

static double load(const ms_tensor *t, const char *base, int64_t offset)
{
    return t->dtype == MS_F32 ? (double)((const float *)base)[offset]
                              : ((const double *)base)[offset];
}

static void store(const ms_tensor *t, char *base, int64_t offset, double value)
{
    if (t->dtype == MS_F32)
        ((float *)base)[offset] = (float)value;
    else
        ((double *)base)[offset] = value;
}

int ms_cpu_count_targets(const char *op, const ms_tensor *logp, const ms_tensor *target,
                         int64_t ignore_index, int64_t *counted)
{
    int64_t rows = logp->shape[0], classes = logp->shape[1];
    const char *targets = ms_tensor_data(target);
    *counted = 0;
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = target_at(target, targets, i);
        if (t == ignore_index)
            continue;
        if (t < 0 || t >= classes)
            return MS_FAIL(MS_ERR_INDEX, "%s: target %lld at row %lld is outside [0, %lld) and "
                           "is not ignore_index (%lld)", op, (long long)t, (long long)i,
                           (long long)classes, (long long)ignore_index);
        (*counted)++;
    }
    return MS_OK;
}

int ms_cpu_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                int64_t ignore_index, int reduction)
{
    int64_t counted;
    MS_CHECK(ms_cpu_count_targets("nll_loss", logp, target, ignore_index, &counted));
    int64_t rows = logp->shape[0];
    const char *logps = ms_tensor_data(logp), *targets = ms_tensor_data(target);
    char *outs = ms_tensor_data(out);
    double total = 0.0;
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = target_at(target, targets, i);
        double loss = t == ignore_index
                          ? 0.0
                          : -load(logp, logps, i * logp->strides[0] + t * logp->strides[1]);
        if (reduction == REDUCE_NONE)
            store(out, outs, i * out->strides[0], loss);
        else
            total += loss;
    }
    if (reduction == REDUCE_SUM)
        store(out, outs, 0, total);
    else if (reduction == REDUCE_MEAN) /* no counted target: 0/0 = NaN, as in PyTorch */
        store(out, outs, 0, total / (double)counted);
    return MS_OK;
}

int ms_cpu_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                         int64_t ignore_index, int reduction)
{
    int64_t counted;
    MS_CHECK(ms_cpu_count_targets("nll_loss_backward", dlogp, target, ignore_index, &counted));
    MS_CHECK(ms_cpu_fill(dlogp, 0.0));
    int64_t rows = dlogp->shape[0];
    const char *douts = ms_tensor_data(dout), *targets = ms_tensor_data(target);
    char *grads = ms_tensor_data(dlogp);
    double shared = 0.0;
    if (reduction == REDUCE_SUM)
        shared = load(dout, douts, 0);
    else if (reduction == REDUCE_MEAN)
        shared = load(dout, douts, 0) / (double)counted;
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = target_at(target, targets, i);
        if (t == ignore_index)
            continue;
        double g = reduction == REDUCE_NONE ? load(dout, douts, i * dout->strides[0]) : shared;
        store(dlogp, grads, i * dlogp->strides[0] + t * dlogp->strides[1], -g);
    }
    return MS_OK;
}
