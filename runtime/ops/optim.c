/* moonshard runtime: the fused ms_sgd_step and ms_adam_step: argument checks, then the
 * kernels of the parameter's place. */
#include <math.h>
#include <stdio.h>

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

/* One parameter's operands on place, and the step's scalars. */
static int check_adam(ms_place *place, const char *op, ms_tensor *param, ms_tensor *exp_avg,
                      ms_tensor *exp_avg_sq, const ms_tensor *grad)
{
    MS_CHECK(ms_check_output(place, op, "param", param));
    MS_CHECK(ms_check_float(op, "param", param));
    MS_CHECK(check_like_param(place, op, "exp_avg", exp_avg, param, 1));
    MS_CHECK(check_like_param(place, op, "exp_avg_sq", exp_avg_sq, param, 1));
    return check_like_param(place, op, "grad", grad, param, 0);
}

static int check_adam_scalars(const char *op, int64_t step, double lr, double beta1,
                              double beta2, double eps, double weight_decay)
{
    if (step < 1)
        return MS_FAIL(MS_ERR_INVALID, "%s: step %lld must be >= 1 (the count after the "
                       "increment)", op, (long long)step);
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: betas (%g, %g) must lie in [0, 1)", op, beta1,
                       beta2);
    if (!isfinite(lr) || !(eps >= 0.0) || !isfinite(weight_decay))
        return MS_FAIL(MS_ERR_INVALID, "%s: lr %g and weight_decay %g must be finite and eps "
                       "%g >= 0", op, lr, weight_decay, eps);
    return MS_OK;
}

/* The step of one checked parameter on place. */
static int adam_one(ms_place *place, ms_tensor *param, ms_tensor *exp_avg,
                    ms_tensor *exp_avg_sq, const ms_tensor *grad, int64_t step, double lr,
                    double beta1, double beta2, double eps, double weight_decay,
                    int decoupled, int maximize)
{
    if (!ms_is_half(param->dtype))
        return place->backend->adam_step(param, exp_avg, exp_avg_sq, grad, step, lr, beta1,
                                         beta2, eps, weight_decay, decoupled, maximize);
    ms_widened w = {0};
    ms_tensor *f[4];
    MS_CHECK(ms_widen_each(&w, place, MS_HALF_OPTIM, 4,
                           (const ms_tensor *[]){param, exp_avg, exp_avg_sq, grad}, "bbbr", f));
    return ms_widen_done(&w, place,
                         place->backend->adam_step(f[0], f[1], f[2], f[3], step, lr, beta1,
                                                   beta2, eps, weight_decay, decoupled,
                                                   maximize));
}

int ms_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                 const ms_tensor *grad, int64_t step, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int decoupled, int maximize)
{
    const char *op = decoupled ? "adamw_step" : "adam_step";
    ms_place place = ms_place_of(param);
    MS_CHECK(check_adam(&place, op, param, exp_avg, exp_avg_sq, grad));
    MS_CHECK(check_adam_scalars(op, step, lr, beta1, beta2, eps, weight_decay));
    return adam_one(&place, param, exp_avg, exp_avg_sq, grad, step, lr, beta1, beta2, eps,
                    weight_decay, decoupled, maximize);
}

/* 1 when the backend can step all count parameters in one call: every operand dense, one
 * dtype, f32 or f64, and no parameter's memory meeting another's (stepped one after the
 * other, as count calls would, they may). */
static int steps_together(const ms_place *place, int count, ms_tensor *const *params,
                          ms_tensor *const *exp_avgs, ms_tensor *const *exp_avg_sqs,
                          const ms_tensor *const *grads)
{
    if (!place->backend->adam_step_many || count < 2)
        return 0;
    int dtype = params[0]->dtype;
    if (dtype != MS_F32 && dtype != MS_F64)
        return 0;
    for (int i = 0; i < count; i++)
        if (params[i]->dtype != dtype || !ms_tensor_is_contiguous(params[i]) ||
            !ms_tensor_is_contiguous(exp_avgs[i]) || !ms_tensor_is_contiguous(exp_avg_sqs[i]) ||
            !ms_tensor_is_contiguous(grads[i]))
            return 0;
    for (int i = 0; i < count; i++)
        for (int j = 0; j < i; j++)
            if (ms_tensors_overlap(params[i], params[j]) ||
                ms_tensors_overlap(exp_avgs[i], exp_avgs[j]) ||
                ms_tensors_overlap(exp_avg_sqs[i], exp_avg_sqs[j]))
                return 0;
    return 1;
}

int ms_adam_step_many(int count, ms_tensor *const *params, ms_tensor *const *exp_avgs,
                      ms_tensor *const *exp_avg_sqs, const ms_tensor *const *grads, int64_t step,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      int decoupled, int maximize)
{
    const char *op = decoupled ? "adamw_step_many" : "adam_step_many";
    if (count < 0 || (count > 0 && (!params || !exp_avgs || !exp_avg_sqs || !grads)))
        return MS_FAIL(MS_ERR_INVALID, "%s: count %d must be >= 0 and the arrays given", op,
                       count);
    MS_CHECK(check_adam_scalars(op, step, lr, beta1, beta2, eps, weight_decay));
    if (count == 0)
        return MS_OK;
    for (int i = 0; i < count; i++)
        if (!params[i] || !exp_avgs[i] || !exp_avg_sqs[i] || !grads[i])
            return MS_FAIL(MS_ERR_INVALID, "%s: parameter %d has a NULL operand", op, i);
    ms_place place = ms_place_of(params[0]);
    for (int i = 0; i < count; i++) {
        int status = check_adam(&place, op, params[i], exp_avgs[i], exp_avg_sqs[i], grads[i]);
        if (status != MS_OK) { /* the message again, naming the parameter */
            char message[512];
            snprintf(message, sizeof message, "%s", ms_last_error());
            return MS_FAIL(status, "%s (parameter %d)", message, i);
        }
    }
    if (steps_together(&place, count, params, exp_avgs, exp_avg_sqs, grads))
        return place.backend->adam_step_many(count, params, exp_avgs, exp_avg_sqs, grads, step,
                                             lr, beta1, beta2, eps, weight_decay, decoupled,
                                             maximize);
    for (int i = 0; i < count; i++)
        MS_CHECK(adam_one(&place, params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], step, lr,
                          beta1, beta2, eps, weight_decay, decoupled, maximize));
    return MS_OK;
}
