/* moonshard runtime: ms_nll_loss and ms_nll_loss_backward: argument checks (the target
 * values are checked by the kernels before they write), then the first tensor's place. */
#include "widen.h"

int ms_nll_loss(ms_tensor *out, const ms_tensor *logp, const ms_tensor *target,
                int64_t ignore_index, int reduction)
{
    const char *op = "nll_loss";
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, op, "out", out));
    MS_CHECK(ms_check_input(&place, op, "logp", logp));
    MS_CHECK(ms_check_class_loss(&place, op, logp, "logp", target, out, "out", reduction));
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
    MS_CHECK(ms_check_class_loss(&place, op, dlogp, "dlogp", target, dout, "dout", reduction));
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
