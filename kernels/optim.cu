/* moonshard kernels: fused SGD and Adam/AdamW steps on the device, one thread per element,
 * running the element updates of optim.h that the CPU backend runs (bf16 and f16 state
 * updated in f32 registers, each value rounded once at the store). */
#include "optim.cuh"
#include "value.cuh"

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

/* S: the stored element type; T: the type computed in. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void sgd_kernel(ms_cu_shape shape, ms_cu_operand param, ms_cu_operand buf,
                           ms_cu_operand grad, ms_k_sgd_coeffs c)
{
    MS_CU_FOR(i, shape.numel)
    {
        int64_t at = ms_cu_offset(shape, param.strides, i);
        int64_t buf_at = buf.data ? ms_cu_offset(shape, buf.strides, i) : 0;
        T p = ms_cu_get<S>(param.data, at), b = buf.data ? ms_cu_get<S>(buf.data, buf_at) : (T)0;
        sgd_update(&p, buf.data ? &b : NULL,
                   ms_cu_get<S>(grad.data, ms_cu_offset(shape, grad.strides, i)), &c);
        ms_cu_set<S>(param.data, at, p);
        if (buf.data)
            ms_cu_set<S>(buf.data, buf_at, b);
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void adam_kernel(ms_cu_shape shape, ms_cu_operand param, ms_cu_operand exp_avg,
                            ms_cu_operand exp_avg_sq, ms_cu_operand grad, ms_k_adam_coeffs c)
{
    MS_CU_FOR(i, shape.numel)
    {
        int64_t at = ms_cu_offset(shape, param.strides, i);
        int64_t m_at = ms_cu_offset(shape, exp_avg.strides, i);
        int64_t v_at = ms_cu_offset(shape, exp_avg_sq.strides, i);
        T p = ms_cu_get<S>(param.data, at), m = ms_cu_get<S>(exp_avg.data, m_at),
          v = ms_cu_get<S>(exp_avg_sq.data, v_at);
        adam_update(&p, &m, &v, ms_cu_get<S>(grad.data, ms_cu_offset(shape, grad.strides, i)),
                    &c);
        ms_cu_set<S>(param.data, at, p);
        ms_cu_set<S>(exp_avg.data, m_at, m);
        ms_cu_set<S>(exp_avg_sq.data, v_at, v);
    }
}

/* ---- launchers ---- */

int ms_cu_sgd_step(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand param,
                   ms_cu_operand buf, ms_cu_operand grad, int dtype, const ms_k_sgd_coeffs *coeffs)
{
    MS_CU_LAUNCH_FLOAT(dtype, sgd_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS, stream,
                       *shape, param, buf, grad, *coeffs)
    return ms_cu_last_error();
}

int ms_cu_adam_step(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand param,
                    ms_cu_operand exp_avg, ms_cu_operand exp_avg_sq, ms_cu_operand grad,
                    int dtype, const ms_k_adam_coeffs *coeffs)
{
    MS_CU_LAUNCH_FLOAT(dtype, adam_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS, stream,
                       *shape, param, exp_avg, exp_avg_sq, grad, *coeffs)
    return ms_cu_last_error();
}
