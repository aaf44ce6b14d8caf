/* C unit tests of the softmax family, layer norm, embedding and nll_loss (forward and
 * backward) against naive loops and finite differences, f32 and f64, strided layouts. */
#include "check.h"

static void free_all(ms_tensor **list, size_t count)
{
    for (size_t i = 0; i < count; i++)
        ms_tensor_free(list[i]);
}
#define FREE_ALL(...)                                                          \
    do {                                                                       \
        ms_tensor *free_list_[] = {__VA_ARGS__};                               \
        free_all(free_list_, sizeof free_list_ / sizeof free_list_[0]);        \
    } while (0)

/* Position of element k along dim for the row containing row-major position pos. */
static int64_t along(const ms_tensor *t, int64_t pos, int dim, int64_t k)
{
    int64_t inner = 1;
    for (int d = t->ndim - 1; d > dim; d--)
        inner *= t->shape[d];
    int64_t index = (pos / inner) % t->shape[dim];
    return pos + (k - index) * inner;
}

static void test_softmax(void)
{
    const int64_t shape[3] = {3, 4, 5};
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-13 : 2e-6;
        ms_tensor *x0 = random_tensor(dtype, 3, shape, -4, 4);
        ms_tensor *dy0 = random_tensor(dtype, 3, shape, -1, 1);
        ms_tensor *y0 = make(dtype, 3, shape), *dx0 = make(dtype, 3, shape);
        for (int log = 0; log < 2; log++)
            for (int dim = 0; dim < 3; dim++)
                for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                    ms_tensor *x = with_layout(x0, layout);
                    ms_tensor *y = with_layout(y0, (layout + 1) % LAYOUT_COUNT);
                    CHECK_OK(ms_softmax(y, x, dim, log));
                    int ok = 1;
                    for (int64_t i = 0; i < x0->numel && ok; i++) {
                        double max = -INFINITY, sum = 0;
                        for (int64_t k = 0; k < shape[dim]; k++)
                            max = fmax(max, get(x0, along(x0, i, dim, k)));
                        for (int64_t k = 0; k < shape[dim]; k++)
                            sum += exp(get(x0, along(x0, i, dim, k)) - max);
                        double ref = log ? (get(x0, i) - max) - logl(sum)
                                         : exp(get(x0, i) - max) / sum;
                        ok = close_enough(get(y, i), ref, rtol, 1e-12);
                    }
                    CHECK_MSG(ok && sentinel_intact(y), "softmax log %d dim %d %s %s", log, dim,
                              dtype_label(dtype), layout_names[layout]);
                    /* backward from the reference formulas */
                    ms_tensor *dy = with_layout(dy0, (layout + 2) % LAYOUT_COUNT);
                    ms_tensor *dx = with_layout(dx0, layout);
                    CHECK_OK(ms_softmax_backward(dx, y, dy, dim, log));
                    ok = 1;
                    for (int64_t i = 0; i < x0->numel && ok; i++) {
                        double total = 0;
                        for (int64_t k = 0; k < shape[dim]; k++) {
                            int64_t p = along(x0, i, dim, k);
                            total += log ? get(dy, p) : get(dy, p) * get(y, p);
                        }
                        double ref = log ? get(dy, i) - exp(get(y, i)) * total
                                         : get(y, i) * (get(dy, i) - total);
                        ok = close_enough(get(dx, i), ref, 10 * rtol, 1e-6 * (1 - dt) + 1e-14);
                    }
                    CHECK_MSG(ok && sentinel_intact(dx), "softmax_backward log %d dim %d %s %s",
                              log, dim, dtype_label(dtype), layout_names[layout]);
                    FREE_ALL(x, y, dy, dx);
                }
        FREE_ALL(x0, dy0, y0, dx0);
    }
}

