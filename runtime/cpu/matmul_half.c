/* moonshard CPU backend: bf16 and f16 GEMM in tiles: blocks of op(a), op(b) and out are
 * converted to f32 in a per-thread scratch, multiplied by ms_cpu_sgemm, out rounded once at the
 * store. */
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "convert.h"
#include "cpu.h"

/* Tile sizes: an out block of TILE_M x TILE_N accumulates in f32 over blocks of TILE_K of the
 * inner dim. The three f32 blocks (768 KiB) are each thread's scratch, kept for the thread's
 * life: like oneDNN's own packing buffers, not tensor memory, so not in ms_memory_stats. */
enum { TILE_M = 256, TILE_N = 256, TILE_K = 256 };

typedef struct half_scratch {
    float a[TILE_M * TILE_K], b[TILE_K * TILE_N], c[TILE_M * TILE_N];
} half_scratch;

/* One stored matrix of a view: element (i, j) at data + i * rs + j * cs (elements). */
typedef struct half_matrix {
    const uint16_t *data;
    int64_t rs, cs;
} half_matrix;

/* The transpose's view of the same elements. */
static half_matrix transposed(half_matrix m) { return (half_matrix){m.data, m.cs, m.rs}; }

static void widen_row(float *dst, const uint16_t *src, int64_t stride, int64_t count, int dtype)
{
    int64_t j = 0;
    if (dtype == MS_BF16) {
        if (stride == 1)
            for (; j < count; j++) /* a shift: the compiler vectorises it */
                dst[j] = ms_k_bits_f32((uint32_t)src[j] << 16);
        for (; j < count; j++)
            dst[j] = ms_k_bf16_to_f32(src[j * stride]);
        return;
    }
#if defined(__F16C__)
    if (stride == 1)
        for (; j + 8 <= count; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
#endif
    for (; j < count; j++)
        dst[j] = ms_k_f16_to_f32(src[j * stride]);
}

/* dst (rows x cols, row-major) = the f32 values of m's block at (r0, c0). */
static void widen_rows(float *dst, half_matrix m, int64_t r0, int64_t c0, int64_t rows,
                       int64_t cols, int dtype)
{
    for (int64_t i = 0; i < rows; i++)
        widen_row(dst + i * cols, m.data + (r0 + i) * m.rs + c0 * m.cs, m.cs, cols, dtype);
}

/* dst = the f32 values of m's block (rows x cols at r0, c0), read along m's unit stride:
 * row-major (returns 0, leading dim cols) or, for a transposed view, as the block's
 * transpose (returns 1, leading dim rows). */
static int widen_block(float *dst, half_matrix m, int64_t r0, int64_t c0, int64_t rows,
                       int64_t cols, int dtype)
{
    const uint16_t *origin = m.data + r0 * m.rs + c0 * m.cs;
    if (m.rs == 1 && m.cs != 1) {
        for (int64_t j = 0; j < cols; j++)
            widen_row(dst + j * rows, origin + j * m.cs, 1, rows, dtype);
        return 1;
    }
    widen_rows(dst, m, r0, c0, rows, cols, dtype);
    return 0;
}

static void store_block(uint16_t *out, int64_t rs, int64_t cs, const float *src, int64_t ld,
                        int64_t rows, int64_t cols, int dtype)
{
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *row = out + i * rs;
        const float *values = src + i * ld;
        int64_t j = 0;
        if (dtype == MS_BF16) {
            for (; j < cols; j++)
                row[j * cs] = ms_k_f32_to_bf16(values[j]);
            continue;
        }
#if defined(__F16C__)
        if (cs == 1) /* the instruction rounds to nearest even as ms_k_f32_to_f16 does */
            for (; j + 8 <= cols; j += 8)
                _mm_storeu_si128((__m128i *)(row + j),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(values + j),
                                                 _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; j < cols; j++)
            row[j * cs] = ms_k_f32_to_f16(values[j]);
    }
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* out (m x n, strides ors, ocs) = alpha * A @ B + beta * out, where A (m x k) and B (k x n)
 * are views of 16-bit elements; f32 accumulation over the whole of k, one rounding. */
static int gemm_tiles(half_scratch *s, int dtype, half_matrix A, half_matrix B, uint16_t *out,
                       int64_t ors, int64_t ocs, int64_t m, int64_t n, int64_t k, float alpha,
                       float beta)
{
    half_matrix O = {out, ors, ocs};
    for (int64_t i0 = 0; i0 < m; i0 += TILE_M) {
        int64_t mc = min64(TILE_M, m - i0);
        for (int64_t j0 = 0; j0 < n; j0 += TILE_N) {
            int64_t nc = min64(TILE_N, n - j0);
            if (beta != 0.0f)
                widen_rows(s->c, O, i0, j0, mc, nc, dtype);
            if (k == 0) /* beta == 0 overwrites, so NaN in the old out does not survive */
                for (int64_t e = 0; e < mc * nc; e++)
                    s->c[e] = beta == 0.0f ? 0.0f : beta * s->c[e];
            for (int64_t p0 = 0; p0 < k; p0 += TILE_K) {
                int64_t kc = min64(TILE_K, k - p0);
                int ta = widen_block(s->a, A, i0, p0, mc, kc, dtype);
                int tb = widen_block(s->b, B, p0, j0, kc, nc, dtype);
                MS_CHECK(ms_cpu_sgemm(ta, tb, mc, nc, kc, alpha, s->a, ta ? mc : kc, s->b,
                                      tb ? kc : nc, p0 == 0 ? beta : 1.0f, s->c, nc));
            }
            store_block(out + i0 * ors + j0 * ocs, ors, ocs, s->c, nc, mc, nc, dtype);
        }
    }
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

static half_matrix matrix_at(const ms_tensor *t, int64_t offset)
{
    int n = t->ndim;
    return (half_matrix){(const uint16_t *)ms_tensor_data(t) + offset, t->strides[n - 2],
                         t->strides[n - 1]};
}

int ms_cpu_matmul_half(ms_tensor *out, const ms_tensor *a, const ms_tensor *b, int trans_a,
                       int trans_b, double alpha, double beta, int64_t m, int64_t n, int64_t k)
{
    half_scratch *s;
    MS_CHECK(ms_cpu_scratch("matmul", MS_SCRATCH_HALF_GEMM, sizeof *s, (void **)&s));
    int nlead = a->ndim - 2;
    int64_t batches = 1;
    for (int d = 0; d < nlead; d++)
        batches *= a->shape[d];
    int no = out->ndim;
    for (int64_t batch = 0; batch < batches; batch++) {
        half_matrix A = matrix_at(a, batch_offset(a, nlead, batch));
        half_matrix B = matrix_at(b, b->ndim == 2 ? 0 : batch_offset(b, nlead, batch));
        uint16_t *o = (uint16_t *)ms_tensor_data(out) + batch_offset(out, nlead, batch);
        MS_CHECK(gemm_tiles(s, a->dtype, trans_a ? transposed(A) : A,
                            trans_b ? transposed(B) : B, o, out->strides[no - 2],
                            out->strides[no - 1], m, n, k, (float)alpha, (float)beta));
    }
    return MS_OK;
}
