/* moonshard kernels: fused SGD and Adam/AdamW steps on the device, one thread per element,
 * running the element updates of optim.h that the CPU backend runs. */
#include "optim.cuh"

enum { F32 = 0 };

/* ---- kernels ---- */

__device__ __forceinline__ void sgd_update(float *p, float *buf, float g, const ms_k_sgd_coeffs *c)
{
    ms_k_sgd_f32(p, buf, g, c);
}
__device__ __forceinline__ void sgd_update(double *p, double *buf, double g,
                                           const ms_k_sgd_coeffs *c)
{
    ms_k_sgd_f64(p, buf, g, c);
}
__device__ __forceinline__ void adam_update(float *p, float *m, float *v, float g,
                                            const ms_k_adam_coeffs *c)
{
    ms_k_adam_f32(p, m, v, g, c);
}
__device__ __forceinline__ void adam_update(double *p, double *m, double *v, double g,
                                            const ms_k_adam_coeffs *c)
{
    ms_k_adam_f64(p, m, v, g, c);
}

template <typename T>
__global__ void sgd_kernel(ms_cu_shape shape, ms_cu_operand param, ms_cu_operand buf,
                           ms_cu_operand grad, ms_k_sgd_coeffs c)
{
    MS_CU_FOR(i, shape.numel)
    {
        T *b = buf.data ? (T *)buf.data + ms_cu_offset(shape, buf.strides, i) : NULL;
        sgd_update((T *)param.data + ms_cu_offset(shape, param.strides, i), b,
                   ((const T *)grad.data)[ms_cu_offset(shape, grad.strides, i)], &c);
    }
}

template <typename T>
__global__ void adam_kernel(ms_cu_shape shape, ms_cu_operand param, ms_cu_operand exp_avg,
                            ms_cu_operand exp_avg_sq, ms_cu_operand grad, ms_k_adam_coeffs c)
{
    MS_CU_FOR(i, shape.numel)
    {
        adam_update((T *)param.data + ms_cu_offset(shape, param.strides, i),
                    (T *)exp_avg.data + ms_cu_offset(shape, exp_avg.strides, i),
                    (T *)exp_avg_sq.data + ms_cu_offset(shape, exp_avg_sq.strides, i),
                    ((const T *)grad.data)[ms_cu_offset(shape, grad.strides, i)], &c);
    }
}

/* ---- launchers ---- */

int ms_cu_sgd_step(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand param,
                   ms_cu_operand buf, ms_cu_operand grad, int dtype, const ms_k_sgd_coeffs *coeffs)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    if (dtype == F32)
        sgd_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, param, buf, grad, *coeffs);
    else
        sgd_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, param, buf, grad, *coeffs);
    return ms_cu_last_error();
}

int ms_cu_adam_step(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand param,
                    ms_cu_operand exp_avg, ms_cu_operand exp_avg_sq, ms_cu_operand grad,
                    int dtype, const ms_k_adam_coeffs *coeffs)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    if (dtype == F32)
        adam_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, param, exp_avg,
                                                                  exp_avg_sq, grad, *coeffs);
    else
        adam_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, param, exp_avg,
                                                                   exp_avg_sq, grad, *coeffs);
    return ms_cu_last_error();
}