/* Gradient of sum(dy * softmax(x)) by central differences (f64). */
static void test_softmax_gradcheck(void)
{
    const int64_t shape[2] = {3, 6};
    ms_tensor *x = random_tensor(MS_F64, 2, shape, -2, 2);
    ms_tensor *dy = random_tensor(MS_F64, 2, shape, -1, 1);
    ms_tensor *y = make(MS_F64, 2, shape), *dx = make(MS_F64, 2, shape);
    for (int log = 0; log < 2; log++) {
        CHECK_OK(ms_softmax(y, x, 1, log));
        CHECK_OK(ms_softmax_backward(dx, y, dy, 1, log));
        int ok = 1;
        for (int64_t i = 0; i < x->numel; i++) {
            double keep = get(x, i), h = 1e-6, plus = 0, minus = 0;
            set(x, i, keep + h);
            ms_softmax(y, x, 1, log);
            for (int64_t j = 0; j < y->numel; j++)
                plus += get(dy, j) * get(y, j);
            set(x, i, keep - h);
            ms_softmax(y, x, 1, log);
            for (int64_t j = 0; j < y->numel; j++)
                minus += get(dy, j) * get(y, j);
            set(x, i, keep);
            ok &= close_enough(get(dx, i), (plus - minus) / (2 * h), 1e-6, 1e-8);
        }
        CHECK_MSG(ok, "softmax gradcheck log %d", log);
    }
    /* rows of -inf give NaN like PyTorch; a large row stays finite */
    ms_tensor *row = make(MS_F32, 1, SHAPE(3)), *out = make(MS_F32, 1, SHAPE(3));
    set(row, 0, 1000);
    set(row, 1, 1000);
    set(row, 2, -1000);
    CHECK_OK(ms_softmax(out, row, 0, 0));
    CHECK(get(out, 0) == 0.5 && get(out, 2) == 0);
    CHECK_OK(ms_softmax(row, row, 0, 1)); /* in place */
    CHECK_NEAR(get(row, 0), -log(2.0), 1e-6, 0);
    ms_tensor *scalar = make(MS_F64, 0, NULL), *scalar_out = make(MS_F64, 0, NULL);
    set(scalar, 0, 3);
    CHECK_OK(ms_softmax(scalar_out, scalar, 0, 0));
    CHECK(get(scalar_out, 0) == 1);
    CHECK_ERR(ms_softmax(out, row, 1, 0), MS_ERR_INVALID);
    ms_tensor *other = make(MS_F32, 1, SHAPE(4));
    CHECK_ERR(ms_softmax(out, other, 0, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_softmax(out, x, 0, 0), MS_ERR_DTYPE);
    ms_tensor *i32 = make(MS_I32, 1, SHAPE(3));
    CHECK_ERR(ms_softmax(i32, i32, 0, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_softmax_backward(out, row, other, 0, 0), MS_ERR_SHAPE);
    /* a row of -inf: NaN from softmax (0/0, as PyTorch's softmax), 0 from the safe kind, whose
     * backward is then 0 too; a row with one finite value is the same in both */
    for (int i = 0; i < 3; i++)
        set(row, i, -INFINITY);
    CHECK_OK(ms_softmax(out, row, 0, MS_SOFTMAX));
    CHECK(isnan(get(out, 0)));
    CHECK_OK(ms_softmax(out, row, 0, MS_SAFE_SOFTMAX));
    CHECK(get(out, 0) == 0 && get(out, 1) == 0 && get(out, 2) == 0 && !signbit(get(out, 0)));
    ms_tensor *g = make(MS_F32, 1, SHAPE(3)), *dg = make(MS_F32, 1, SHAPE(3));
    for (int i = 0; i < 3; i++)
        set(g, i, 1.5 * (i + 1));
    CHECK_OK(ms_softmax_backward(dg, out, g, 0, MS_SAFE_SOFTMAX));
    CHECK(get(dg, 0) == 0 && get(dg, 1) == 0 && get(dg, 2) == 0);
    set(row, 1, 2);
    CHECK_OK(ms_softmax(out, row, 0, MS_SAFE_SOFTMAX));
    CHECK(get(out, 0) == 0 && get(out, 1) == 1 && get(out, 2) == 0);
    CHECK_ERR(ms_softmax(out, row, 0, 3), MS_ERR_INVALID);
    CHECK_ERR(ms_softmax_backward(dg, out, g, 0, -1), MS_ERR_INVALID);
    FREE_ALL(x, dy, y, dx, row, out, scalar, scalar_out, i32, other, g, dg);
}

/* ---- layer norm ---- */

static void ln_reference(ms_tensor *out, double *mean, double *rstd, const ms_tensor *x,
                         const ms_tensor *w, const ms_tensor *b, int64_t rows, int64_t size,
                         double eps)
{
    for (int64_t r = 0; r < rows; r++) {
        long double sum = 0, sq = 0;
        for (int64_t j = 0; j < size; j++)
            sum += get(x, r * size + j);
        long double mu = sum / size;
        for (int64_t j = 0; j < size; j++)
            sq += (get(x, r * size + j) - mu) * (get(x, r * size + j) - mu);
        mean[r] = (double)mu;
        rstd[r] = 1 / sqrt((double)(sq / size) + eps);
        for (int64_t j = 0; j < size; j++)
            set(out, r * size + j,
                (get(x, r * size + j) - mean[r]) * rstd[r] * (w ? get(w, j) : 1) +
                    (b ? get(b, j) : 0));
    }
}

static double ln_loss(const ms_tensor *x, const ms_tensor *w, const ms_tensor *b,
                      const ms_tensor *dy, int64_t rows, int64_t size)
{
    double mean[16], rstd[16];
    ms_tensor *y = make(MS_F64, x->ndim, x->shape);
    ln_reference(y, mean, rstd, x, w, b, rows, size, 1e-5);
    double loss = 0;
    for (int64_t i = 0; i < y->numel; i++)
        loss += get(y, i) * get(dy, i);
    ms_tensor_free(y);
    return loss;
}

static void test_layer_norm(void)
{
    const int64_t shape[3] = {4, 3, 5}; /* normalise the last 2 dims: rows 4, size 15 */
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        double rtol = dt ? 1e-12 : 2e-5;
        ms_tensor *x0 = random_tensor(dtype, 3, shape, -2, 3);
        ms_tensor *w0 = random_tensor(dtype, 2, shape + 1, 0.5, 1.5);
        ms_tensor *b0 = random_tensor(dtype, 2, shape + 1, -1, 1);
        ms_tensor *dy0 = random_tensor(dtype, 3, shape, -1, 1);
        ms_tensor *want = make(MS_F64, 3, shape);
        for (int affine = 0; affine < 2; affine++)
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                double mean[4], rstd[4];
                ms_tensor *x = with_layout(x0, layout);
                ms_tensor *w = affine ? with_layout(w0, (layout + 1) % LAYOUT_COUNT) : NULL;
                ms_tensor *b = affine ? with_layout(b0, (layout + 2) % LAYOUT_COUNT) : NULL;
                ms_tensor *out0 = make(dtype, 3, shape);
                ms_tensor *out = with_layout(out0, (layout + 1) % LAYOUT_COUNT);
                ms_tensor *m0 = make(dtype, 1, SHAPE(4)), *r0 = make(MS_F64, 2, SHAPE(2, 2));
                ms_tensor *m = with_layout(m0, layout), *r = with_layout(r0, layout);
                CHECK_OK(ms_layer_norm(out, m, r, x, w, b, 2, 1e-5));
                ln_reference(want, mean, rstd, x0, affine ? w0 : NULL, affine ? b0 : NULL, 4, 15,
                             1e-5);
                int ok = 1;
                for (int64_t i = 0; i < want->numel; i++)
                    ok &= close_enough(get(out, i), get(want, i), rtol, rtol);
                for (int i = 0; i < 4; i++)
                    ok &= close_enough(get(m, i), mean[i], rtol, 1e-7) &&
                          close_enough(get(r, i), rstd[i], rtol, 0);
                CHECK_MSG(ok && sentinel_intact(out) && sentinel_intact(m) && sentinel_intact(r),
                          "layer_norm affine %d %s %s", affine, dtype_label(dtype),
                          layout_names[layout]);

                /* backward: dx against finite differences of the f64 reference; dweight
                 * and dbias accumulate onto what they held */
                ms_tensor *dy = with_layout(dy0, (layout + 2) % LAYOUT_COUNT);
                ms_tensor *dx0 = make(dtype, 3, shape);
                ms_tensor *dx = with_layout(dx0, layout);
                ms_tensor *dw0 = make(dtype, 2, shape + 1), *db0 = make(dtype, 2, shape + 1);
                CHECK_OK(ms_fill(dw0, 1.0));
                CHECK_OK(ms_fill(db0, -1.0));
                ms_tensor *dw = with_layout(dw0, LAYOUT_REVERSED);
                ms_tensor *db = with_layout(db0, LAYOUT_PADDED);
                CHECK_OK(ms_layer_norm_backward(dx, dw, db, dy, x, m, r, w, 2));
                ms_tensor *x64 = make(MS_F64, 3, shape), *w64 = make(MS_F64, 2, shape + 1);
                ms_tensor *b64 = make(MS_F64, 2, shape + 1), *dy64 = make(MS_F64, 3, shape);
                CHECK_OK(ms_copy(x64, x0));
                CHECK_OK(ms_copy(w64, w0));
                CHECK_OK(ms_copy(b64, b0));
                CHECK_OK(ms_copy(dy64, dy0));
                const ms_tensor *wr = affine ? w64 : NULL;
                double grad_tol = dt ? 1e-6 : 1e-3;
                ok = 1;
                for (int64_t i = 0; i < x64->numel; i++) {
                    double keep = get(x64, i), h = 1e-5;
                    set(x64, i, keep + h);
                    double plus = ln_loss(x64, wr, affine ? b64 : NULL, dy64, 4, 15);
                    set(x64, i, keep - h);
                    double minus = ln_loss(x64, wr, affine ? b64 : NULL, dy64, 4, 15);
                    set(x64, i, keep);
                    ok &= close_enough(get(dx, i), (plus - minus) / (2 * h), grad_tol, grad_tol);
                }
                for (int64_t j = 0; j < 15; j++) {
                    double want_dw = 0, want_db = 0;
                    for (int64_t row = 0; row < 4; row++) {
                        double xhat = (get(x0, row * 15 + j) - mean[row]) * rstd[row];
                        want_dw += get(dy0, row * 15 + j) * xhat;
                        want_db += get(dy0, row * 15 + j);
                    }
                    ok &= close_enough(get(dw, j), 1.0 + want_dw, grad_tol, grad_tol) &&
                          close_enough(get(db, j), -1.0 + want_db, grad_tol, grad_tol);
                }
                CHECK_MSG(ok && sentinel_intact(dx) && sentinel_intact(dw) && sentinel_intact(db),
                          "layer_norm_backward affine %d %s %s", affine, dtype_label(dtype),
                          layout_names[layout]);
                /* dweight and dbias may be skipped */
                CHECK_OK(ms_layer_norm_backward(dx, NULL, NULL, dy, x, m, r, w, 2));
                FREE_ALL(x, out0, out, m0, r0, m, r, dy, dx0, dx, dw0, db0, dw, db, x64, w64, b64,
                         dy64);
                if (w)
                    FREE_ALL(w, b);
            }
        FREE_ALL(x0, w0, b0, dy0, want);
    }
}

