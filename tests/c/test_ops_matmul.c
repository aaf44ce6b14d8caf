/* C unit tests of ms_matmul against a naive triple loop: every transpose combination, dense,
 * transposed, padded-row and non-unit-stride operands, batches, shared b, alpha/beta, and
 * f32 GEMMs large enough to split across two threads (by rows and by columns, with a
 * partial last block), bitwise equal to the same GEMM on one thread. */
#include <stdlib.h>

#include "check.h"

enum { LAYOUT_LD = LAYOUT_COUNT, MATMUL_LAYOUTS = LAYOUT_COUNT + 1 };

/* Unit column stride with rows padded by 3 elements (a leading dimension > cols). */
static ms_tensor *with_ld_padding(const ms_tensor *src)
{
    int nd = src->ndim;
    int64_t strides[MS_MAX_DIMS], stride = 1;
    for (int d = nd - 1; d >= 0; d--) {
        strides[d] = stride;
        stride *= src->shape[d] + (d == nd - 1 ? 3 : 0);
    }
    int64_t capacity = stride + 2;
    ms_tensor *base = make(src->dtype, 1, &capacity);
    CHECK_OK(ms_fill(base, sentinel_value));
    ms_tensor *view = NULL;
    CHECK_OK(ms_tensor_view(&view, base, nd, src->shape, strides, 2));
    ms_tensor_free(base);
    for (int64_t i = 0; i < src->numel; i++)
        set(view, i, get(src, i));
    return view;
}

static ms_tensor *matmul_layout(const ms_tensor *src, int layout)
{
    return layout == LAYOUT_LD ? with_ld_padding(src) : with_layout(src, layout);
}

/* Element (batch, i, j) of a [..., rows, cols] tensor given in row-major order. */
static double at(const ms_tensor *t, int64_t batch, int64_t i, int64_t j)
{
    int64_t rows = t->shape[t->ndim - 2], cols = t->shape[t->ndim - 1];
    return get(t, (batch * rows + i) * cols + j);
}

/* out_want = alpha * op(a) @ op(b) + beta * out_before, every batch. */
static void reference(ms_tensor *want, const ms_tensor *a, const ms_tensor *b, int ta, int tb,
                      double alpha, double beta, const ms_tensor *before)
{
    int nd = a->ndim;
    int64_t m = want->shape[nd - 2], n = want->shape[nd - 1];
    int64_t k = ta ? a->shape[nd - 2] : a->shape[nd - 1];
    int64_t batches = want->numel / (m * n > 0 ? m * n : 1);
    for (int64_t batch = 0; batch < batches; batch++)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                long double sum = 0;
                int64_t bb = b->ndim == 2 ? 0 : batch;
                for (int64_t p = 0; p < k; p++)
                    sum += (long double)(ta ? at(a, batch, p, i) : at(a, batch, i, p)) *
                           (tb ? at(b, bb, j, p) : at(b, bb, p, j));
                double prior = beta != 0 ? get(before, (batch * m + i) * n + j) : 0;
                set(want, (batch * m + i) * n + j, (double)(alpha * sum) + beta * prior);
            }
}

/* Set by test_split: the out of the last run_case, kept for a bitwise comparison. */
static ms_tensor **keep_out;

