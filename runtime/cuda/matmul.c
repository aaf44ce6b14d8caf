/* moonshard CUDA backend: ms_matmul through cuBLAS (cublasGemmEx for one matrix,
 * cublasGemmStridedBatchedEx when the batches are evenly spaced; bf16 and f16 read and written
 * as they are, computed in f32). out = alpha op(a) op(b) + beta out: assigned, or accumulated
 * with beta = 1. Operands and shapes are checked by runtime/ops/matmul.c. */
#include <limits.h>

#include "cuda_internal.h"

/* How cuBLAS reads one stored matrix of a view: row-major with a unit column stride as is,
 * a unit row stride (a transposed view) as the transpose with the flag flipped. */
typedef struct layout {
    int in_place, transposed;
    int64_t ld;
} layout;

static int64_t at_least_1(int64_t v) { return v > 1 ? v : 1; }

static layout layout_of(const ms_tensor *t)
{
    int n = t->ndim;
    int64_t rows = t->shape[n - 2], cols = t->shape[n - 1];
    int64_t row_stride = t->strides[n - 2], col_stride = t->strides[n - 1];
    layout l = {0, 0, 0};
    if ((cols == 1 || col_stride == 1) && (rows == 1 || row_stride >= at_least_1(cols))) {
        l = (layout){1, 0, rows == 1 ? at_least_1(cols) : row_stride};
    } else if ((rows == 1 || row_stride == 1) && (cols == 1 || col_stride >= at_least_1(rows))) {
        l = (layout){1, 1, cols == 1 ? at_least_1(rows) : col_stride};
    }
    if (l.ld > INT_MAX)
        l.in_place = 0;
    return l;
}

/* The element distance between consecutive batches when every batch dim steps evenly
 * (shared b: 0); -1 when they do not. */
static int64_t batch_stride(const ms_tensor *t, int nlead)
{
    if (t->ndim == 2)
        return 0;
    int64_t stride = -1, span = 0;
    for (int d = nlead - 1; d >= 0; d--) {
        if (t->shape[d] == 1)
            continue;
        if (stride < 0)
            stride = t->strides[d];
        else if (t->strides[d] != span)
            return -1;
        span = t->strides[d] * t->shape[d];
    }
    return stride < 0 ? 0 : stride;
}

static int64_t batch_offset(const ms_tensor *t, int nlead, int64_t batch)
{
    if (t->ndim == 2)
        return 0;
    int64_t offset = 0;
    for (int d = nlead - 1; d >= 0 && batch > 0; d--) {
        offset += (batch % t->shape[d]) * t->strides[d];
        batch /= t->shape[d];
    }
    return offset;
}

typedef struct gemm_call {
    cublasHandle_t handle;
    cudaDataType_t type;
    cublasComputeType_t compute;
    const void *alpha, *beta;
} gemm_call;

/* Row-major C[m, n] = alpha op(A) op(B) + beta C as the column-major C^T = op(B)^T op(A)^T,
 * batch times with the given element strides between batches. */
static int gemm(const gemm_call *c, int ta, int tb, int64_t m, int64_t n, int64_t k,
                const char *a, int64_t lda, int64_t stride_a, const char *b, int64_t ldb,
                int64_t stride_b, char *out, int64_t ldc, int64_t stride_c, int64_t batches)
{
    cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (batches == 1) {
        MS_CUBLAS_CHECK(cublasGemmEx(c->handle, op_b, op_a, (int)n, (int)m, (int)k, c->alpha, b,
                                     c->type, (int)ldb, a, c->type, (int)lda, c->beta, out,
                                     c->type, (int)ldc, c->compute, CUBLAS_GEMM_DEFAULT),
                        "matmul: cublasGemmEx");
        return MS_OK;
    }
    MS_CUBLAS_CHECK(cublasGemmStridedBatchedEx(c->handle, op_b, op_a, (int)n, (int)m, (int)k,
                                               c->alpha, b, c->type, (int)ldb, stride_b, a,
                                               c->type, (int)lda, stride_a, c->beta, out,
                                               c->type, (int)ldc, stride_c, (int)batches,
                                               c->compute, CUBLAS_GEMM_DEFAULT),
                    "matmul: cublasGemmStridedBatchedEx");
    return MS_OK;
}

