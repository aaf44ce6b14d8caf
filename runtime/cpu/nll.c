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

/* target, dtypes, reduction and shapes; logp and per_row already checked on place. */
static int check_nll(ms_place *place, const char *op, const ms_tensor *logp,
                     const char *logp_name, const ms_tensor *target, const ms_tensor *per_row,
                     const char *per_row_name, int reduction)
{
    MS_CHECK(ms_place_input(place, op, "target", target));
    MS_CHECK(ms_cpu_float(op, logp_name, logp));
    MS_CHECK(ms_cpu_same_dtype(op, per_row_name, per_row, logp_name, logp));
    if (reduction < REDUCE_NONE || reduction > REDUCE_SUM)
        return MS_FAIL(MS_ERR_INVALID, "%s: reduction %d is not 0 (none), 1 (mean) or 2 (sum)",
                       op, reduction);
    if (target->dtype != MS_I32 && target->dtype != MS_I64)
        return MS_FAIL(MS_ERR_DTYPE, "%s: target has dtype %s; it must be i32 or i64", op,
                       ms_dtype_name(target->dtype));
    if (logp->ndim != 2 || target->ndim != 1 || target->shape[0] != logp->shape[0]) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: expected %s [N, C] and target [N], got %s and %s", op,
                       logp_name, ms_shape_str(a, sizeof a, logp->ndim, logp->shape),
                       ms_shape_str(b, sizeof b, target->ndim, target->shape));
    }
    int64_t rows = logp->shape[0];
    if (reduction == REDUCE_NONE)
        return ms_cpu_shape_is(op, per_row_name, per_row, 1, &rows);
    return ms_cpu_shape_is(op, per_row_name, per_row, 0, NULL);
}

int ms_cpu_check_nll_loss(ms_place *place, const ms_tensor *out, const ms_tensor *logp,
                          const ms_tensor *target, int reduction)
{
    const char *op = "nll_loss";
    MS_CHECK(ms_place_output(place, op, "out", out));
    MS_CHECK(ms_place_input(place, op, "logp", logp));
    return check_nll(place, op, logp, "logp", target, out, "out", reduction);
}

int ms_cpu_check_nll_loss_backward(ms_place *place, const ms_tensor *dlogp,
                                   const ms_tensor *dout, const ms_tensor *target,
                                   int reduction)
{
    const char *op = "nll_loss_backward";
    MS_CHECK(ms_place_output(place, op, "dlogp", dlogp));
    MS_CHECK(ms_place_input(place, op, "dout", dout));
    return check_nll(place, op, dlogp, "dlogp", target, dout, "dout", reduction);
}

/* Every target in [0, classes) or ignore_index; [OUT] the number that are not ignored. */
static int count_targets(const char *op, const ms_tensor *logp, const ms_tensor *target,
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

int ms_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                int64_t ignore_index, int reduction)
{
    MS_CPU_ON_DEVICE(out, ms_cuda_nll_loss(out, logp, target, ignore_index, reduction));
    ms_place place = MS_PLACE_CPU;
    MS_CHECK(ms_cpu_check_nll_loss(&place, out, logp, target, reduction));
    int64_t counted;
    MS_CHECK(count_targets("nll_loss", logp, target, ignore_index, &counted));
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

int ms_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                         int64_t ignore_index, int reduction)
{
    MS_CPU_ON_DEVICE(dlogp, ms_cuda_nll_loss_backward(dlogp, dout, target, ignore_index,
                                                             reduction));
    ms_place place = MS_PLACE_CPU;
    MS_CHECK(ms_cpu_check_nll_loss_backward(&place, dlogp, dout, target, reduction));
    int64_t counted;
    MS_CHECK(count_targets("nll_loss_backward", dlogp, target, ignore_index, &counted));
    MS_CHECK(ms_fill(dlogp, 0.0));
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
