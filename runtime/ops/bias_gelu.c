/* moonshard runtime: ms_bias_gelu and ms_bias_gelu_backward (bias + GELU after a bias-free
 * GEMM, and the gradient through it from the derivative the forward made): argument checks
 * and the [rows, cols] layout, then the first tensor's place. */
#include "widen.h"

/* acc [..., C] of a float dtype, bias [C] of acc's dtype, and tanh_approx 0 or 1; [OUT]
 * rows (the product of acc's leading dims) and cols (C). */
static int check_layout(const char *op, const ms_tensor *acc, const ms_tensor *bias,
                        int tanh_approx, int64_t *rows, int64_t *cols)
{
    MS_CHECK(ms_check_float(op, "acc", acc));
    if (acc->ndim < 1)
        return MS_FAIL(MS_ERR_SHAPE, "%s: acc must have at least 1 dim, got a 0-dim tensor",
                       op);
    *cols = acc->shape[acc->ndim - 1];
    *rows = *cols > 0 ? acc->numel / *cols : 0;
    MS_CHECK(ms_check_same_dtype(op, "bias", bias, "acc", acc));
    MS_CHECK(ms_check_shape_is(op, "bias", bias, 1, cols));
    if (tanh_approx != 0 && tanh_approx != 1)
        return MS_FAIL(MS_ERR_INVALID, "%s: tanh_approx must be 0 or 1, got %d", op,
                       tanh_approx);
    return MS_OK;
}

/* The dtype the element math of acc's dtype runs in, which derivative has: f64 for f64, f32
 * for f32, bf16 and f16. */
static int compute_dtype(int dtype) { return dtype == MS_F64 ? MS_F64 : MS_F32; }

static int check_derivative(const char *op, const ms_tensor *derivative, const ms_tensor *like,
                            const char *like_name)
{
    MS_CHECK(ms_check_same_shape(op, "derivative", derivative, like_name, like));
    if (derivative->dtype != compute_dtype(like->dtype))
        return MS_FAIL(MS_ERR_DTYPE, "%s: derivative must be %s for %s %s, got %s", op,
                       ms_dtype_name(compute_dtype(like->dtype)), like_name,
                       ms_dtype_name(like->dtype), ms_dtype_name(derivative->dtype));
    return MS_OK;
}

int ms_bias_gelu(ms_tensor *y, ms_tensor *derivative, const ms_tensor *acc,
                 const ms_tensor *bias, int tanh_approx)
{
    const char *op = "bias_gelu";
    ms_place place = ms_place_of(y);
    int64_t rows = 0, cols = 0;
    MS_CHECK(ms_check_output(&place, op, "y", y));
    MS_CHECK(ms_check_optional(&place, op, "derivative", derivative, 1));
    MS_CHECK(ms_check_input(&place, op, "acc", acc));
    MS_CHECK(ms_check_input(&place, op, "bias", bias));
    MS_CHECK(check_layout(op, acc, bias, tanh_approx, &rows, &cols));
    MS_CHECK(ms_check_same_dtype(op, "y", y, "acc", acc));
    MS_CHECK(ms_check_same_shape(op, "y", y, "acc", acc));
    if (derivative) {
        MS_CHECK(check_derivative(op, derivative, acc, "acc"));
        const ms_tensor *others[] = {y, acc, bias};
        const char *names[] = {"y", "acc", "bias"};
        for (int i = 0; i < 3; i++)
            if (ms_tensors_overlap(derivative, others[i]))
                return MS_FAIL(MS_ERR_INVALID, "%s: derivative shares memory with %s", op,
                               names[i]);
    }
    if (!ms_is_half(acc->dtype))
        return place.backend->bias_gelu(y, derivative, acc, bias, tanh_approx, rows, cols);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_BIAS_GELU, 3,
                           (const ms_tensor *[]){y, acc, bias}, "wrr", f));
    return ms_widen_done(&w, &place, place.backend->bias_gelu(f[0], derivative, f[1], f[2],
                                                              tanh_approx, rows, cols));
}

int ms_bias_gelu_backward(ms_tensor *dacc, ms_tensor *dbias, const ms_tensor *dy,
                          const ms_tensor *derivative)
{
    const char *op = "bias_gelu_backward";
    ms_place place = ms_place_of(dacc);
    MS_CHECK(ms_check_output(&place, op, "dacc", dacc));
    MS_CHECK(ms_check_output(&place, op, "dbias", dbias));
    MS_CHECK(ms_check_input(&place, op, "dy", dy));
    MS_CHECK(ms_check_input(&place, op, "derivative", derivative));
    MS_CHECK(ms_check_float(op, "dy", dy));
    if (dy->ndim < 1)
        return MS_FAIL(MS_ERR_SHAPE, "%s: dy must have at least 1 dim, got a 0-dim tensor", op);
    int64_t cols = dy->shape[dy->ndim - 1];
    int64_t rows = cols > 0 ? dy->numel / cols : 0;
    MS_CHECK(check_derivative(op, derivative, dy, "dy"));
    MS_CHECK(ms_check_same_dtype(op, "dacc", dacc, "dy", dy));
    MS_CHECK(ms_check_same_shape(op, "dacc", dacc, "dy", dy));
    MS_CHECK(ms_check_same_dtype(op, "dbias", dbias, "dy", dy));
    MS_CHECK(ms_check_shape_is(op, "dbias", dbias, 1, &cols));
    if (!ms_is_half(dy->dtype))
        return place.backend->bias_gelu_backward(dacc, dbias, dy, derivative, rows, cols);
    ms_widened w = {0};
    ms_tensor *f[3];
    MS_CHECK(ms_widen_each(&w, &place, MS_HALF_BIAS_GELU, 3,
                           (const ms_tensor *[]){dacc, dbias, dy}, "wwr", f));
    return ms_widen_done(&w, &place, place.backend->bias_gelu_backward(f[0], f[1], f[2],
                                                                       derivative, rows, cols));
}
