/* moonshard runtime: the fused ms_sgd_step and ms_adam_step: argument checks, then the
 * kernels of the parameter's place. */
#include <math.h>

#include "widen.h"

/* A state tensor (buffer or gradient) matching param in dtype and shape. */
static int check_like_param(ms_place *place, const char *op, const char *name,
                            const ms_tensor *t, const ms_tensor *param, int written)
{
    MS_CHECK(written ? ms_check_output(place, op, name, t) : ms_check_input(place, op, name, t));
    MS_CHECK(ms_check_same_dtype(op, name, t, "param", param));
    return ms_check_same_shape(op, name, t, "param", param);
}

int ms_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad, double lr,
                double momentum, double dampening, double weight_decay, int nesterov,
                int first_step, int maximize)
{
    const char *op = "sgd_step";
    ms_place place = ms_place_of(param);
    MS_CHECK(ms_check_output(&place, op, "param", param));
    MS_CHECK(ms_check_float(op, "param", param));
    MS_CHECK(check_like_param(&place, op, "grad", grad, param, 0));
    if (!isfinite(lr) || !isfinite(momentum) || !isfinite(dampening) || !isfinite(weight_decay))
        return MS_FAIL(MS_ERR_INVALID, "%s: lr %g, momentum %g, dampening %g and weight_decay "
                       "%g must be finite", op, lr, momentum, dampening, weight_decay);
    if (nesterov && (momentum <= 0.0 || dampening != 0.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: nesterov needs momentum > 0 and dampening 0 (got "
                       "%g and %g)", op, momentum, dampening);
    if (momentum != 0.0) {
        if (!momentum_buf)
            return MS_FAIL(MS_ERR_INVALID, "%s: momentum %g needs a momentum_buf", op, momentum);
        MS_CHECK(check_like_param(&place, op, "momentum_buf", momentum_buf, param, 1));
    }
    ms_tensor *buf = momentum != 0.0 ? momentum_buf : NULL;
    if (!ms_is_half(param->dtype))
        return place.backend->sgd_step(param, buf, grad, lr, momentum, dampening, weight_decay,
                                       nesterov, first_step, maximize);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_OPTIM,
                           3, (const ms_tensor *[]){param, buf, grad}, "bbr", f));
    return ms_widen_done(&w, &place,
                         place.backend->sgd_step(f[0], f[1], f[2], lr, momentum, dampening,
                                                 weight_decay, nesterov, first_step, maximize));
}

int ms_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                 const ms_tensor *grad, int64_t step, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int decoupled, int maximize)
{
    const char *op = decoupled ? "adamw_step" : "adam_step";
    ms_place place = ms_place_of(param);
    MS_CHECK(ms_check_output(&place, op, "param", param));
    MS_CHECK(ms_check_float(op, "param", param));
    MS_CHECK(check_like_param(&place, op, "exp_avg", exp_avg, param, 1));
    MS_CHECK(check_like_param(&place, op, "exp_avg_sq", exp_avg_sq, param, 1));
    MS_CHECK(check_like_param(&place, op, "grad", grad, param, 0));
    if (step < 1)
        return MS_FAIL(MS_ERR_INVALID, "%s: step %lld must be >= 1 (the count after the "
                       "increment)", op, (long long)step);
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: betas (%g, %g) must lie in [0, 1)", op, beta1,
                       beta2);
    if (!isfinite(lr) || !(eps >= 0.0) || !isfinite(weight_decay))
        return MS_FAIL(MS_ERR_INVALID, "%s: lr %g and weight_decay %g must be finite and eps "
                       "%g >= 0", op, lr, weight_decay, eps);
    if (!ms_is_half(param->dtype))
        return place.backend->adam_step(param, exp_avg, exp_avg_sq, grad, step, lr, beta1,
                                        beta2, eps, weight_decay, decoupled, maximize);
    ms_widened w = {0};
    ms_tensor *f[4];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_OPTIM, 4,
                           (const ms_tensor *[]){param, exp_avg, exp_avg_sq, grad}, "bbbr", f));
    return ms_widen_done(&w, &place,
                         place.backend->adam_step(f[0], f[1], f[2], f[3], step, lr, beta1, beta2,
                                                  eps, weight_decay, decoupled, maximize));
}
