/* moonshard CPU backend: flash-style attention, forward and backward. f32 runs in blocks of
 * query rows (attention_blocks.c); f64 and operands whose rows overlap run here, one query row
 * (or key row) at a time through kernels/attention.h; no [L, S] scores are held. */
#include <stdlib.h>

#include "attention.h"
#include "cpu.h"

/* An operand's element strides over (lead0, lead1, row, col), its dims aligned right to
 * `slots` of them; absent leading dims have stride 0. lse uses 3 slots (lead0, lead1, row). */
typedef struct view4 {
    char *data;
    int64_t s[4];
} view4;

static view4 view_of(const ms_tensor *t, int slots)
{
    view4 v = {t ? (char *)ms_tensor_data(t) : NULL, {0, 0, 0, 0}};
    for (int d = 0; t && d < t->ndim; d++)
        v.s[slots - t->ndim + d] = t->strides[d];
    return v;
}

/* The element offset of (b0, b1, row) in v. */
static int64_t at(const view4 *v, int64_t b0, int64_t b1, int64_t row)
{
    return b0 * v->s[0] + b1 * v->s[1] + row * v->s[2];
}

typedef struct geometry {
    int64_t lead[2], rows, keys, d, dv;
} geometry;

static geometry geometry_of(const ms_tensor *q, const ms_tensor *v)
{
    int n = q->ndim;
    geometry g = {{1, 1}, q->shape[n - 2], v->shape[n - 2], q->shape[n - 1], v->shape[n - 1]};
    for (int d = 0; d < n - 2; d++)
        g.lead[2 - (n - 2) + d] = q->shape[d];
    return g;
}

/* Keys query row i sees. */
static int64_t keys_of(const geometry *g, int causal, int64_t i)
{
    return causal && i + 1 < g->keys ? i + 1 : g->keys;
}

#define FORWARD(NAME, T, ROW)                                                               \
    static void NAME(const geometry *g, view4 o, view4 l, view4 q, view4 k, view4 v,         \
                     view4 m, T scale, int causal)                                          \
    {                                                                                       \
        for (int64_t b0 = 0; b0 < g->lead[0]; b0++)                                         \
            for (int64_t b1 = 0; b1 < g->lead[1]; b1++)                                     \
                for (int64_t i = 0; i < g->rows; i++) {                                     \
                    const T *mask = m.data ? (const T *)m.data + at(&m, b0, b1, i) : NULL;  \
                    ROW((const T *)q.data + at(&q, b0, b1, i),                              \
                        (const T *)k.data + at(&k, b0, b1, 0), k.s[2],                      \
                        (const T *)v.data + at(&v, b0, b1, 0), v.s[2], mask, m.s[3],        \
                        keys_of(g, causal, i), g->d, g->dv, scale,                          \
                        (T *)o.data + at(&o, b0, b1, i), (T *)l.data + at(&l, b0, b1, i));  \
                }                                                                           \
    }

FORWARD(forward_f32, float, ms_k_attn_row_f32)
FORWARD(forward_f64, double, ms_k_attn_row_f64)

/* 1 when attention_blocks.c serves the call: f32, no empty dim (keys were checked by the op
 * layer), and every matrix's rows at least a row apart as GEMM reads them (a view with
 * overlapping rows, such as an expanded key, takes the row kernels here). */
static int blocks_serve(const ms_tensor *const *t, int n)
{
    const ms_tensor *q = t[0], *v = t[2];
    int nd = q->ndim;
    if (q->dtype != MS_F32 || q->shape[nd - 2] == 0 || q->shape[nd - 1] == 0 ||
        v->shape[nd - 1] == 0)
        return 0;
    for (int i = 0; i < n; i++)
        if (t[i]->shape[nd - 2] > 1 && t[i]->strides[nd - 2] < t[i]->shape[nd - 1])
            return 0;
    return 1;
}

int ms_cpu_attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
                     const ms_tensor *v, const ms_tensor *mask, double scale, int causal)
{
    if (blocks_serve((const ms_tensor *[]){q, k, v, out}, 4))
        return ms_cpu_attention_blocks(out, lse, q, k, v, mask, scale, causal);
    geometry g = geometry_of(q, v);
    view4 o = view_of(out, 4), l = view_of(lse, 3), qv = view_of(q, 4), kv = view_of(k, 4),
          vv = view_of(v, 4), mv = view_of(mask, 4);
    if (q->dtype == MS_F32)
        forward_f32(&g, o, l, qv, kv, vv, mv, (float)scale, causal);
    else
        forward_f64(&g, o, l, qv, kv, vv, mv, scale, causal);
    return MS_OK;
}

