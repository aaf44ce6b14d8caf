/* moonshard CUDA backend: ms_attention and ms_attention_backward on a device, after the
 * checks of runtime/ops/ (kernels/attention.cu). */
#include "cuda_internal.h"
#include "attention.cuh"

/* t's data and strides aligned right to `slots` of (lead0, lead1, row, col). */
static ms_cu_attn_view view_of(const ms_tensor *t, int slots)
{
    ms_cu_attn_view v = {t ? ms_tensor_data(t) : NULL, {0, 0, 0, 0}};
    for (int d = 0; t && d < t->ndim; d++)
        v.s[slots - t->ndim + d] = t->strides[d];
    return v;
}

static ms_cu_attn args_of(const ms_tensor *out, const ms_tensor *lse, const ms_tensor *q,
                          const ms_tensor *k, const ms_tensor *v, const ms_tensor *mask,
                          double scale, int causal)
{
    int n = q->ndim;
    ms_cu_attn a = {{1, 1}, q->shape[n - 2], k->shape[n - 2], q->shape[n - 1],
                    v->shape[n - 1], q->dtype == MS_F32 ? 0 : 1, causal, scale,
                    view_of(q, 4), view_of(k, 4), view_of(v, 4), view_of(mask, 4),
                    view_of(out, 4), view_of(lse, 3)};
    for (int d = 0; d < n - 2; d++)
        a.lead[2 - (n - 2) + d] = q->shape[d];
    return a;
}

int ms_cuda_attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
                      const ms_tensor *v, const ms_tensor *mask, double scale, int causal)
{
    if (out->numel == 0)
        return MS_OK;
    ms_cu_attn a = args_of(out, lse, q, k, v, mask, scale, causal);
    int device = ms_cuda_device_of(out);
    return ms_cuda_launched("attention", ms_cu_attention(ms_cuda_compute_stream(device), &a));
}

int ms_cuda_attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv,
                               const ms_tensor *dout, const ms_tensor *q, const ms_tensor *k,
                               const ms_tensor *v, const ms_tensor *mask, const ms_tensor *out,
                               const ms_tensor *lse, double scale, int causal)
{
    ms_cu_attn a = args_of(out, lse, q, k, v, mask, scale, causal);
    int64_t count = a.lead[0] * a.lead[1] * a.rows;
    if (count == 0 || dk->numel + dv->numel == 0)
        return MS_OK;
    ms_tensor *delta = NULL;
    MS_CHECK(ms_tensor_new(&delta, q->dtype, 1, &count, dq->storage->pool));
    int device = ms_cuda_device_of(dq);
    int status = ms_cuda_launched("attention_backward",
                                  ms_cu_attention_backward(ms_cuda_compute_stream(device), &a,
                                                           view_of(dq, 4), view_of(dk, 4),
                                                           view_of(dv, 4), view_of(dout, 4),
                                                           ms_tensor_data(delta)));
    ms_tensor_free(delta);
    return status;
}
