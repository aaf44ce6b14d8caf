/* moonshard runtime: ms_nll_loss and ms_nll_loss_backward: argument checks (the target
 * values are checked by the kernels before they write), then the first tensor's place. */
#include "widen.h"

enum { REDUCE_NONE = 0, REDUCE_MEAN = 1, REDUCE_SUM = 2 };

/* target, dtypes, reduction and shapes; logp and per_row already checked on place. */
static int check_nll(ms_place *place, const char *op, const ms_tensor *logp,
                     const char *logp_name, const ms_tensor *target, const ms_tensor *per_row,
                     const char *per_row_name, int reduction)
{
    MS_CHECK(ms_check_input(place, op, "target", target));
    MS_CHECK(ms_check_float(op, logp_name, logp));
    MS_CHECK(ms_check_same_dtype(op, per_row_name, per_row, logp_name, logp));
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
        return ms_check_shape_is(op, per_row_name, per_row, 1, &rows);
    return ms_check_shape_is(op, per_row_name, per_row, 0, NULL);
}

int ms_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                int64_t ignore_index, int reduction)
{
    const char *op = "nll_loss";
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, op, "out", out));
    MS_CHECK(ms_check_input(&place, op, "logp", logp));
    MS_CHECK(check_nll(&place, op, logp, "logp", target, out, "out", reduction));
    if (!ms_is_half(logp->dtype))
        return place.backend->nll_loss(out, logp, target, ignore_index, reduction);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_NLL, 2, (const ms_tensor *[]){out, logp}, "wr", f));
    return ms_widen_done(&w, &place,
                         place.backend->nll_loss(f[0], f[1], target, ignore_index, reduction));
}

int ms_nll_loss_backward(ms_tensor *dlogp, const ms_tensor *dout, const ms_tensor *target,
                         int64_t ignore_index, int reduction)
{
    const char *op = "nll_loss_backward";
    ms_place place = ms_place_of(dlogp);
    MS_CHECK(ms_check_output(&place, op, "dlogp", dlogp));
    MS_CHECK(ms_check_input(&place, op, "dout", dout));
    MS_CHECK(check_nll(&place, op, dlogp, "dlogp", target, dout, "dout", reduction));
    if (!ms_is_half(dlogp->dtype))
        return place.backend->nll_loss_backward(dlogp, dout, target, ignore_index, reduction);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_NLL,
                           2, (const ms_tensor *[]){dlogp, dout}, "wr", f));
    return ms_widen_done(&w, &place,
                         place.backend->nll_loss_backward(f[0], f[1], target, ignore_index,
                                                          reduction));
}
