/* moonshard CPU backend: ms_matmul, f32 through ms_cpu_sgemm (oneDNN), f64 through OpenBLAS
 * (2-D, batched, b shared by every batch), and ms_linear.
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
static int gemm(int dtype, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                double alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                double beta, void *c, int64_t ldc)
{
    if (dtype == MS_F32)
        return ms_cpu_sgemm(trans_a, trans_b, m, n, k, (float)alpha, a, lda, b, ldb,
                            (float)beta, c, ldc);
    cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, (int)m, (int)n, (int)k, alpha, a, (int)lda,
                b, (int)ldb, beta, c, (int)ldc);
    return MS_OK;
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

int ms_cpu_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                  int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k)
{
    if (out->numel == 0)
        return MS_OK;
    if (out->dtype == MS_BF16 || out->dtype == MS_F16)
        return ms_cpu_matmul_half(out, a, b, trans_a, trans_b, alpha, beta, m, n, k);
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
        return gemm(a->dtype, 0, trans_b ^ lb.transposed, batches * m, n, k, alpha,
                    ms_tensor_data(a), la.ld, ms_tensor_data(b), lb.ld, beta,
                    ms_tensor_data(out), lo.ld);
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
    for (int64_t batch = 0; batch < batches && status == MS_OK; batch++) {
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
            status = gemm(a->dtype, !tb, !ta, n, m, k, alpha, b_data, lb.ld, a_data, la.ld,
                          beta, out_data, lo.ld);
        else
            status = gemm(a->dtype, ta, tb, m, n, k, alpha, a_data, la.ld, b_data, lb.ld, beta,
                          out_data, lo.ld);
        if (out_dense && status == MS_OK)
            unpack_matrix(out, out_offset, out_dense);
    }
    free(a_dense);
    free(b_dense);
    free(out_dense);
    return status;
}

/* f32 operands BLAS reads in place, x and out row-major and a dense bias: the bias goes into
 * each GEMM piece (ms_cpu_sgemm_bias); anything else is copied in first. */
int ms_cpu_linear(ms_tensor *out, const ms_tensor *x, const ms_tensor *weight,
                  const ms_tensor *bias, int64_t m, int64_t n, int64_t k)
{
    matrix_layout lx = layout_of_tensor(x), lw = layout_of_tensor(weight),
                  lo = layout_of_tensor(out);
    int dense_bias = bias && (n == 1 || bias->strides[0] == 1);
    if (out->dtype != MS_F32 || !dense_bias || out->numel == 0 || k == 0 || !lx.in_place ||
        lx.transposed || !lw.in_place || !lo.in_place || lo.transposed) {
        if (bias)
            MS_CHECK(ms_cpu_copy(out, bias));
        return ms_cpu_matmul(out, x, weight, 0, 1, 1.0, bias ? 1.0 : 0.0, m, n, k);
    }
    return ms_cpu_sgemm_bias(0, !lw.transposed, m, n, k, ms_tensor_data(x), lx.ld,
                             ms_tensor_data(weight), lw.ld, ms_tensor_data(bias),
                             ms_tensor_data(out), lo.ld);
}