static void run_case(int dtype, int ndim, const int64_t *batch_dims, int shared_b, int64_t m,
                     int64_t k, int64_t n, int ta, int tb, double alpha, double beta,
                     int layout_a, int layout_b, int layout_out)
{
    int64_t a_shape[MS_MAX_DIMS], b_shape[MS_MAX_DIMS], out_shape[MS_MAX_DIMS];
    for (int d = 0; d < ndim - 2; d++)
        a_shape[d] = b_shape[d] = out_shape[d] = batch_dims[d];
    a_shape[ndim - 2] = ta ? k : m;
    a_shape[ndim - 1] = ta ? m : k;
    int b_ndim = shared_b ? 2 : ndim;
    b_shape[b_ndim - 2] = tb ? n : k;
    b_shape[b_ndim - 1] = tb ? k : n;
    out_shape[ndim - 2] = m;
    out_shape[ndim - 1] = n;
    ms_tensor *a0 = random_tensor(dtype, ndim, a_shape, -1, 1);
    ms_tensor *b0 = random_tensor(dtype, b_ndim, b_shape, -1, 1);
    ms_tensor *before = random_tensor(dtype, ndim, out_shape, -1, 1);
    if (beta == 0)
        CHECK_OK(ms_fill(before, NAN)); /* beta 0 must ignore whatever out holds */
    ms_tensor *want = make(MS_F64, ndim, out_shape);
    reference(want, a0, b0, ta, tb, alpha, beta, before);
    ms_tensor *a = matmul_layout(a0, layout_a);
    ms_tensor *b = matmul_layout(b0, layout_b);
    ms_tensor *out = matmul_layout(before, layout_out);
    CHECK_OK(ms_matmul(out, a, b, ta, tb, alpha, beta));
    double tol = dtype == MS_F64 ? 1e-12 : 2e-5;
    int ok = 1;
    for (int64_t i = 0; i < want->numel && ok; i++)
        ok = close_enough(get(out, i), get(want, i), tol, tol);
    CHECK_MSG(ok && sentinel_intact(out),
              "matmul %s ndim %d shared_b %d m %lld k %lld n %lld ta %d tb %d beta %g "
              "layouts %d %d %d", dtype_label(dtype), ndim, shared_b, (long long)m,
              (long long)k, (long long)n, ta, tb, beta, layout_a, layout_b, layout_out);
    if (keep_out) {
        *keep_out = out;
        out = NULL;
    }
    ms_tensor *list[] = {a0, b0, before, want, a, b, out};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

static void test_2d(void)
{
    const int64_t sizes[][3] = {{5, 7, 3}, {1, 4, 6}, {6, 1, 2}, {3, 5, 1}, {1, 1, 1}, {17, 9, 13}};
    for (int dt = 0; dt < 2; dt++)
        for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
            for (int t = 0; t < 4; t++)
                for (int layout = 0; layout < MATMUL_LAYOUTS * MATMUL_LAYOUTS; layout++) {
                    int la = layout % MATMUL_LAYOUTS, lb = layout / MATMUL_LAYOUTS;
                    run_case(dt ? MS_F64 : MS_F32, 2, NULL, 0, sizes[s][0], sizes[s][1],
                             sizes[s][2], t & 1, t >> 1, 1.0, 0.0, la, lb,
                             (la + lb) % MATMUL_LAYOUTS);
                }
}

static void test_alpha_beta(void)
{
    for (int dt = 0; dt < 2; dt++)
        for (int layout = 0; layout < MATMUL_LAYOUTS; layout++) {
            run_case(dt ? MS_F64 : MS_F32, 2, NULL, 0, 4, 6, 5, 0, 1, 1.5, 0.5, 0, 0, layout);
            run_case(dt ? MS_F64 : MS_F32, 2, NULL, 0, 4, 6, 5, 1, 0, -2.0, 1.0, layout, 1,
                     layout);
            /* k = 0: out = beta * out */
            run_case(dt ? MS_F64 : MS_F32, 2, NULL, 0, 4, 0, 5, 0, 0, 1.0, 0.5, 0, 0, layout);
            run_case(dt ? MS_F64 : MS_F32, 2, NULL, 0, 4, 0, 5, 0, 0, 1.0, 0.0, 0, 0, layout);
        }
}

static void test_batched(void)
{
    const int64_t batch3[1] = {3}, batch23[2] = {2, 3}, batch1[1] = {1};
    for (int dt = 0; dt < 2; dt++) {
        int dtype = dt ? MS_F64 : MS_F32;
        for (int t = 0; t < 4; t++)
            for (int layout = 0; layout < MATMUL_LAYOUTS; layout++) {
                int other = (layout + 1) % MATMUL_LAYOUTS;
                run_case(dtype, 3, batch3, 0, 4, 5, 3, t & 1, t >> 1, 1.0, 0.0, layout, other,
                         layout);
                run_case(dtype, 4, batch23, 0, 2, 3, 4, t & 1, t >> 1, 0.5, 1.0, other, layout,
                         other);
                run_case(dtype, 3, batch3, 1, 4, 5, 3, t & 1, t >> 1, 1.0, 0.0, layout, other,
                         layout);
                run_case(dtype, 4, batch23, 1, 3, 2, 5, t & 1, t >> 1, 1.0, 0.5, layout, layout,
                         other);
                run_case(dtype, 3, batch1, 1, 3, 2, 5, t & 1, t >> 1, 1.0, 0.0, layout, layout,
                         layout);
            }
        /* dense batches with a shared b: the single tall GEMM path */
        run_case(dtype, 3, batch3, 1, 7, 6, 5, 0, 0, 1.0, 0.0, 0, 0, 0);
        run_case(dtype, 3, batch3, 1, 7, 6, 5, 0, 1, 1.0, 1.0, 0, 1, 0);
        run_case(dtype, 4, batch23, 1, 7, 6, 5, 0, 1, 1.0, 0.0, LAYOUT_LD, 0, LAYOUT_LD);
    }
}

/* Sizes (m, k, n) that sgemm.c cuts into pieces: 2 of rows, 2 of columns, 4 of rows, the
 * last piece a partial 16-element block each time; and one it keeps whole, whose rows cut
 * in two (a cut by thread count) give other bits with alpha != 1. Each case runs with 2
 * threads and with 1 from the same random inputs. */
static void test_split(void)
{
    const int64_t sizes[][3] = {
        {530, 40, 400}, {100, 90, 1040}, {1030, 40, 420}, {301, 100, 300}};
    int saved = ms_get_num_threads();
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int t = 0; t < 4; t++)
            for (int with_beta = 0; with_beta < 2; with_beta++) {
                ms_tensor *outs[2];
                for (int threads = 2; threads >= 1; threads--) {
                    CHECK_OK(ms_set_num_threads(threads));
                    test_seed(40 + (uint64_t)s);
                    keep_out = &outs[threads - 1];
                    run_case(MS_F32, 2, NULL, 0, sizes[s][0], sizes[s][1], sizes[s][2], t & 1,
                             t >> 1, with_beta ? 0.75 : 1.0, with_beta ? -0.5 : 0.0, 0, 0, 0);
                    keep_out = NULL;
                }
                CHECK_MSG(memcmp(ms_tensor_data(outs[0]), ms_tensor_data(outs[1]),
                                 (size_t)outs[0]->numel * sizeof(float)) == 0,
                          "split matmul %lld x %lld x %lld ta %d tb %d beta %d differs between "
                          "1 and 2 threads", (long long)sizes[s][0], (long long)sizes[s][1],
                          (long long)sizes[s][2], t & 1, t >> 1, with_beta);
                ms_tensor_free(outs[0]);
                ms_tensor_free(outs[1]);
            }
    CHECK_OK(ms_set_num_threads(saved));
}

