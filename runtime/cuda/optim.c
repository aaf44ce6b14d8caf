/* moonshard CUDA backend: fused SGD and Adam/AdamW steps on a device, in place on the
 * parameter and its state. Checks match the CPU backend's. */
#include <math.h>

#include "cuda_internal.h"
#include "dispatch.h"
#include "optim.cuh"
#include "cpu/cpu.h"

static int check_like_param(const char *op, const char *name, const ms_tensor *t,
                            const ms_tensor *param, int written, int *device)
{
    MS_CHECK(written ? ms_cuda_output(op, name, t, device) : ms_cuda_input(op, name, t, device));
    MS_CHECK(ms_cpu_same_dtype(op, name, t, "param", param));
    return ms_cpu_same_shape(op, name, t, "param", param);
}

int ms_cuda_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad,
                     double lr, double momentum, double dampening, double weight_decay,
                     int nesterov, int first_step, int maximize)
{
    const char *op = "sgd_step";
    int device = -1;
    MS_CHECK(ms_cuda_output(op, "param", param, &device));
    MS_CHECK(ms_cpu_float(op, "param", param));
    MS_CHECK(check_like_param(op, "grad", grad, param, 0, &device));
    if (!isfinite(lr) || !isfinite(momentum) || !isfinite(dampening) || !isfinite(weight_decay))
        return MS_FAIL(MS_ERR_INVALID, "%s: lr %g, momentum %g, dampening %g and weight_decay "
                       "%g must be finite", op, lr, momentum, dampening, weight_decay);
    if (nesterov && (momentum <= 0.0 || dampening != 0.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: nesterov needs momentum > 0 and dampening 0 (got "
                       "%g and %g)", op, momentum, dampening);
    int with_buffer = momentum != 0.0;
    if (with_buffer) {
        if (!momentum_buf)
            return MS_FAIL(MS_ERR_INVALID, "%s: momentum %g needs a momentum_buf", op, momentum);
        MS_CHECK(check_like_param(op, "momentum_buf", momentum_buf, param, 1, &device));
    }
    if (param->numel == 0)
        return MS_OK;
    ms_k_sgd_coeffs c = {lr, momentum, dampening, weight_decay, nesterov != 0,
                         first_step != 0, maximize != 0};
    ms_cu_shape shape;
    ms_cu_operand p, buf = {NULL, {0}}, g;
    ms_cuda_shape_of(&shape, param->ndim, param->shape);
    MS_CHECK(ms_cuda_operand(&p, op, "param", &shape, param));
    MS_CHECK(ms_cuda_operand(&g, op, "grad", &shape, grad));
    if (with_buffer)
        MS_CHECK(ms_cuda_operand(&buf, op, "momentum_buf", &shape, momentum_buf));
    ms_cu_operand *operands[3] = {&p, &g, &buf};
    ms_cuda_coalesce(&shape, operands, with_buffer ? 3 : 2);
    return ms_cuda_launched(op, ms_cu_sgd_step(ms_cuda_compute_stream(device), &shape, p, buf,
                                               g, param->dtype, &c));
}

int ms_cuda_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                      const ms_tensor *grad, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int decoupled,
                      int maximize)
{
    const char *op = decoupled ? "adamw_step" : "adam_step";
    int device = -1;
    MS_CHECK(ms_cuda_output(op, "param", param, &device));
    MS_CHECK(ms_cpu_float(op, "param", param));
    MS_CHECK(check_like_param(op, "exp_avg", exp_avg, param, 1, &device));
    MS_CHECK(check_like_param(op, "exp_avg_sq", exp_avg_sq, param, 1, &device));
    MS_CHECK(check_like_param(op, "grad", grad, param, 0, &device));
    if (step < 1)
        return MS_FAIL(MS_ERR_INVALID, "%s: step %lld must be >= 1 (the count after the "
                       "increment)", op, (long long)step);
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
        return MS_FAIL(MS_ERR_INVALID, "%s: betas (%g, %g) must lie in [0, 1)", op, beta1,
                       beta2);
    if (!isfinite(lr) || !(eps >= 0.0) || !isfinite(weight_decay))
        return MS_FAIL(MS_ERR_INVALID, "%s: lr %g and weight_decay %g must be finite and eps "
                       "%g >= 0", op, lr, weight_decay, eps);
    if (param->numel == 0)
        return MS_OK;
    ms_k_adam_coeffs c = ms_k_adam_coeffs_make(step, lr, beta1, beta2, eps, weight_decay,
                                               decoupled != 0, maximize != 0);
    ms_cu_shape shape;
    ms_cu_operand p, m, v, g;
    ms_cuda_shape_of(&shape, param->ndim, param->shape);
    MS_CHECK(ms_cuda_operand(&p, op, "param", &shape, param));
    MS_CHECK(ms_cuda_operand(&m, op, "exp_avg", &shape, exp_avg));
    MS_CHECK(ms_cuda_operand(&v, op, "exp_avg_sq", &shape, exp_avg_sq));
    MS_CHECK(ms_cuda_operand(&g, op, "grad", &shape, grad));
    ms_cu_operand *operands[4] = {&p, &m, &v, &g};
    ms_cuda_coalesce(&shape, operands, 4);
    return ms_cuda_launched(op, ms_cu_adam_step(ms_cuda_compute_stream(device), &shape, p, m, v,
                                                g, param->dtype, &c));
}