static void test_layer_norm_errors(void)
{
    ms_tensor *x = make(MS_F32, 2, SHAPE(3, 4)), *out = make(MS_F32, 2, SHAPE(3, 4));
    ms_tensor *m = make(MS_F32, 1, SHAPE(3)), *r = make(MS_F32, 1, SHAPE(3));
    ms_tensor *w_wrong = make(MS_F32, 1, SHAPE(5)), *w64 = make(MS_F64, 1, SHAPE(4));
    ms_tensor *m_wrong = make(MS_F32, 1, SHAPE(4)), *m_int = make(MS_I32, 1, SHAPE(3));
    fill_uniform(x, -1, 1);
    CHECK_OK(ms_layer_norm(out, m, r, x, NULL, NULL, 1, 1e-5));
    CHECK_ERR(ms_layer_norm(out, m, r, x, NULL, NULL, 0, 1e-5), MS_ERR_INVALID);
    CHECK_ERR(ms_layer_norm(out, m, r, x, NULL, NULL, 3, 1e-5), MS_ERR_INVALID);
    CHECK_ERR(ms_layer_norm(out, m, r, x, w_wrong, NULL, 1, 1e-5), MS_ERR_SHAPE);
    CHECK_ERR(ms_layer_norm(out, m, r, x, w64, NULL, 1, 1e-5), MS_ERR_DTYPE);
    CHECK_ERR(ms_layer_norm(out, m_wrong, r, x, NULL, NULL, 1, 1e-5), MS_ERR_SHAPE);
    CHECK_ERR(ms_layer_norm(out, m_int, r, x, NULL, NULL, 1, 1e-5), MS_ERR_DTYPE);
    CHECK_ERR(ms_layer_norm(out, m, r, x, NULL, NULL, 1, -1), MS_ERR_INVALID);
    CHECK_ERR(ms_layer_norm(NULL, m, r, x, NULL, NULL, 1, 1e-5), MS_ERR_INVALID);
    CHECK_ERR(ms_layer_norm_backward(out, w_wrong, NULL, out, x, m, r, NULL, 1), MS_ERR_SHAPE);
    FREE_ALL(x, out, m, r, w_wrong, w64, m_wrong, m_int);
}

