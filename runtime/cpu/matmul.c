/* moonshard CPU backend: ms_matmul over OpenBLAS (2-D, batched, b shared by every batch).
 * out = alpha * op(a) @ op(b) + beta * out: out is assigned or, with beta = 1, accumulated. */
#include <limits.h>
#include <stdlib.h>
#include <cblas.h>

#include "cpu.h"

/* How BLAS can read one stored matrix of a view in place. Row-major with a unit column
 * stride is read as is; a unit row stride (a transposed view) is read as the row-major
 * transpose with the trans flag flipped. Anything else is copied to a dense block. */
typedef struct matrix_layout {
    int in_place;
    int transposed; /* BLAS sees the stored matrix's transpose */
    int64_t ld;
} matrix_layout;

static int64_t at_least_1(int64_t v) { return v > 1 ? v : 1; }

static matrix_layout layout_of(int64_t rows, int64_t cols, int64_t row_stride,
                               int64_t col_stride)
{
    matrix_layout layout = {0, 0, 0};
    if ((cols == 1 || col_stride == 1) && (rows == 1 || row_stride >= at_least_1(cols))) {
        layout.in_place = 1;
        layout.ld = rows == 1 ? at_least_1(cols) : row_stride;
    } else if ((rows == 1 || row_stride == 1) &&
               (cols == 1 || col_stride >= at_least_1(rows))) {
        layout.in_place = 1;
        layout.transposed = 1;
        layout.ld = cols == 1 ? at_least_1(rows) : col_stride;
    }
    if (layout.ld > INT_MAX)
        layout.in_place = 0;
    return layout;
}

static matrix_layout layout_of_tensor(const ms_tensor *t)
{
    int n = t->ndim;
    return layout_of(t->shape[n - 2], t->shape[n - 1], t->strides[n - 2], t->strides[n - 1]);
}

/* Row-major C[m, n] = alpha * op(A) op(B) + beta * C. */
static void gemm(int dtype, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                 double alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                 double beta, void *c, int64_t ldc)
{
    enum CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
    if (dtype == MS_F32)
        cblas_sgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, (float)alpha, a, (int)lda,
                    b, (int)ldb, (float)beta, c, (int)ldc);
    else
        cblas_dgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, alpha, a, (int)lda, b,
                    (int)ldb, beta, c, (int)ldc);
}

/* Element offset of batch number `batch` (row-major over the leading dims). */
static int64_t batch_offset(const ms_tensor *t, int nlead, int64_t batch)
{
    int64_t offset = 0;
    for (int d = nlead - 1; d >= 0 && batch > 0; d--) {
        offset += (batch % t->shape[d]) * t->strides[d];
        batch /= t->shape[d];
    }
    return offset;
}

/* 1 when the rows of every batch of t are evenly spaced by ld, so the batches form one
 * tall matrix. */
static int batches_stack(const ms_tensor *t, int64_t ld)
{
    int n = t->ndim;
    int64_t expected = t->shape[n - 2] * ld;
    for (int d = n - 3; d >= 0; d--) {
        if (t->shape[d] != 1 && t->strides[d] != expected)
            return 0;
        expected *= t->shape[d];
    }
    return 1;
}

/* Extent [lowest, highest] of a view's elements in bytes from its storage's start. */
static void byte_extent(const ms_tensor *t, int64_t *lowest, int64_t *highest)
{
    int64_t size = (int64_t)ms_dtype_size(t->dtype);
    int64_t low = t->offset, high = t->offset;
    for (int d = 0; d < t->ndim; d++) {
        int64_t reach = (t->shape[d] - 1) * t->strides[d];
        if (reach < 0)
            low += reach;
        else
            high += reach;
    }
    *lowest = low * size;
    *highest = high * size + size - 1;
}

static int overlaps(const ms_tensor *a, const ms_tensor *b)
{
    if (a->storage != b->storage || a->numel == 0 || b->numel == 0)
        return 0;
    int64_t a_low, a_high, b_low, b_high;
    byte_extent(a, &a_low, &a_high);
    byte_extent(b, &b_low, &b_high);
    return a_low <= b_high && b_low <= a_high;
}

