/* moonshard kernels: launchers of flash-style attention on the device, one thread per query
 * row (forward, dq) or key row (dk, dv), through kernels/attention.h. */
#ifndef MS_KERNELS_ATTENTION_CUH
#define MS_KERNELS_ATTENTION_CUH

#include "launch.cuh"

/* An operand: data and element strides over (lead0, lead1, row, col); lse uses the first three. */
typedef struct ms_cu_attn_view {
    void *data;
    int64_t s[4];
} ms_cu_attn_view;

typedef struct ms_cu_attn {
    int64_t lead[2], rows, keys, d, dv;
    int dtype; /* 0 f32, else f64 */
    int causal;
    double scale;
    ms_cu_attn_view q, k, v, mask, out, lse; /* mask.data NULL: none */
} ms_cu_attn;

MS_CU_API int ms_cu_attention(cudaStream_t stream, const ms_cu_attn *args);
/* delta: lead0 * lead1 * rows elements of scratch (the dtype's). */
MS_CU_API int ms_cu_attention_backward(cudaStream_t stream, const ms_cu_attn *args,
                                       ms_cu_attn_view dq, ms_cu_attn_view dk,
                                       ms_cu_attn_view dv, ms_cu_attn_view dout, void *delta);

#endif
