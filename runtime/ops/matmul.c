/* moonshard runtime: ms_matmul's and ms_linear's checks (operands, shapes within BLAS's
 * 32-bit sizes, no overlap of out with an input), then the GEMM of the first tensor's place
 * (any float dtype). */
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

static int check_matmul_shapes(const char *op, const ms_tensor *out, const ms_tensor *a,
                               const ms_tensor *b, int trans_a, int trans_b, int64_t *m,
                               int64_t *n, int64_t *k)
{
    int nd = a->ndim;
    if (nd < 2 || b->ndim < 2) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "%s: a %s and b %s need at least 2 dims", op, s.a, s.b);
    }
    if (b->ndim != 2 && b->ndim != nd) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "%s: b %s must be 2-D or have a's %d dims (a %s)", op, s.b,
                       nd, s.a);
    }
    if (out->ndim != nd) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "%s: out %s must have a's %d dims (a %s)", op, s.out, nd,
                       s.a);
    }
    for (int d = 0; d < nd - 2; d++) {
        if (b->ndim == nd && b->shape[d] != a->shape[d]) {
            matmul_shapes s = describe_shapes(out, a, b);
            return MS_FAIL(MS_ERR_SHAPE, "%s: batch dims of a %s and b %s differ", op, s.a, s.b);
        }
        if (out->shape[d] != a->shape[d]) {
            matmul_shapes s = describe_shapes(out, a, b);
            return MS_FAIL(MS_ERR_SHAPE, "%s: batch dims of out %s and a %s differ", op, s.out,
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
        return MS_FAIL(MS_ERR_SHAPE, "%s: op(a) is [%lld, %lld] and op(b) is [%lld, %lld] "
                       "(a %s%s, b %s%s): inner dims differ", op, (long long)*m, (long long)*k,
                       (long long)kb, (long long)*n, s.a, trans_a ? " transposed" : "", s.b,
                       trans_b ? " transposed" : "");
    }
    if (out->shape[nd - 2] != *m || out->shape[nd - 1] != *n) {
        matmul_shapes s = describe_shapes(out, a, b);
        return MS_FAIL(MS_ERR_SHAPE, "%s: out is %s but op(a) @ op(b) is [%lld, %lld]", op,
                       s.out, (long long)*m, (long long)*n);
    }
    if (*m > INT_MAX || *n > INT_MAX || *k > INT_MAX)
        return MS_FAIL(MS_ERR_UNSUPPORTED, "%s: [%lld, %lld] @ [%lld, %lld] exceeds BLAS's "
                       "32-bit sizes", op, (long long)*m, (long long)*k, (long long)*k,
                       (long long)*n);
    return MS_OK;
}

/* out, a and b on one place, of one float dtype (a and b named a_name and b_name). */
static int check_operands(ms_place *place, const char *op, const ms_tensor *out,
                          const char *a_name, const ms_tensor *a, const char *b_name,
                          const ms_tensor *b)
{
    MS_CHECK(ms_check_output(place, op, "out", out));
    MS_CHECK(ms_check_input(place, op, a_name, a));
    MS_CHECK(ms_check_input(place, op, b_name, b));
    MS_CHECK(ms_check_float(op, a_name, a));
    MS_CHECK(ms_check_same_dtype(op, a_name, a, b_name, b));
    return ms_check_same_dtype(op, "out", out, a_name, a);
}

int ms_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
              int trans_b, double alpha, double beta)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(check_operands(&place, "matmul", out, "a", a, "b", b));
    trans_a = trans_a != 0;
    trans_b = trans_b != 0;
    int64_t m = 0, n = 0, k = 0;
    MS_CHECK(check_matmul_shapes("matmul", out, a, b, trans_a, trans_b, &m, &n, &k));
    if (ms_tensors_overlap(out, a) || ms_tensors_overlap(out, b))
        return MS_FAIL(MS_ERR_INVALID, "matmul: out shares memory with %s; GEMM cannot write "
                       "its own input", ms_tensors_overlap(out, a) ? "a" : "b");
    return place.backend->matmul(out, a, b, trans_a, trans_b, alpha, beta, m, n, k);
}

/* ms_linear on a backend without its own: the bias copied into every row of out (copy
 * broadcasts), then the GEMM with beta = 1 (beta = 0 without a bias). */
static int linear_by_copy(const ms_ops_backend *backend, ms_tensor *out,
                          const ms_tensor *x, const ms_tensor *weight,
                          const ms_tensor *bias, int64_t m, int64_t n, int64_t k)
{
    if (bias) {
        int status = backend->copy(out, bias);
        if (status != MS_OK)
            return status;
    }
    return backend->matmul(out, x, weight, 0, 1, 1.0, bias ? 1.0 : 0.0, m, n, k);
}

int ms_linear(ms_tensor *out, const ms_tensor *x, const ms_tensor *weight, const ms_tensor *bias)
{
    ms_place place = ms_place_of(out);
    MS_CHECK(check_operands(&place, "linear", out, "x", x, "weight", weight));
    if (out->ndim != 2 || x->ndim != 2 || weight->ndim != 2) {
        matmul_shapes s = describe_shapes(out, x, weight);
        return MS_FAIL(MS_ERR_SHAPE, "linear: out %s, x %s and weight %s must be 2-D", s.out,
                       s.a, s.b);
    }
    int64_t m = 0, n = 0, k = 0;
    MS_CHECK(check_matmul_shapes("linear", out, x, weight, 0, 1, &m, &n, &k));
    if (bias) {
        MS_CHECK(ms_check_input(&place, "linear", "bias", bias));
        MS_CHECK(ms_check_same_dtype("linear", "bias", bias, "x", x));
        if (bias->ndim != 1 || bias->shape[0] != n) {
            char shape[160];
            ms_shape_str(shape, sizeof shape, bias->ndim, bias->shape);
            return MS_FAIL(MS_ERR_SHAPE, "linear: bias is %s; expected [%lld] (weight's rows)",
                           shape, (long long)n);
        }
    }
    const ms_tensor *inputs[] = {x, weight, bias};
    const char *names[] = {"x", "weight", "bias"};
    for (int i = 0; i < 3; i++)
        if (inputs[i] && ms_tensors_overlap(out, inputs[i]))
            return MS_FAIL(MS_ERR_INVALID, "linear: out shares memory with %s; GEMM cannot "
                           "write its own input", names[i]);
    if (place.backend->linear)
        return place.backend->linear(out, x, weight, bias, m, n, k);
    return linear_by_copy(place.backend, out, x, weight, bias, m, n, k);
}
