/* moonshard CPU backend: fused SGD and Adam/AdamW steps, in place on the parameter.
 * grad is read, never written; param and the optimizer state are updated element-wise. */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"
#include "optim.h"

/* Operands: param, then the state buffers, then grad last. */
#define SGD_KERNEL(NAME, T, UPDATE, WITH_BUFFER)                                          \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        const ms_k_sgd_coeffs *c = ctx;                                                   \
        T *param = (T *)p[0];                                                             \
        T *buf = WITH_BUFFER ? (T *)p[1] : NULL;                                          \
        const T *grad = (const T *)p[WITH_BUFFER ? 2 : 1];                                \
        int64_t sp = s[0], sb = WITH_BUFFER ? s[1] : 0, sg = s[WITH_BUFFER ? 2 : 1];      \
        for (int64_t i = 0; i < n; i++)                                                   \
            UPDATE(param + i * sp, WITH_BUFFER ? buf + i * sb : NULL, grad[i * sg], c);   \
    }

SGD_KERNEL(sgd_f32, float, ms_k_sgd_f32, 0)
SGD_KERNEL(sgd_f64, double, ms_k_sgd_f64, 0)
SGD_KERNEL(sgd_momentum_f32, float, ms_k_sgd_f32, 1)
SGD_KERNEL(sgd_momentum_f64, double, ms_k_sgd_f64, 1)

#define ADAM_KERNEL(NAME, T, UPDATE)                                                      \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        const ms_k_adam_coeffs coeffs = *(const ms_k_adam_coeffs *)ctx, *c = &coeffs;     \
        T *param = (T *)p[0], *m = (T *)p[1], *v = (T *)p[2];                             \
        const T *grad = (const T *)p[3];                                                  \
        if (s[0] == 1 && s[1] == 1 && s[2] == 1 && s[3] == 1) {                           \
            /* the operands never overlap: restrict lets the dense loop vectorise */       \
            T *restrict dense_param = param, *restrict dense_m = m, *restrict dense_v = v;  \
            const T *restrict dense_grad = grad;                                          \
            for (int64_t i = 0; i < n; i++)                                               \
                UPDATE(dense_param + i, dense_m + i, dense_v + i, dense_grad[i], c);      \
        } else {                                                                          \
            for (int64_t i = 0; i < n; i++)                                               \
                UPDATE(param + i * s[0], m + i * s[1], v + i * s[2], grad[i * s[3]], c);  \
        }                                                                                 \
    }

ADAM_KERNEL(adam_f32, float, ms_k_adam_f32)
ADAM_KERNEL(adam_f64, double, ms_k_adam_f64)

int ms_cpu_sgd_step(ms_tensor *param, ms_tensor *momentum_buf, const ms_tensor *grad, double lr,
                double momentum, double dampening, double weight_decay, int nesterov,
                int first_step, int maximize)
{
    const char *op = "sgd_step";
    int with_buffer = momentum != 0.0;
    ms_k_sgd_coeffs c = {lr, momentum, dampening, weight_decay, nesterov != 0,
                         first_step != 0, maximize != 0};
    ms_iter it;
    ms_iter_begin(&it, param->ndim, param->shape);
    MS_CHECK(ms_iter_tensor(&it, op, "param", param));
    if (with_buffer)
        MS_CHECK(ms_iter_tensor(&it, op, "momentum_buf", momentum_buf));
    MS_CHECK(ms_iter_tensor(&it, op, "grad", grad));
    ms_iter_fn fn = param->dtype == MS_F32 ? (with_buffer ? sgd_momentum_f32 : sgd_f32)
                                           : (with_buffer ? sgd_momentum_f64 : sgd_f64);
    it.any_order = 1;
    it.cost = 2;
    ms_iter_run(&it, fn, &c);
    return MS_OK;
}

