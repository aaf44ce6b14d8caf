/* moonshard runtime: ms_softmax and ms_softmax_backward (softmax or log_softmax along one
 * dim): argument checks, then the kernels of the first tensor's place. */
#include "checks.h"

int ms_softmax(ms_tensor *out, const ms_tensor *x, int dim, int log)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, "softmax", "out", out));
    MS_CHECK(ms_check_input(&place, "softmax", "x", x));
    MS_CHECK(ms_check_float("softmax", "x", x));
    MS_CHECK(ms_check_same_dtype("softmax", "out", out, "x", x));
    MS_CHECK(ms_check_same_shape("softmax", "out", out, "x", x));
    MS_CHECK(ms_check_dim("softmax", x, dim));
    return place.backend->softmax(out, x, dim, log != 0);
}

int ms_softmax_backward(ms_tensor *dx, const ms_tensor *y, const ms_tensor *dy, int dim,
                        int log)
{
    const char *op = "softmax_backward";
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
    return place.backend->softmax_backward(dx, y, dy, dim, log != 0);
}