/* ---- embedding ---- */

static void test_embedding(void)
{
    for (int dt = 0; dt < 2; dt++)
        for (int it = 0; it < 2; it++) {
            int dtype = dt ? MS_F64 : MS_F32, itype = it ? MS_I64 : MS_I32;
            ms_tensor *weight0 = random_tensor(dtype, 2, SHAPE(7, 5), -1, 1);
            ms_tensor *idx0 = make(itype, 2, SHAPE(2, 3));
            const int ids[6] = {3, 0, 6, 3, 3, 1};
            for (int i = 0; i < 6; i++)
                set(idx0, i, ids[i]);
            ms_tensor *out0 = make(dtype, 3, SHAPE(2, 3, 5));
            ms_tensor *dout0 = random_tensor(dtype, 3, SHAPE(2, 3, 5), -1, 1);
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                ms_tensor *weight = with_layout(weight0, layout);
                ms_tensor *idx = with_layout(idx0, (layout + 1) % LAYOUT_COUNT);
                ms_tensor *out = with_layout(out0, (layout + 2) % LAYOUT_COUNT);
                CHECK_OK(ms_embedding(out, weight, idx));
                int ok = 1;
                for (int64_t p = 0; p < 6; p++)
                    for (int64_t j = 0; j < 5; j++)
                        ok &= get(out, p * 5 + j) == get(weight0, ids[p] * 5 + j);
                CHECK_MSG(ok && sentinel_intact(out), "embedding %s %s %s", dtype_label(dtype),
                          dtype_label(itype), layout_names[layout]);
                /* backward accumulates into what dweight holds; repeated ids add up */
                ms_tensor *dw0 = make(dtype, 2, SHAPE(7, 5));
                CHECK_OK(ms_fill(dw0, 0.5));
                ms_tensor *dw = with_layout(dw0, layout);
                ms_tensor *dout = with_layout(dout0, (layout + 1) % LAYOUT_COUNT);
                CHECK_OK(ms_embedding_backward(dw, idx, dout));
                ok = 1;
                for (int64_t row = 0; row < 7; row++)
                    for (int64_t j = 0; j < 5; j++) {
                        double want = 0.5;
                        for (int p = 0; p < 6; p++)
                            if (ids[p] == row)
                                want += get(dout0, p * 5 + j);
                        ok &= close_enough(get(dw, row * 5 + j), want, 1e-6, 1e-7);
                    }
                CHECK_MSG(ok && sentinel_intact(dw), "embedding_backward %s %s %s",
                          dtype_label(dtype), dtype_label(itype), layout_names[layout]);
                FREE_ALL(weight, idx, out, dw0, dw, dout);
            }
            /* an index out of range fails before anything is written */
            ms_tensor *out = make(dtype, 3, SHAPE(2, 3, 5));
            CHECK_OK(ms_fill(out, 9));
            set(idx0, 4, 7);
            CHECK_ERR(ms_embedding(out, weight0, idx0), MS_ERR_INDEX);
            CHECK(strstr(ms_last_error(), "7") != NULL);
            CHECK(get(out, 0) == 9);
            set(idx0, 4, -1);
            CHECK_ERR(ms_embedding(out, weight0, idx0), MS_ERR_INDEX);
            CHECK_ERR(ms_embedding_backward(weight0, idx0, dout0), MS_ERR_INDEX);
            set(idx0, 4, 2);
            ms_tensor *wrong = make(dtype, 3, SHAPE(2, 3, 4)), *fidx = make(MS_F32, 2, SHAPE(2, 3));
            ms_tensor *w1 = make(dtype, 1, SHAPE(7));
            CHECK_ERR(ms_embedding(wrong, weight0, idx0), MS_ERR_SHAPE);
            CHECK_ERR(ms_embedding(out, weight0, fidx), MS_ERR_DTYPE);
            CHECK_ERR(ms_embedding(out, w1, idx0), MS_ERR_SHAPE);
            CHECK_ERR(ms_embedding_backward(weight0, idx0, wrong), MS_ERR_SHAPE);
            FREE_ALL(weight0, idx0, out0, dout0, out, wrong, fidx, w1);
        }
}