/* delta_i = dout_i . out_i (contiguous [lead0, lead1, rows]), then dq row by row, then dk
 * and dv key row by key row: each output row is written by one loop, in a fixed order. */
#define BACKWARD(NAME, T, SUFFIX)                                                           \
    static void NAME(const geometry *g, T *delta, view4 dq, view4 dk, view4 dv, view4 go,    \
                     view4 q, view4 k, view4 v, view4 m, view4 o, view4 l, T scale,          \
                     int causal)                                                            \
    {                                                                                       \
        for (int64_t b0 = 0; b0 < g->lead[0]; b0++)                                         \
            for (int64_t b1 = 0; b1 < g->lead[1]; b1++) {                                   \
                T *row_delta = delta + (b0 * g->lead[1] + b1) * g->rows;                    \
                T *row_lse = (T *)l.data + at(&l, b0, b1, 0);                               \
                int64_t lse_step = l.s[2];                                                  \
                const T *qb = (const T *)q.data + at(&q, b0, b1, 0);                        \
                const T *kb = (const T *)k.data + at(&k, b0, b1, 0);                        \
                const T *vb = (const T *)v.data + at(&v, b0, b1, 0);                        \
                const T *gb = (const T *)go.data + at(&go, b0, b1, 0);                      \
                const T *mb = m.data ? (const T *)m.data + at(&m, b0, b1, 0) : NULL;        \
                for (int64_t i = 0; i < g->rows; i++)                                       \
                    row_delta[i] = ms_k_attn_dot_##SUFFIX(                                  \
                        gb + i * go.s[2], (const T *)o.data + at(&o, b0, b1, i), g->dv);    \
                for (int64_t i = 0; i < g->rows; i++)                                       \
                    ms_k_attn_dq_row_##SUFFIX(                                              \
                        qb + i * q.s[2], gb + i * go.s[2], row_delta[i], row_lse[i * lse_step], \
                        kb, k.s[2], vb, v.s[2], mb ? mb + i * m.s[2] : NULL, m.s[3],        \
                        keys_of(g, causal, i), g->d, g->dv, scale,                          \
                        (T *)dq.data + at(&dq, b0, b1, i));                                 \
                for (int64_t j = 0; j < g->keys; j++)                                       \
                    ms_k_attn_dkv_row_##SUFFIX(                                             \
                        kb + j * k.s[2], vb + j * v.s[2], qb, q.s[2], gb, go.s[2],          \
                        row_delta, row_lse, mb ? mb + j * m.s[3] : NULL, m.s[2],            \
                        causal ? j : 0, g->rows, g->d, g->dv, scale,                        \
                        (T *)dk.data + at(&dk, b0, b1, j), (T *)dv.data + at(&dv, b0, b1, j)); \
            }                                                                               \
    }

BACKWARD(backward_f32, float, f32)
BACKWARD(backward_f64, double, f64)

int ms_cpu_attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv,
                              const ms_tensor *dout, const ms_tensor *q, const ms_tensor *k,
                              const ms_tensor *v, const ms_tensor *mask, const ms_tensor *out,
                              const ms_tensor *lse, double scale, int causal)
{
    if (blocks_serve((const ms_tensor *[]){q, k, v, out, dout, dq, dk, dv}, 8))
        return ms_cpu_attention_blocks_backward(dq, dk, dv, dout, q, k, v, mask, out, lse,
                                                scale, causal);
    geometry g = geometry_of(q, v);
    size_t count = (size_t)(g.lead[0] * g.lead[1] * g.rows);
    void *delta = NULL;
    MS_CHECK(ms_cpu_alloc("attention_backward", count * ms_dtype_size(q->dtype), &delta));
    view4 a = view_of(dq, 4), b = view_of(dk, 4), c = view_of(dv, 4), go = view_of(dout, 4),
          qv = view_of(q, 4), kv = view_of(k, 4), vv = view_of(v, 4), mv = view_of(mask, 4),
          ov = view_of(out, 4), lv = view_of(lse, 3);
    if (q->dtype == MS_F32)
        backward_f32(&g, delta, a, b, c, go, qv, kv, vv, mv, ov, lv, (float)scale, causal);
    else
        backward_f64(&g, delta, a, b, c, go, qv, kv, vv, mv, ov, lv, scale, causal);
    free(delta);
    return MS_OK;
}
