/* moonshard kernels: per-element optimizer updates (PyTorch's SGD, Adam and AdamW formulas).
 * Per-step scalars are made once in double; the element update runs in the param's dtype. */
#ifndef MS_KERNELS_OPTIM_H
#define MS_KERNELS_OPTIM_H

#include "common.h"

typedef struct ms_k_sgd_coeffs {
    double lr, momentum, dampening, weight_decay;
    int nesterov, first_step, maximize;
} ms_k_sgd_coeffs;

/* g = (maximize ? -grad : grad) + weight_decay * p; with momentum the buffer starts as g
 * and then follows buf = momentum * buf + (1 - dampening) * g; p -= lr * g. buf is NULL
 * when momentum == 0. */
MS_HD void ms_k_sgd_f32(float *p, float *buf, float grad, const ms_k_sgd_coeffs *c)
{
    float g = c->maximize ? -grad : grad;
    if (c->weight_decay != 0.0)
        g += (float)c->weight_decay * *p;
    if (buf) {
        float b = c->first_step ? g : (float)c->momentum * *buf + (float)(1.0 - c->dampening) * g;
        *buf = b;
        g = c->nesterov ? g + (float)c->momentum * b : b;
    }
    *p -= (float)c->lr * g;
}

MS_HD void ms_k_sgd_f64(double *p, double *buf, double grad, const ms_k_sgd_coeffs *c)
{
    double g = c->maximize ? -grad : grad;
    if (c->weight_decay != 0.0)
        g += c->weight_decay * *p;
    if (buf) {
        double b = c->first_step ? g : c->momentum * *buf + (1.0 - c->dampening) * g;
        *buf = b;
        g = c->nesterov ? g + c->momentum * b : b;
    }
    *p -= c->lr * g;
}

typedef struct ms_k_adam_coeffs {
    double beta1, beta2, eps, weight_decay;
    double step_size;    /* lr / (1 - beta1^step) */
    double bias_c2_sqrt; /* sqrt(1 - beta2^step) */
    double decay_factor; /* 1 - lr * weight_decay (AdamW) */
    int decoupled, maximize;
} ms_k_adam_coeffs;

MS_HD ms_k_adam_coeffs ms_k_adam_coeffs_make(int64_t step, double lr, double beta1,
                                             double beta2, double eps, double weight_decay,
                                             int decoupled, int maximize)
{
    ms_k_adam_coeffs c;
    c.beta1 = beta1;
    c.beta2 = beta2;
    c.eps = eps;
    c.weight_decay = weight_decay;
    c.step_size = lr / (1.0 - pow(beta1, (double)step));
    c.bias_c2_sqrt = sqrt(1.0 - pow(beta2, (double)step));
    c.decay_factor = 1.0 - lr * weight_decay;
    c.decoupled = decoupled;
    c.maximize = maximize;
    return c;
}

/* m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v)/sqrt(bc2) + eps).
 * Adam adds weight_decay * p to g; AdamW first scales p by 1 - lr * weight_decay. */
MS_HD void ms_k_adam_f32(float *p, float *m, float *v, float grad, const ms_k_adam_coeffs *c)
{
    float g = c->maximize ? -grad : grad;
    if (c->weight_decay != 0.0) {
        if (c->decoupled)
            *p *= (float)c->decay_factor;
        else
            g += (float)c->weight_decay * *p;
    }
    float m1 = (float)c->beta1 * *m + (float)(1.0 - c->beta1) * g;
    float v1 = (float)c->beta2 * *v + (float)(1.0 - c->beta2) * g * g;
    *m = m1;
    *v = v1;
    float denom = sqrtf(v1) / (float)c->bias_c2_sqrt + (float)c->eps;
    *p -= (float)c->step_size * m1 / denom;
}

MS_HD void ms_k_adam_f64(double *p, double *m, double *v, double grad, const ms_k_adam_coeffs *c)
{
    double g = c->maximize ? -grad : grad;
    if (c->weight_decay != 0.0) {
        if (c->decoupled)
            *p *= c->decay_factor;
        else
            g += c->weight_decay * *p;
    }
    double m1 = c->beta1 * *m + (1.0 - c->beta1) * g;
    double v1 = c->beta2 * *v + (1.0 - c->beta2) * g * g;
    *m = m1;
    *v = v1;
    double denom = sqrt(v1) / c->bias_c2_sqrt + c->eps;
    *p -= c->step_size * m1 / denom;
}

#endif
