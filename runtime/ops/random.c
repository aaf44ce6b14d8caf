/* moonshard runtime: counter-based ms_rand_uniform, ms_rand_normal and inverted dropout:
 * argument checks, then the kernels of the first tensor's place. */
#include <math.h>

#include "widen.h"

/* out is a float tensor on place. */
static int check_draw(ms_place *place, const char *op, const ms_tensor *out)
{
    MS_CHECK(ms_check_output(place, op, "out", out));
    return ms_check_float(op, "out", out);
}

int ms_rand_uniform(ms_tensor *out, double low, double high, uint64_t seed, uint64_t offset)
{
    ms_place place = ms_place_of(out);
    if (!(isfinite(low) && isfinite(high) && low <= high))
        return MS_FAIL(MS_ERR_INVALID, "rand_uniform: need finite low <= high, got %g and %g",
                       low, high);
    MS_CHECK(check_draw(&place, "rand_uniform", out));
    if (!ms_is_half(out->dtype))
        return place.backend->rand_uniform(out, low, high, seed, offset);
    ms_widened w = {0};
    ms_tensor *f[1];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_RANDOM, 1, (const ms_tensor *[]){out}, "w", f));
    return ms_widen_done(&w, &place, place.backend->rand_uniform(f[0], low, high, seed, offset));
}

int ms_rand_normal(ms_tensor *out, double mean, double std, uint64_t seed, uint64_t offset)
{
    ms_place place = ms_place_of(out);
    if (!(isfinite(mean) && isfinite(std) && std >= 0.0))
        return MS_FAIL(MS_ERR_INVALID, "rand_normal: need finite mean and std >= 0, got %g "
                       "and %g", mean, std);
    MS_CHECK(check_draw(&place, "rand_normal", out));
    if (!ms_is_half(out->dtype))
        return place.backend->rand_normal(out, mean, std, seed, offset);
    ms_widened w = {0};
    ms_tensor *f[1];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_RANDOM, 1, (const ms_tensor *[]){out}, "w", f));
    return ms_widen_done(&w, &place, place.backend->rand_normal(f[0], mean, std, seed, offset));
}

/* op is dropout (out, x) or dropout_backward (dx, dy). */
static int check_dropout(ms_place *place, const char *op, const ms_tensor *out,
                         const char *out_name, const ms_tensor *x, const char *x_name, double p)
{
    MS_CHECK(ms_check_output(place, op, out_name, out));
    MS_CHECK(ms_check_input(place, op, x_name, x));
    MS_CHECK(ms_check_float(op, x_name, x));
    MS_CHECK(ms_check_same_dtype(op, out_name, out, x_name, x));
    MS_CHECK(ms_check_same_shape(op, out_name, out, x_name, x));
    if (!(p >= 0.0 && p <= 1.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: p %g outside [0, 1]", op, p);
    return MS_OK;
}

int ms_dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed, uint64_t offset)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(check_dropout(&place, "dropout", out, "out", x, "x", p));
    if (!ms_is_half(x->dtype))
        return place.backend->dropout(out, x, p, seed, offset);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_RANDOM, 2, (const ms_tensor *[]){out, x}, "wr", f));
    return ms_widen_done(&w, &place, place.backend->dropout(f[0], f[1], p, seed, offset));
}

int ms_dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                        uint64_t offset)
{
    ms_place place = ms_place_of(dx);
    MS_CHECK(check_dropout(&place, "dropout_backward", dx, "dx", dy, "dy", p));
    if (!ms_is_half(dy->dtype))
        return place.backend->dropout_backward(dx, dy, p, seed, offset);
    ms_widened w = {0};
    ms_tensor *f[2];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_RANDOM, 2, (const ms_tensor *[]){dx, dy}, "wr", f));
    return ms_widen_done(&w, &place, place.backend->dropout_backward(f[0], f[1], p, seed, offset));
}