int ms_cpu_adam_step(ms_tensor *param, ms_tensor *exp_avg, ms_tensor *exp_avg_sq,
                 const ms_tensor *grad, int64_t step, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int decoupled, int maximize)
{
    const char *op = decoupled ? "adamw_step" : "adam_step";
    ms_k_adam_coeffs c = ms_k_adam_coeffs_make(step, lr, beta1, beta2, eps, weight_decay,
                                               decoupled != 0, maximize != 0);
    ms_iter it;
    ms_iter_begin(&it, param->ndim, param->shape);
    MS_CHECK(ms_iter_tensor(&it, op, "param", param));
    MS_CHECK(ms_iter_tensor(&it, op, "exp_avg", exp_avg));
    MS_CHECK(ms_iter_tensor(&it, op, "exp_avg_sq", exp_avg_sq));
    MS_CHECK(ms_iter_tensor(&it, op, "grad", grad));
    it.any_order = 1;
    it.cost = 8; /* four streams and a square root per element */
    ms_iter_run(&it, param->dtype == MS_F32 ? adam_f32 : adam_f64, &c);
    return MS_OK;
}

/* Several parameters as one run of elements: parameter i holds elements [starts[i],
 * starts[i + 1]); a thread's range may span parameters. */
typedef struct adam_many_job {
    int count;
    ms_tensor *const *params, *const *exp_avgs, *const *exp_avg_sqs;
    const ms_tensor *const *grads;
    const int64_t *starts;
    ms_iter_fn kernel;
    ms_k_adam_coeffs coeffs;
} adam_many_job;

static void adam_many_range(void *ctx, int64_t begin, int64_t end)
{
    const adam_many_job *j = ctx;
    int lo = 0, hi = j->count - 1; /* the parameter holding element begin */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (j->starts[mid] <= begin)
            lo = mid;
        else
            hi = mid - 1;
    }
    static const int64_t dense[4] = {1, 1, 1, 1};
    for (int i = lo; i < j->count && j->starts[i] < end; i++) {
        int64_t first = begin > j->starts[i] ? begin - j->starts[i] : 0;
        int64_t last = (end < j->starts[i + 1] ? end : j->starts[i + 1]) - j->starts[i];
        if (last <= first)
            continue;
        size_t size = ms_dtype_size(j->params[i]->dtype);
        char *p[4] = {(char *)ms_tensor_data(j->params[i]) + first * (int64_t)size,
                      (char *)ms_tensor_data(j->exp_avgs[i]) + first * (int64_t)size,
                      (char *)ms_tensor_data(j->exp_avg_sqs[i]) + first * (int64_t)size,
                      (char *)ms_tensor_data(j->grads[i]) + first * (int64_t)size};
        j->kernel((void *)&j->coeffs, last - first, p, dense);
    }
}

int ms_cpu_adam_step_many(int count, ms_tensor *const *params, ms_tensor *const *exp_avgs,
                          ms_tensor *const *exp_avg_sqs, const ms_tensor *const *grads,
                          int64_t step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int decoupled, int maximize)
{
    const char *op = decoupled ? "adamw_step_many" : "adam_step_many";
    int64_t *starts = NULL;
    MS_CHECK(ms_cpu_alloc(op, (size_t)(count + 1) * sizeof(int64_t), (void **)&starts));
    starts[0] = 0;
    for (int i = 0; i < count; i++)
        starts[i + 1] = starts[i] + params[i]->numel;
    adam_many_job job = {count, params, exp_avgs, exp_avg_sqs, grads, starts,
                         params[0]->dtype == MS_F32 ? adam_f32 : adam_f64,
                         ms_k_adam_coeffs_make(step, lr, beta1, beta2, eps, weight_decay,
                                               decoupled != 0, maximize != 0)};
    int64_t total = starts[count];
    if (total > 0)
        ms_parallel_for(total, ms_parallel_ranges(total, 8.0 * (double)total), adam_many_range,
                        &job);
    free(starts);
    return MS_OK;
}
