/* moonshard runtime: ms_attention and ms_attention_backward (flash-style attention): argument
 * checks, then the first tensor's place. */
#include <math.h>

#include "widen.h"

/* t has ndim dims: lead (the leading dims of q), then rows and cols. */
static int check_shape(const char *op, const char *name, const ms_tensor *t, const ms_tensor *q,
                       int64_t rows, int64_t cols)
{
    int64_t shape[MS_MAX_DIMS];
    int n = q->ndim;
    for (int d = 0; d < n - 2; d++)
        shape[d] = q->shape[d];
    shape[n - 2] = rows;
    shape[n - 1] = cols;
    return ms_check_shape_is(op, name, t, n, shape);
}

static int check_unit_stride(const char *op, const char *name, const ms_tensor *t)
{
    if (t->ndim > 0 && t->shape[t->ndim - 1] > 1 && t->strides[t->ndim - 1] != 1)
        return MS_FAIL(MS_ERR_INVALID, "%s: %s needs a unit stride in its last dim, got %lld",
                       op, name, (long long)t->strides[t->ndim - 1]);
    return MS_OK;
}

/* q, k, v, mask, out and lse (already checked on place): dtypes, shapes and strides. */
static int check_attention(const char *op, const ms_tensor *q, const ms_tensor *k,
                           const ms_tensor *v, const ms_tensor *mask, const ms_tensor *out,
                           const ms_tensor *lse)
{
    MS_CHECK(ms_check_float(op, "q", q));
    MS_CHECK(ms_check_same_dtype(op, "k", k, "q", q));
    MS_CHECK(ms_check_same_dtype(op, "v", v, "q", q));
    MS_CHECK(ms_check_same_dtype(op, "out", out, "q", q));
    MS_CHECK(ms_check_same_dtype(op, "lse", lse, "q", q));
    if (q->ndim < 2 || q->ndim > 4)
        return MS_FAIL(MS_ERR_SHAPE, "%s: q must have 2 to 4 dims ([..., L, D]), got %d", op,
                       q->ndim);
    int n = q->ndim;
    int64_t rows = q->shape[n - 2], d = q->shape[n - 1];
    int64_t keys = k->ndim == n ? k->shape[n - 2] : -1;
    int64_t dv = v->ndim == n ? v->shape[n - 1] : -1;
    MS_CHECK(check_shape(op, "k", k, q, keys, d));
    MS_CHECK(check_shape(op, "v", v, q, keys, dv));
    MS_CHECK(check_shape(op, "out", out, q, rows, dv));
    MS_CHECK(ms_check_shape_is(op, "lse", lse, n - 1, q->shape));
    if (mask) {
        MS_CHECK(ms_check_same_dtype(op, "mask", mask, "q", q));
        MS_CHECK(check_shape(op, "mask", mask, q, rows, keys));
    }
    const ms_tensor *dense[5] = {q, k, v, out, lse};
    const char *names[5] = {"q", "k", "v", "out", "lse"};
    for (int i = 0; i < 5; i++)
        MS_CHECK(check_unit_stride(op, names[i], dense[i]));
    return MS_OK;
}

int ms_attention(ms_tensor *out, ms_tensor *lse, const ms_tensor *q, const ms_tensor *k,
                 const ms_tensor *v, const ms_tensor *mask, double scale, int causal)
{
    const char *op = "attention";
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, op, "out", out));
    MS_CHECK(ms_check_output(&place, op, "lse", lse));
    MS_CHECK(ms_check_input(&place, op, "q", q));
    MS_CHECK(ms_check_input(&place, op, "k", k));
    MS_CHECK(ms_check_input(&place, op, "v", v));
    MS_CHECK(ms_check_optional(&place, op, "mask", mask, 0));
    MS_CHECK(check_attention(op, q, k, v, mask, out, lse));
    if (k->shape[k->ndim - 2] == 0) { /* no keys: an empty weighted sum, as the composition */
        MS_CHECK(ms_fill(out, 0.0));
        return ms_fill(lse, -INFINITY);
    }
    if (!ms_is_half(q->dtype))
        return place.backend->attention(out, lse, q, k, v, mask, scale, causal != 0);
    ms_widened w = {0};
    ms_tensor *f[6];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_ATTENTION, 6, (const ms_tensor *[]){out, lse, q, k, v, mask},
                           "wwrrrr", f));
    return ms_widen_done(&w, &place, place.backend->attention(f[0], f[1], f[2], f[3], f[4], f[5],
                                                              scale, causal != 0));
}