int ms_cpu_check_matmul_operands(ms_place *place, const ms_tensor *out, const ms_tensor *a,
                                 const ms_tensor *b)
{
    MS_CHECK(ms_place_output(place, "matmul", "out", out));
    MS_CHECK(ms_place_input(place, "matmul", "a", a));
    MS_CHECK(ms_place_input(place, "matmul", "b", b));
    MS_CHECK(ms_cpu_float("matmul", "a", a));
    MS_CHECK(ms_cpu_same_dtype("matmul", "a", a, "b", b));
    return ms_cpu_same_dtype("matmul", "out", out, "a", a);
}

int ms_cpu_check_matmul_overlap(const ms_tensor *out, const ms_tensor *a, const ms_tensor *b)
{
    if (overlaps(out, a) || overlaps(out, b))
        return MS_FAIL(MS_ERR_INVALID, "matmul: out shares memory with %s; GEMM cannot write "
                       "its own input", overlaps(out, a) ? "a" : "b");
    return MS_OK;
}

typedef struct scale_ctx { double beta; int dtype; } scale_ctx;

static void scale_run(void *ctx, int64_t n, char *const *p, const int64_t *s)
{
    const scale_ctx *c = ctx;
    for (int64_t i = 0; i < n; i++) {
        /* beta == 0 overwrites, so NaN in uninitialised memory does not survive (as BLAS) */
        if (c->dtype == MS_F32) {
            float *v = (float *)p[0] + i * s[0];
            *v = c->beta == 0.0 ? 0.0f : (float)c->beta * *v;
        } else {
            double *v = (double *)p[0] + i * s[0];
            *v = c->beta == 0.0 ? 0.0 : c->beta * *v;
        }
    }
}

/* A dense row-major copy of one stored matrix (rows x cols) of t at element offset. */
static void pack_matrix(void *dst, const ms_tensor *t, int64_t offset)
{
    int n = t->ndim;
    int64_t shape[2] = {t->shape[n - 2], t->shape[n - 1]};
    int64_t dense[2] = {shape[1], 1};
    int64_t strides[2] = {t->strides[n - 2], t->strides[n - 1]};
    size_t size = ms_dtype_size(t->dtype);
    const char *src = (const char *)ms_tensor_data(t) + offset * (int64_t)size;
    ms_cpu_copy_layout(dst, dense, src, strides, 2, shape, size);
}