/* ---- nll ---- */

static void test_nll(void)
{
    for (int dt = 0; dt < 2; dt++)
        for (int it = 0; it < 2; it++) {
            int dtype = dt ? MS_F64 : MS_F32, itype = it ? MS_I64 : MS_I32;
            ms_tensor *logp0 = random_tensor(dtype, 2, SHAPE(5, 4), -3, 0);
            ms_tensor *target0 = make(itype, 1, SHAPE(5));
            const int targets[5] = {2, -100, 0, 3, 2};
            for (int i = 0; i < 5; i++)
                set(target0, i, targets[i]);
            for (int reduction = 0; reduction < 3; reduction++)
                for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                    ms_tensor *logp = with_layout(logp0, layout);
                    ms_tensor *target = with_layout(target0, (layout + 1) % LAYOUT_COUNT);
                    ms_tensor *out0 = reduction ? make(dtype, 0, NULL) : make(dtype, 1, SHAPE(5));
                    ms_tensor *out = with_layout(out0, layout);
                    CHECK_OK(ms_nll_loss(out, logp, target, -100, reduction));
                    double total = 0;
                    int ok = 1;
                    for (int i = 0; i < 5; i++) {
                        double loss = targets[i] == -100 ? 0 : -get(logp0, i * 4 + targets[i]);
                        total += loss;
                        if (reduction == 0)
                            ok &= close_enough(get(out, i), loss, 1e-6, 0);
                    }
                    if (reduction == 1)
                        ok &= close_enough(get(out, 0), total / 4, 1e-6, 0);
                    if (reduction == 2)
                        ok &= close_enough(get(out, 0), total, 1e-6, 0);
                    CHECK_MSG(ok && sentinel_intact(out), "nll reduction %d %s %s %s", reduction,
                              dtype_label(dtype), dtype_label(itype), layout_names[layout]);
                    /* backward */
                    ms_tensor *dout0 = reduction ? make(dtype, 0, NULL) : make(dtype, 1, SHAPE(5));
                    CHECK_OK(ms_arange(dout0, 1.5, 1));
                    ms_tensor *dout = with_layout(dout0, (layout + 2) % LAYOUT_COUNT);
                    ms_tensor *dlogp0 = make(dtype, 2, SHAPE(5, 4));
                    CHECK_OK(ms_fill(dlogp0, 7)); /* assigned, not accumulated */
                    ms_tensor *dlogp = with_layout(dlogp0, (layout + 1) % LAYOUT_COUNT);
                    CHECK_OK(ms_nll_loss_backward(dlogp, dout, target, -100, reduction));
                    ok = 1;
                    for (int i = 0; i < 5; i++)
                        for (int c = 0; c < 4; c++) {
                            double want = 0;
                            if (targets[i] == c)
                                want = reduction == 0 ? -(1.5 + i)
                                       : reduction == 1 ? -1.5 / 4 : -1.5;
                            ok &= close_enough(get(dlogp, i * 4 + c), want, 1e-7, 0);
                        }
                    CHECK_MSG(ok && sentinel_intact(dlogp), "nll backward reduction %d %s %s %s",
                              reduction, dtype_label(dtype), dtype_label(itype),
                              layout_names[layout]);
                    FREE_ALL(logp, target, out0, out, dout0, dout, dlogp0, dlogp);
                }
            /* every target ignored: the mean is NaN */
            ms_tensor *scalar = make(dtype, 0, NULL);
            CHECK_OK(ms_fill(target0, -100));
            CHECK_OK(ms_nll_loss(scalar, logp0, target0, -100, 1));
            CHECK(isnan(get(scalar, 0)));
            /* errors */
            set(target0, 1, 4);
            CHECK_ERR(ms_nll_loss(scalar, logp0, target0, -100, 1), MS_ERR_INDEX);
            CHECK_ERR(ms_nll_loss_backward(logp0, scalar, target0, -100, 1), MS_ERR_INDEX);
            set(target0, 1, 3);
            ms_tensor *per_row = make(dtype, 1, SHAPE(5)), *short_t = make(itype, 1, SHAPE(4));
            ms_tensor *ftarget = make(MS_F32, 1, SHAPE(5));
            CHECK_ERR(ms_nll_loss(per_row, logp0, target0, -100, 1), MS_ERR_SHAPE);
            CHECK_ERR(ms_nll_loss(scalar, logp0, target0, -100, 0), MS_ERR_SHAPE);
            CHECK_ERR(ms_nll_loss(scalar, logp0, short_t, -100, 1), MS_ERR_SHAPE);
            CHECK_ERR(ms_nll_loss(scalar, logp0, ftarget, -100, 1), MS_ERR_DTYPE);
            CHECK_ERR(ms_nll_loss(scalar, logp0, target0, -100, 3), MS_ERR_INVALID);
            FREE_ALL(logp0, target0, scalar, per_row, short_t, ftarget);
        }
}

int main(void)
{
    test_seed(5);
    test_softmax();
    test_softmax_gradcheck();
    test_layer_norm();
    test_layer_norm_errors();
    test_embedding();
    test_nll();
    return check_summary("test_ops_nn");
}