/* The 16-bit backward: ten operands in two widenings. */
static __attribute__((noinline)) int backward_half(ms_place *place, ms_tensor *dq,
                                                   ms_tensor *dk, ms_tensor *dv,
                                                   const ms_tensor *dout, const ms_tensor *q,
                                                   const ms_tensor *k, const ms_tensor *v,
                                                   const ms_tensor *mask, const ms_tensor *out,
                                                   const ms_tensor *lse, double scale,
                                                   int causal)
{
    ms_widened grads = {0}, saved = {0};
    ms_tensor *g[7], *s[3];
    MS_CHECK(ms_widen_each(&grads, place, MS_HALF_ATTENTION, 7, (const ms_tensor *[]){dq, dk, dv, dout, q, k, v},
                           "wwwrrrr", g));
    int status = ms_widen_each(&saved, place, MS_HALF_ATTENTION, 3, (const ms_tensor *[]){mask, out, lse}, "rrr", s);
    if (status != MS_OK)
        return ms_widen_done(&grads, place, status);
    status = place->backend->attention_backward(g[0], g[1], g[2], g[3], g[4], g[5], g[6], s[0],
                                                s[1], s[2], scale, causal);
    status = ms_widen_done(&saved, place, status);
    return ms_widen_done(&grads, place, status);
}

int ms_attention_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv, const ms_tensor *dout,
                          const ms_tensor *q, const ms_tensor *k, const ms_tensor *v,
                          const ms_tensor *mask, const ms_tensor *out, const ms_tensor *lse,
                          double scale, int causal)
{
    const char *op = "attention_backward";
    ms_place place = ms_place_of(dq);
    MS_CHECK(ms_check_output(&place, op, "dq", dq));
    MS_CHECK(ms_check_output(&place, op, "dk", dk));
    MS_CHECK(ms_check_output(&place, op, "dv", dv));
    MS_CHECK(ms_check_input(&place, op, "dout", dout));
    MS_CHECK(ms_check_input(&place, op, "q", q));
    MS_CHECK(ms_check_input(&place, op, "k", k));
    MS_CHECK(ms_check_input(&place, op, "v", v));
    MS_CHECK(ms_check_optional(&place, op, "mask", mask, 0));
    MS_CHECK(ms_check_input(&place, op, "out", out));
    MS_CHECK(ms_check_input(&place, op, "lse", lse));
    MS_CHECK(check_attention(op, q, k, v, mask, out, lse));
    const ms_tensor *grads[4] = {dq, dk, dv, dout};
    const ms_tensor *like[4] = {q, k, v, out};
    const char *names[4] = {"dq", "dk", "dv", "dout"}, *like_names[4] = {"q", "k", "v", "out"};
    for (int i = 0; i < 4; i++) {
        MS_CHECK(ms_check_same_dtype(op, names[i], grads[i], like_names[i], like[i]));
        MS_CHECK(ms_check_same_shape(op, names[i], grads[i], like_names[i], like[i]));
        MS_CHECK(check_unit_stride(op, names[i], grads[i]));
    }
    if (k->shape[k->ndim - 2] == 0) /* no keys: out did not depend on q; dk and dv are empty */
        return ms_fill(dq, 0.0);
    if (ms_is_half(q->dtype))
        return backward_half(&place, dq, dk, dv, dout, q, k, v, mask, out, lse, scale,
                             causal != 0);
    return place.backend->attention_backward(dq, dk, dv, dout, q, k, v, mask, out, lse, scale,
                                             causal != 0);
}