static void test_errors(void)
{
    ms_tensor *a = make(MS_F32, 2, SHAPE(3, 4));
    ms_tensor *b = make(MS_F32, 2, SHAPE(5, 6));
    ms_tensor *b_ok = make(MS_F32, 2, SHAPE(4, 6));
    ms_tensor *out = make(MS_F32, 2, SHAPE(3, 6));
    ms_tensor *out_wrong = make(MS_F32, 2, SHAPE(6, 3));
    ms_tensor *d = make(MS_F64, 2, SHAPE(4, 6));
    ms_tensor *i = make(MS_I32, 2, SHAPE(3, 4));
    ms_tensor *v = make(MS_F32, 1, SHAPE(4));
    ms_tensor *a3 = make(MS_F32, 3, SHAPE(2, 3, 4));
    ms_tensor *b3 = make(MS_F32, 3, SHAPE(3, 4, 6));
    ms_tensor *out3 = make(MS_F32, 3, SHAPE(2, 3, 6));
    CHECK_ERR(ms_matmul(out, a, b, 0, 0, 1, 0), MS_ERR_SHAPE);
    CHECK(strstr(ms_last_error(), "[5, 6]") != NULL);
    CHECK_ERR(ms_matmul(out_wrong, a, b_ok, 0, 0, 1, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_matmul(out, a, b_ok, 1, 0, 1, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_matmul(out, a, d, 0, 0, 1, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_matmul(out, i, b_ok, 0, 0, 1, 0), MS_ERR_DTYPE);
    CHECK_ERR(ms_matmul(out, v, b_ok, 0, 0, 1, 0), MS_ERR_SHAPE);
    CHECK_ERR(ms_matmul(out3, a3, b3, 0, 0, 1, 0), MS_ERR_SHAPE); /* batch 2 vs 3 */
    CHECK_ERR(ms_matmul(out3, a, b3, 0, 0, 1, 0), MS_ERR_SHAPE);  /* a 2-D, b batched */
    CHECK_OK(ms_matmul(out, a, b_ok, 0, 0, 1, 0));
    /* out overlapping an input */
    ms_tensor *square = make(MS_F32, 2, SHAPE(4, 4));
    CHECK_ERR(ms_matmul(square, square, square, 0, 0, 1, 0), MS_ERR_INVALID);
    CHECK_ERR(ms_matmul(NULL, a, b_ok, 0, 0, 1, 0), MS_ERR_INVALID);
    ms_tensor *list[] = {a, b, b_ok, out, out_wrong, d, i, v, a3, b3, out3, square};
    for (size_t k = 0; k < sizeof list / sizeof list[0]; k++)
        ms_tensor_free(list[k]);
}

int main(void)
{
    /* this binary's GEMMs take the oneDNN path on any CPU unless the environment says
     * otherwise (ctest runs it once more with MOONSHARD_SGEMM=openblas) */
    setenv("MOONSHARD_SGEMM", getenv("MOONSHARD_SGEMM") ? getenv("MOONSHARD_SGEMM") : "onednn", 1);
    test_seed(4);
    test_2d();
    test_alpha_beta();
    test_batched();
    /* a cut by shape alone is the oneDNN path's (AVX-512, or MOONSHARD_SGEMM=onednn);
     * OpenBLAS splits by its thread count */
    const char *path = getenv("MOONSHARD_SGEMM");
    if (!path || strcmp(path, "openblas") != 0)
        test_split();
    test_errors();
    return check_summary("test_ops_matmul");
}
