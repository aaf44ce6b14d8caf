/* moonshard runtime: ms_matmul's checks (operands, shapes within BLAS's 32-bit sizes, no
 * overlap of out with an input), then the GEMM of the first tensor's place (any float dtype). */
#include <limits.h>

#include "checks.h"

/* The shapes of a failing matmul as text; made only for an error, since formatting them
 * costs more than a small GEMM. */
typedef struct matmul_shapes { char a[160], b[160], out[160]; } matmul_shapes;

static matmul_shapes describe_shapes(const ms_tensor *out, const ms_tensor *a,
                                     const ms_tensor *b)
{
    matmul_shapes s;
    ms_shape_str(s.a, sizeof s.a, a->ndim, a->shape);
    ms_shape_str(s.b, sizeof s.b, b->ndim, b->shape);
    ms_shape_str(s.out, sizeof s.out, out->ndim, out->shape);
    return s;
}

static int check_matmul_shapes(const ms_tensor *out, const ms_tensor *a, const ms_tensor *b,
                               int trans_a, int trans_b, int64_t *m, int64_t *n, int64_t *k)
{
    int nd = a->ndim;
    if (nd < 2 || b->ndim < 2) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "matmul: a %s and b %s need at least 2 dims", s.a, s.b);
    }
    if (b->ndim != 2 && b->ndim != nd) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "matmul: b %s must be 2-D or have a's %d dims (a %s)", s.b,
                       nd, s.a);
    }
    if (out->ndim != nd) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "matmul: out %s must have a's %d dims (a %s)", s.out, nd,
                       s.a);
    }
    for (int d = 0; d < nd - 2; d++) {
        if (b->ndim == nd && b->shape[d] != a->shape[d]) {
            matmul_shapes s = describe_shapes(out, a, b);
            return MS_FAIL(MS_ERR_SHAPE, "matmul: batch dims of a %s and b %s differ", s.a, s.b);
        }
        if (out->shape[d] != a->shape[d]) {
            matmul_shapes s = describe_shapes(out, a, b);
            return MS_FAIL(MS_ERR_SHAPE, "matmul: batch dims of out %s and a %s differ", s.out,
                           s.a);
        }
    }
    int nb = b->ndim;
    *m = trans_a ? a->shape[nd - 1] : a->shape[nd - 2];
    *k = trans_a ? a->shape[nd - 2] : a->shape[nd - 1];
    int64_t kb = trans_b ? b->shape[nb - 1] : b->shape[nb - 2];
    *n = trans_b ? b->shape[nb - 2] : b->shape[nb - 1];
    if (*k != kb) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "matmul: op(a) is [%lld, %lld] and op(b) is [%lld, %lld] "
                       "(a %s%s, b %s%s): inner dims differ", (long long)*m, (long long)*k,
                       (long long)kb, (long long)*n, s.a, trans_a ? " transposed" : "", s.b,
                       trans_b ? " transposed" : "");
    }
    if (out->shape[nd - 2] != *m || out->shape[nd - 1] != *n) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "matmul: out is %s but op(a) @ op(b) is [%lld, %lld]",
                       s.out, (long long)*m, (long long)*n);
    }
    if (*m > INT_MAX || *n > INT_MAX || *k > INT_MAX)
        return MS_FAIL(MS_ERR_UNSUPPORTED, "matmul: [%lld, %lld] @ [%lld, %lld] exceeds BLAS's "
                       "32-bit sizes", (long long)*m, (long long)*k, (long long)*k,
                       (long long)*n);
    return MS_OK;
}

int ms_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
              int trans_b, double alpha, double beta)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(ms_check_output(&place, "matmul", "out", out));
    MS_CHECK(ms_check_input(&place, "matmul", "a", a));
    MS_CHECK(ms_check_input(&place, "matmul", "b", b));
    MS_CHECK(ms_check_float("matmul", "a", a));
    MS_CHECK(ms_check_same_dtype("matmul", "a", a, "b", b));
    MS_CHECK(ms_check_same_dtype("matmul", "out", out, "a", a));
    trans_a = trans_a != 0;
    trans_b = trans_b != 0;
    int64_t m = 0, n = 0, k = 0;
    MS_CHECK(check_matmul_shapes(out, a, b, trans_a, trans_b, &m, &n, &k));
    if (ms_tensors_overlap(out, a) || ms_tensors_overlap(out, b))
        return MS_FAIL(MS_ERR_INVALID, "matmul: out shares memory with %s; GEMM cannot write "
                       "its own input", ms_tensors_overlap(out, a) ? "a" : "b");
    return place.backend->matmul(out, a, b, trans_a, trans_b, alpha, beta, m, n, k);
}
