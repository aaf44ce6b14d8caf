/* moonshard kernels: the inner steps of reductions and of the normalisations built on them.
 * Sums accumulate in double; max and min propagate NaN like PyTorch. */
#ifndef MS_KERNELS_REDUCE_H
#define MS_KERNELS_REDUCE_H

#include "common.h"

MS_HD double ms_k_sum_step(double acc, double x) { return acc + x; }
MS_HD double ms_k_sumsq_step(double acc, double x) { return acc + x * x; }
/* A NaN seen once stays: x > NaN and NaN > acc are false, so the NaN test decides. */
MS_HD double ms_k_max_step(double acc, double x) { return (x > acc || x != x) ? x : acc; }
MS_HD double ms_k_min_step(double acc, double x) { return (x < acc || x != x) ? x : acc; }

/* Argmax step: returns 1 when x replaces best (strictly greater, or the first NaN), so
 * the first maximum wins ties. */
MS_HD int ms_k_argmax_better(double x, double best)
{
    return x > best || (x != x && best == best);
}

/* 1 / sqrt(var + eps) for layer norm. */
MS_HD double ms_k_rstd(double var, double eps) { return 1.0 / sqrt(var + eps); }

#endif