/* Every operand is in place now (dense copies made by the caller). */
static int run(const gemm_call *c, ms_tensor *out, const ms_tensor *a, const ms_tensor *b,
               int trans_a, int trans_b, int64_t m, int64_t n, int64_t k)
{
    int nlead = a->ndim - 2;
    int64_t batches = 1;
    for (int d = 0; d < nlead; d++)
        batches *= a->shape[d];
    layout la = layout_of(a), lb = layout_of(b), lo = layout_of(out);
    int ta = trans_a ^ la.transposed, tb = trans_b ^ lb.transposed;
    size_t size = ms_dtype_size(a->dtype);
    int64_t sa = batch_stride(a, nlead), sb = batch_stride(b, nlead), so = batch_stride(out, nlead);
    /* Linear layers: row-major batches of a stacked as one tall matrix times a shared b */
    if (b->ndim == 2 && batches > 1 && !ta && !lo.transposed && sa == m * la.ld &&
        so == m * lo.ld && batches * m <= INT_MAX)
        return gemm(c, 0, tb, batches * m, n, k, ms_tensor_data(a), la.ld, 0, ms_tensor_data(b),
                    lb.ld, 0, ms_tensor_data(out), lo.ld, 0, 1);
    int strided = sa >= 0 && sb >= 0 && so >= 0 && batches <= INT_MAX;
    int64_t step = strided ? batches : 1;
    for (int64_t batch = 0; batch < batches; batch += step) {
        const char *pa =
            (const char *)ms_tensor_data(a) + batch_offset(a, nlead, batch) * (int64_t)size;
        const char *pb =
            (const char *)ms_tensor_data(b) + batch_offset(b, nlead, batch) * (int64_t)size;
        char *po = (char *)ms_tensor_data(out) + batch_offset(out, nlead, batch) * (int64_t)size;
        if (lo.transposed) /* out^T = op(b)^T op(a)^T into the row-major view of out^T */
            MS_CHECK(gemm(c, !tb, !ta, n, m, k, pb, lb.ld, sb, pa, la.ld, sa, po, lo.ld, so, step));
        else
            MS_CHECK(gemm(c, ta, tb, m, n, k, pa, la.ld, sa, pb, lb.ld, sb, po, lo.ld, so, step));
    }
    return MS_OK;
}

int ms_cuda_matmul(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                   int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k)
{
    int device = ms_cuda_device_of(out);
    if (out->numel == 0)
        return MS_OK;
    if (k == 0)
        return beta == 0.0 ? ms_cuda_fill(out, 0.0)
                           : ms_cuda_binary_scalar(out, out, beta, MS_MUL, 0);
    /* 16-bit operands and out, f32 accumulation (tensor cores), one rounding at the store */
    float alpha32 = (float)alpha, beta32 = (float)beta;
    gemm_call c = {ms_cuda_blas(device), CUDA_R_32F, CUBLAS_COMPUTE_32F, &alpha32, &beta32};
    if (a->dtype == MS_BF16)
        c.type = CUDA_R_16BF;
    else if (a->dtype == MS_F16)
        c.type = CUDA_R_16F;
    else if (a->dtype == MS_F64)
        c = (gemm_call){ms_cuda_blas(device), CUDA_R_64F, CUBLAS_COMPUTE_64F, &alpha, &beta};
    ms_tensor *dense_a = (ms_tensor *)a, *dense_b = (ms_tensor *)b, *dense_out = out;
    int status = MS_OK;
    if (!layout_of(a).in_place)
        status = ms_cuda_dense("matmul", a, 1, &dense_a);
    if (status == MS_OK && !layout_of(b).in_place)
        status = ms_cuda_dense("matmul", b, 1, &dense_b);
    if (status == MS_OK && !layout_of(out).in_place)
        status = ms_cuda_dense("matmul", out, beta != 0.0, &dense_out);
    if (status == MS_OK)
        status = run(&c, dense_out, dense_a, dense_b, trans_a, trans_b, m, n, k);
    int done = ms_cuda_dense_done(out, dense_out, status == MS_OK);
    ms_cuda_dense_done(a, dense_a, 0);
    ms_cuda_dense_done(b, dense_b, 0);
    return status != MS_OK ? status : done;
}