static void unpack_matrix(ms_tensor *t, int64_t offset, const void *src)
{
    int n = t->ndim;
    int64_t shape[2] = {t->shape[n - 2], t->shape[n - 1]};
    int64_t dense[2] = {shape[1], 1};
    int64_t strides[2] = {t->strides[n - 2], t->strides[n - 1]};
    size_t size = ms_dtype_size(t->dtype);
    char *dst = (char *)ms_tensor_data(t) + offset * (int64_t)size;
    ms_cpu_copy_layout(dst, strides, src, dense, 2, shape, size);
}

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
    MS_CPU_ON_DEVICE(out, ms_cuda_matmul(out, a, b, trans_a, trans_b, alpha, beta));
    ms_place place = MS_PLACE_CPU;
    MS_CHECK(ms_cpu_check_matmul_operands(&place, out, a, b));
    trans_a = trans_a != 0;
    trans_b = trans_b != 0;
    int64_t m = 0, n = 0, k = 0;
    MS_CHECK(check_matmul_shapes(out, a, b, trans_a, trans_b, &m, &n, &k));
    MS_CHECK(ms_cpu_check_matmul_overlap(out, a, b));
    if (out->numel == 0)
        return MS_OK;
    if (k == 0) {
        scale_ctx c = {beta, out->dtype};
        ms_iter it;
        ms_iter_begin(&it, out->ndim, out->shape);
        MS_CHECK(ms_iter_tensor(&it, "matmul", "out", out));
        ms_iter_run(&it, scale_run, &c);
        return MS_OK;
    }

    int nd = a->ndim, nlead = nd - 2;
    int shared_b = b->ndim == 2;
    int64_t batches = 1;
    for (int d = 0; d < nlead; d++)
        batches *= a->shape[d];
    size_t size = ms_dtype_size(a->dtype);
    matrix_layout la = layout_of_tensor(a), lb = layout_of_tensor(b), lo = layout_of_tensor(out);

    /* Linear layers: a stack of row-major batches times one shared b is a single GEMM. */
    if (shared_b && batches > 1 && !trans_a && la.in_place && !la.transposed && lb.in_place &&
        lo.in_place && !lo.transposed && batches_stack(a, la.ld) && batches_stack(out, lo.ld) &&
        batches * m <= INT_MAX) {
        gemm(a->dtype, 0, trans_b ^ lb.transposed, batches * m, n, k, alpha,
             ms_tensor_data(a), la.ld, ms_tensor_data(b), lb.ld, beta, ms_tensor_data(out),
             lo.ld);
        return MS_OK;
    }

    /* Scratch for operands BLAS cannot read in place (one matrix each, reused). */
    int64_t a_rows = a->shape[nd - 2], a_cols = a->shape[nd - 1];
    int64_t b_rows = b->shape[b->ndim - 2], b_cols = b->shape[b->ndim - 1];
    void *a_dense = NULL, *b_dense = NULL, *out_dense = NULL;
    int status = MS_OK;
    if (!la.in_place) {
        status = ms_cpu_alloc("matmul", (size_t)(a_rows * a_cols) * size, &a_dense);
        la = (matrix_layout){1, 0, at_least_1(a_cols)};
    }
    if (status == MS_OK && !lb.in_place) {
        status = ms_cpu_alloc("matmul", (size_t)(b_rows * b_cols) * size, &b_dense);
        lb = (matrix_layout){1, 0, at_least_1(b_cols)};
        if (status == MS_OK && shared_b)
            pack_matrix(b_dense, b, 0);
    }
    if (status == MS_OK && !lo.in_place) {
        status = ms_cpu_alloc("matmul", (size_t)(m * n) * size, &out_dense);
        lo = (matrix_layout){1, 0, at_least_1(n)};
    }
    if (status != MS_OK) {
        free(a_dense);
        free(b_dense);
        return status;
    }

    int ta = trans_a ^ la.transposed, tb = trans_b ^ lb.transposed;
    for (int64_t batch = 0; batch < batches; batch++) {
        int64_t a_offset = batch_offset(a, nlead, batch);
        int64_t b_offset = shared_b ? 0 : batch_offset(b, nlead, batch);
        int64_t out_offset = batch_offset(out, nlead, batch);
        const void *a_data = a_dense;
        const void *b_data = b_dense;
        void *out_data = out_dense;
        if (a_dense)
            pack_matrix(a_dense, a, a_offset);
        else
            a_data = (const char *)ms_tensor_data(a) + a_offset * (int64_t)size;
        if (b_dense && !shared_b)
            pack_matrix(b_dense, b, b_offset);
        else if (!b_dense)
            b_data = (const char *)ms_tensor_data(b) + b_offset * (int64_t)size;
        if (out_dense) {
            if (beta != 0.0)
                pack_matrix(out_dense, out, out_offset);
        } else {
            out_data = (char *)ms_tensor_data(out) + out_offset * (int64_t)size;
        }
        if (lo.transposed) /* C^T = op(B)^T op(A)^T into the row-major view of C^T */
            gemm(a->dtype, !tb, !ta, n, m, k, alpha, b_data, lb.ld, a_data, la.ld, beta,
                 out_data, lo.ld);
        else
            gemm(a->dtype, ta, tb, m, n, k, alpha, a_data, la.ld, b_data, lb.ld, beta,
                 out_data, lo.ld);
        if (out_dense)
            unpack_matrix(out, out_offset, out_dense);
    }
    free(a_dense);
    free(b_dense);
    free(out_dense);
    return MS_OK;
}
