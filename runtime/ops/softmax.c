/* moonshard runtime: ms_softmax and ms_softmax_backward (softmax, log_softmax or safe
 * softmax along one dim): argument checks, then the kernels of the first tensor's place. */
#include "widen.h"

static int check_kind(const char *op, int kind)
{
    if (kind != MS_SOFTMAX && kind != MS_LOG_SOFTMAX && kind != MS_SAFE_SOFTMAX)
        return MS_FAIL(MS_ERR_INVALID, "%s: kind %d is not MS_SOFTMAX, MS_LOG_SOFTMAX or "
                       "MS_SAFE_SOFTMAX", op, kind);
    return MS_OK;
}

int ms_softmax(ms_tensor *out, const ms_tensor *x, int dim, int kind)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(check_kind("softmax", kind));
    MS_CHECK(ms_check_output(&place, "softmax", "out", out));
    MS_CHECK(ms_check_input(&place, "softmax", "x", x));
    MS_CHECK(ms_check_float("softmax", "x", x));
    MS_CHECK(ms_check_same_dtype("softmax", "out", out, "x", x));
    MS_CHECK(ms_check_same_shape("softmax", "out", out, "x", x));
    MS_CHECK(ms_check_dim("softmax", x, dim));
    if (!ms_is_half(x->dtype))
        return place.backend->softmax(out, x, dim, kind);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_SOFTMAX, 2, (const ms_tensor *[]){out, x}, "wr", f));
    return ms_widen_done(&w, &place, place.backend->softmax(f[0], f[1], dim, kind));
}

int ms_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                        int kind)
{
    const char *op = "softmax_backward";
    MS_CHECK(check_kind(op, kind));
    ms_place place = ms_place_of(dx);
    MS_CHECK(ms_check_output(&place, op, "dx", dx));
    MS_CHECK(ms_check_input(&place, op, "y", y));
    MS_CHECK(ms_check_input(&place, op, "dy", dy));
    MS_CHECK(ms_check_float(op, "y", y));
    MS_CHECK(ms_check_same_dtype(op, "dx", dx, "y", y));
    MS_CHECK(ms_check_same_dtype(op, "dy", dy, "y", y));
    MS_CHECK(ms_check_same_shape(op, "dx", dx, "y", y));
    MS_CHECK(ms_check_same_shape(op, "dy", dy, "y", y));
    MS_CHECK(ms_check_dim(op, y, dim));
    if (!ms_is_half(y->dtype))
        return place.backend->softmax_backward(dx, y, dy, dim, kind);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_SOFTMAX,
                           3, (const ms_tensor *[]){dx, y, dy}, "wrr", f));
    return ms_widen_done(&w, &place,
                         place.backend->softmax_backward(f[0], f[1], f[2], dim, kind));
}
