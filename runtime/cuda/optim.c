/* moonshard CUDA backend: fused SGD and Adam/AdamW steps on a device, in place on the
 * parameter and its state, after the checks of runtime/ops/. */
#include "cuda_internal.h"
#include "optim.cuh"

int ms_cuda_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad,
                     double lr, double momentum, double dampening, double weight_decay,
                     int nesterov, int first_step, int maximize)
{
    const char *op = "sgd_step";
    int device = ms_cuda_device_of(param);
    int with_buffer = momentum != 0.0;
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
    int device = ms_cuda_device_of(param);
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
