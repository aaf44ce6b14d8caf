/* moonshard runtime: ms_cross_entropy and ms_cross_entropy_backward: argument checks (target
 * values are checked by the kernels before they write), then the first tensor's place. */
#include "widen.h"

enum { REDUCE_NONE = 0, REDUCE_SUM = 2 };

/* logits [N, C], target [N] i32/i64, stats [N, 2] and per_row (out or dout) of the logits'
 * dtype and the reduction's shape; logits, stats and per_row already checked on place. */
static int check_cross_entropy(ms_place *place, const char *op, const ms_tensor *logits,
                               const ms_tensor *stats, const ms_tensor *target,
                               const ms_tensor *per_row, const char *per_row_name,
                               int reduction)
{
    MS_CHECK(ms_check_input(place, op, "target", target));
    MS_CHECK(ms_check_float(op, "logits", logits));
    MS_CHECK(ms_check_same_dtype(op, "stats", stats, "logits", logits));
    MS_CHECK(ms_check_same_dtype(op, per_row_name, per_row, "logits", logits));
    if (reduction < REDUCE_NONE || reduction > REDUCE_SUM)
        return MS_FAIL(MS_ERR_INVALID, "%s: reduction %d is not 0 (none), 1 (mean) or 2 (sum)",
                       op, reduction);
    if (target->dtype != MS_I32 && target->dtype != MS_I64)
        return MS_FAIL(MS_ERR_DTYPE, "%s: target has dtype %s; it must be i32 or i64", op,
                       ms_dtype_name(target->dtype));
    if (logits->ndim != 2 || target->ndim != 1 || target->shape[0] != logits->shape[0]) {
        char a[160], b[160];
        return MS_FAIL(MS_ERR_SHAPE, "%s: expected logits [N, C] and target [N], got %s and %s",
                       op, ms_shape_str(a, sizeof a, logits->ndim, logits->shape),
                       ms_shape_str(b, sizeof b, target->ndim, target->shape));
    }
    int64_t rows = logits->shape[0];
    MS_CHECK(ms_check_shape_is(op, "stats", stats, 2, (const int64_t[]){rows, 2}));
    if (reduction == REDUCE_NONE)
        return ms_check_shape_is(op, per_row_name, per_row, 1, &rows);
    return ms_check_shape_is(op, per_row_name, per_row, 0, NULL);
}

int ms_cross_entropy(ms_tensor *out, ms_tensor *stats, const ms_tensor *logits,
                     const ms_tensor *target, int64_t ignore_index, int reduction)
{
    const char *op = "cross_entropy";
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, op, "out", out));
    MS_CHECK(ms_check_output(&place, op, "stats", stats));
    MS_CHECK(ms_check_input(&place, op, "logits", logits));
    MS_CHECK(check_cross_entropy(&place, op, logits, stats, target, out, "out", reduction));
    if (!ms_is_half(logits->dtype))
        return place.backend->cross_entropy(out, stats, logits, target, ignore_index,
                                            reduction);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_CROSS_ENTROPY, 3, (const ms_tensor *[]){out, stats, logits}, "wwr", f));
    return ms_widen_done(&w, &place, place.backend->cross_entropy(f[0], f[1], f[2], target,
                                                                  ignore_index, reduction));
}

int ms_cross_entropy_backward(ms_tensor *dlogits, const ms_tensor *dout,
                              const ms_tensor *logits, const ms_tensor *stats,
                              const ms_tensor *target, int64_t ignore_index, int reduction)
{
    const char *op = "cross_entropy_backward";
    ms_place place = ms_place_of(dlogits);
    MS_CHECK(ms_check_output(&place, op, "dlogits", dlogits));
    MS_CHECK(ms_check_input(&place, op, "dout", dout));
    MS_CHECK(ms_check_input(&place, op, "logits", logits));
    MS_CHECK(ms_check_input(&place, op, "stats", stats));
    MS_CHECK(check_cross_entropy(&place, op, logits, stats, target, dout, "dout", reduction));
    MS_CHECK(ms_check_same_shape(op, "dlogits", dlogits, "logits", logits));
    MS_CHECK(ms_check_same_dtype(op, "dlogits", dlogits, "logits", logits));
    if (!ms_is_half(logits->dtype))
        return place.backend->cross_entropy_backward(dlogits, dout, logits, stats, target,
                                                     ignore_index, reduction);
    ms_widened w = {0};
    ms_tensor *f[4];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_CROSS_ENTROPY, 4, (const ms_tensor *[]){dlogits, dout, logits, stats},
                           "wrrr", f));
    return ms_widen_done(&w, &place,
                         place.backend->cross_entropy_backward(f[0], f[1], f[2], f[3], target,
                                                               ignore_index, reduction));
}
