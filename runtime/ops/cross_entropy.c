/* moonshard runtime: ms_cross_entropy and ms_cross_entropy_backward: argument checks (target
 * values are checked by the kernels before they write), then the first tensor's place. */
#include "widen.h"

/* logits [N, C], target [N] i32/i64, stats [N, 2] and per_row (out or dout) of the logits'
 * dtype and the reduction's shape; logits, stats and per_row already checked on place. */
static int check_cross_entropy(ms_place *place, const char *op, const ms_tensor *logits,
                               const ms_tensor *stats, const ms_tensor *target,
                               const ms_tensor *per_row, const char *per_row_name,
                               int reduction)
{
    MS_CHECK(ms_check_class_loss(place, op, logits, "logits", target, per_row, per_row_name,
                                 reduction));
    MS_CHECK(ms_check_same_dtype(op, "stats", stats, "logits", logits));
    int64_t rows = logits->shape[0];
    return ms_check_shape_is(op, "stats", stats, 2, (const int64_t[]){rows, 2});
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
