/* moonshard kernels: flash-style attention on the device, one thread per query row (forward,
 * delta and dq) or key row (dk and dv), each writing only its own row: deterministic. */
#include "attention.cuh"
#include "attention.h"

__device__ __forceinline__ int64_t at(const ms_cu_attn_view &v, int64_t b0, int64_t b1,
                                      int64_t row)
{
    return b0 * v.s[0] + b1 * v.s[1] + row * v.s[2];
}

/* Row r of the flattened (lead0, lead1, rows) grid. */
__device__ __forceinline__ void split(const ms_cu_attn &a, int64_t r, int64_t rows, int64_t *b0,
                                      int64_t *b1, int64_t *i)
{
    *i = r % rows;
    *b1 = (r / rows) % a.lead[1];
    *b0 = r / rows / a.lead[1];
}

__device__ __forceinline__ int64_t keys_of(const ms_cu_attn &a, int64_t i)
{
    return a.causal && i + 1 < a.keys ? i + 1 : a.keys;
}

#define ATTENTION_KERNELS(SUFFIX, T)                                                        \
    __global__ void forward_##SUFFIX(ms_cu_attn a)                                          \
    {                                                                                       \
        MS_CU_FOR(r, a.lead[0] * a.lead[1] * a.rows)                                        \
        {                                                                                   \
            int64_t b0, b1, i;                                                              \
            split(a, r, a.rows, &b0, &b1, &i);                                              \
            const T *mask = a.mask.data ? (const T *)a.mask.data + at(a.mask, b0, b1, i)    \
                                        : NULL;                                             \
            ms_k_attn_row_##SUFFIX((const T *)a.q.data + at(a.q, b0, b1, i),                \
                                   (const T *)a.k.data + at(a.k, b0, b1, 0), a.k.s[2],      \
                                   (const T *)a.v.data + at(a.v, b0, b1, 0), a.v.s[2], mask, \
                                   a.mask.s[3], keys_of(a, i), a.d, a.dv, (T)a.scale,       \
                                   (T *)a.out.data + at(a.out, b0, b1, i),                  \
                                   (T *)a.lse.data + at(a.lse, b0, b1, i));                 \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    __global__ void dq_##SUFFIX(ms_cu_attn a, ms_cu_attn_view dq, ms_cu_attn_view dout,     \
                                T *delta)                                                   \
    {                                                                                       \
        MS_CU_FOR(r, a.lead[0] * a.lead[1] * a.rows)                                        \
        {                                                                                   \
            int64_t b0, b1, i;                                                              \
            split(a, r, a.rows, &b0, &b1, &i);                                              \
            const T *g = (const T *)dout.data + at(dout, b0, b1, i);                        \
            T row_delta = ms_k_attn_dot_##SUFFIX(                                           \
                g, (const T *)a.out.data + at(a.out, b0, b1, i), a.dv);                     \
            delta[r] = row_delta;                                                           \
            const T *mask = a.mask.data ? (const T *)a.mask.data + at(a.mask, b0, b1, i)    \
                                        : NULL;                                             \
            ms_k_attn_dq_row_##SUFFIX(                                                      \
                (const T *)a.q.data + at(a.q, b0, b1, i), g, row_delta,                     \
                ((const T *)a.lse.data)[at(a.lse, b0, b1, i)],                              \
                (const T *)a.k.data + at(a.k, b0, b1, 0), a.k.s[2],                         \
                (const T *)a.v.data + at(a.v, b0, b1, 0), a.v.s[2], mask, a.mask.s[3],      \
                keys_of(a, i), a.d, a.dv, (T)a.scale, (T *)dq.data + at(dq, b0, b1, i));    \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    __global__ void dkv_##SUFFIX(ms_cu_attn a, ms_cu_attn_view dk, ms_cu_attn_view dv,      \
                                 ms_cu_attn_view dout, const T *delta)                      \
    {                                                                                       \
        MS_CU_FOR(r, a.lead[0] * a.lead[1] * a.keys)                                        \
        {                                                                                   \
            int64_t b0, b1, j;                                                              \
            split(a, r, a.keys, &b0, &b1, &j);                                              \
            const T *mask = a.mask.data ? (const T *)a.mask.data + at(a.mask, b0, b1, 0) +  \
                                              j * a.mask.s[3]                               \
                                        : NULL;                                             \
            ms_k_attn_dkv_row_##SUFFIX(                                                     \
                (const T *)a.k.data + at(a.k, b0, b1, j),                                   \
                (const T *)a.v.data + at(a.v, b0, b1, j),                                   \
                (const T *)a.q.data + at(a.q, b0, b1, 0), a.q.s[2],                         \
                (const T *)dout.data + at(dout, b0, b1, 0), dout.s[2],                      \
                delta + (b0 * a.lead[1] + b1) * a.rows,                                     \
                (const T *)a.lse.data + at(a.lse, b0, b1, 0), mask, a.mask.s[2],            \
                a.causal ? j : 0, a.rows, a.d, a.dv, (T)a.scale,                            \
                (T *)dk.data + at(dk, b0, b1, j), (T *)dv.data + at(dv, b0, b1, j));        \
        }                                                                                   \
    }

ATTENTION_KERNELS(f32, float)
ATTENTION_KERNELS(f64, double)

int ms_cu_attention(cudaStream_t stream, const ms_cu_attn *args)
{
    unsigned blocks = ms_cu_blocks(args->lead[0] * args->lead[1] * args->rows);
    if (args->dtype == 0)
        forward_f32<<<blocks, MS_CU_THREADS, 0, stream>>>(*args);
    else
        forward_f64<<<blocks, MS_CU_THREADS, 0, stream>>>(*args);
    return ms_cu_last_error();
}

int ms_cu_attention_backward(cudaStream_t stream, const ms_cu_attn *args, ms_cu_attn_view dq,
                             ms_cu_attn_view dk, ms_cu_attn_view dv, ms_cu_attn_view dout,
                             void *delta)
{
    unsigned query_blocks = ms_cu_blocks(args->lead[0] * args->lead[1] * args->rows);
    unsigned key_blocks = ms_cu_blocks(args->lead[0] * args->lead[1] * args->keys);
    if (args->dtype == 0) {
        dq_f32<<<query_blocks, MS_CU_THREADS, 0, stream>>>(*args, dq, dout, (float *)delta);
        dkv_f32<<<key_blocks, MS_CU_THREADS, 0, stream>>>(*args, dk, dv, dout,
                                                          (const float *)delta);
    } else {
        dq_f64<<<query_blocks, MS_CU_THREADS, 0, stream>>>(*args, dq, dout, (double *)delta);
        dkv_f64<<<key_blocks, MS_CU_THREADS, 0, stream>>>(*args, dk, dv, dout,
                                                          (const double *)delta);
    }
    return ms_cu_last_error();
}
