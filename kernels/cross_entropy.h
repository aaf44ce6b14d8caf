/* moonshard kernels: the element math of cross-entropy fused with its log_softmax, shared by
 * the CPU and CUDA kernels; it is log_softmax's and nll's own arithmetic, step for step. */
#ifndef MS_KERNELS_CROSS_ENTROPY_H
#define MS_KERNELS_CROSS_ENTROPY_H

#include "common.h"

/* log-probability of x in a row with maximum max and log_sum = log(sum(exp(v - max))). */
MS_HD float ms_k_ce_logp_f32(float x, float max, float log_sum) { return (x - max) - log_sum; }
MS_HD double ms_k_ce_logp_f64(double x, double max, double log_sum)
{
    return (x - max) - log_sum;
}

/* d loss / d x of one element whose log-probability has exponential e, when the row's loss
 * gradient at its target is target_grad (= -dout): log_softmax's backward of nll's gradient,
 * target_grad at the target and 0 elsewhere. */
MS_HD float ms_k_ce_grad_f32(float e, float target_grad, int is_target)
{
    float dy = is_target ? target_grad : 0.0f;
    return dy - e * target_grad;
}
MS_HD double ms_k_ce_grad_f64(double e, double target_grad, int is_target)
{
    double dy = is_target ? target_grad : 0.0;
    return dy - e * target_grad;
}

#endif
