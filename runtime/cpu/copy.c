/* moonshard CPU backend: ms_copy (broadcast, any strides, every dtype pair), ms_fill,
 * ms_arange, ms_equal and ms_allclose. No gradients here: every output is assigned. */
#include <string.h>

#include "cpu.h"
#include "cast.h"

/* ---- dtype conversion loops: convert_<dst>_<src>, one per pair ---- */

#define CONVERT_FN(DN, DT, STORE, SN, ST, LOAD)                                          \
    static void convert_##DN##_##SN(void *ctx, int64_t n, char *const *p,                \
                                    const int64_t *s)                                    \
    {                                                                                    \
        (void)ctx;                                                                       \
        DT *dst = (DT *)p[0];                                                            \
        const ST *src = (const ST *)p[1];                                                \
        int64_t sd = s[0], ss = s[1];                                                    \
        if (sd == 1 && ss == 1) {                                                        \
            for (int64_t i = 0; i < n; i++)                                              \
                dst[i] = STORE(LOAD(src[i]));                                            \
        } else if (ss == 0) {                                                            \
            DT value = STORE(LOAD(src[0]));                                              \
            for (int64_t i = 0; i < n; i++)                                              \
                dst[i * sd] = value;                                                     \
        } else {                                                                         \
            for (int64_t i = 0; i < n; i++)                                              \
                dst[i * sd] = STORE(LOAD(src[i * ss]));                                  \
        }                                                                                \
    }

#define CONVERT_TO(DN, DT, STORE)                                     \
    CONVERT_FN(DN, DT, STORE, f32, float, MS_CAST_LOAD_F32)            \
    CONVERT_FN(DN, DT, STORE, f64, double, MS_CAST_LOAD_F64)           \
    CONVERT_FN(DN, DT, STORE, bf16, uint16_t, MS_CAST_LOAD_BF16)       \
    CONVERT_FN(DN, DT, STORE, f16, uint16_t, MS_CAST_LOAD_F16)         \
    CONVERT_FN(DN, DT, STORE, i32, int32_t, MS_CAST_LOAD_I32)          \
    CONVERT_FN(DN, DT, STORE, i64, int64_t, MS_CAST_LOAD_I64)          \
    CONVERT_FN(DN, DT, STORE, u8, uint8_t, MS_CAST_LOAD_U8)

CONVERT_TO(f32, float, MS_CAST_STORE_F32)
CONVERT_TO(f64, double, MS_CAST_STORE_F64)
CONVERT_TO(bf16, uint16_t, MS_CAST_STORE_BF16)
CONVERT_TO(f16, uint16_t, MS_CAST_STORE_F16)
CONVERT_TO(i32, int32_t, MS_CAST_STORE_I32)
CONVERT_TO(i64, int64_t, MS_CAST_STORE_I64)
CONVERT_TO(u8, uint8_t, MS_CAST_STORE_U8)

#define CONVERT_ROW(DN)                                                                \
    {convert_##DN##_f32, convert_##DN##_f64, convert_##DN##_bf16, convert_##DN##_f16,  \
     convert_##DN##_i32, convert_##DN##_i64, convert_##DN##_u8}

/* Indexed [dst dtype][src dtype] in ms_dtype order. */
static const ms_iter_fn convert_table[MS_DTYPE_COUNT][MS_DTYPE_COUNT] = {
    CONVERT_ROW(f32), CONVERT_ROW(f64), CONVERT_ROW(bf16), CONVERT_ROW(f16),
    CONVERT_ROW(i32), CONVERT_ROW(i64), CONVERT_ROW(u8)};

static int same_geometry(const ms_tensor *a, const ms_tensor *b)
{
    if (a->ndim != b->ndim || ms_tensor_data(a) != ms_tensor_data(b))
        return 0;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d] || (a->shape[d] > 1 && a->strides[d] != b->strides[d]))
            return 0;
    return 1;
}

/* src does not broadcast to dst but has as many elements: copy in row-major order, reading
 * src as if it had dst's shape (through a dense staging block when src is strided). Shapes
 * that both broadcast and match in size differ only by leading 1s, so the two readings of
 * a copy never disagree. */
static int copy_reshaped(ms_tensor *dst, const ms_tensor *src)
{
    void *data, *owned;
    MS_CHECK(ms_cpu_dense("copy", src, 1, &data, &owned));
    int64_t dense_strides[MS_MAX_DIMS];
    ms_contiguous_strides(dst->ndim, dst->shape, dense_strides);
    ms_iter it;
    ms_iter_begin(&it, dst->ndim, dst->shape);
    int status = ms_iter_tensor(&it, "copy", "dst", dst);
    ms_iter_raw(&it, data, ms_dtype_size(src->dtype), dense_strides);
    it.any_order = 1;
    if (status == MS_OK && dst->numel > 0) {
        size_t elem_size = ms_dtype_size(dst->dtype);
        if (dst->dtype == src->dtype)
            ms_iter_run(&it, ms_cpu_copy_run, &elem_size);
        else
            ms_iter_run(&it, convert_table[dst->dtype][src->dtype], NULL);
    }
    ms_cpu_dense_done(src, owned, 0);
    return status;
}

/* A contiguous copy between blocks that overlap entirely or not at all, split across
 * threads in 64 KiB pieces when it is large. */
typedef struct bytes_job { char *dst; const char *src; size_t n; } bytes_job;
enum { BYTES_PIECE = 64 * 1024 };

static void copy_pieces(void *arg, int64_t begin, int64_t end)
{
    const bytes_job *job = arg;
    size_t first = (size_t)begin * BYTES_PIECE, last = (size_t)end * BYTES_PIECE;
    if (last > job->n)
        last = job->n;
    memcpy(job->dst + first, job->src + first, last - first);
}

static void copy_bytes(void *dst, const void *src, size_t n)
{
    const char *d = dst, *s = src;
    int disjoint = d + n <= s || s + n <= d;
    int64_t pieces = (int64_t)((n + BYTES_PIECE - 1) / BYTES_PIECE);
    int ranges = disjoint ? ms_parallel_ranges(pieces, (double)n / 4) : 1;
    if (ranges < 2) {
        memmove(dst, src, n);
        return;
    }
    bytes_job job = {dst, src, n};
    ms_parallel_for(pieces, ranges, copy_pieces, &job);
}

int ms_cpu_copy(ms_tensor *dst, const ms_tensor *src)
{
    if (!ms_broadcasts(src, dst) && src->numel == dst->numel)
        return copy_reshaped(dst, src);
    ms_iter it;
    ms_iter_begin(&it, dst->ndim, dst->shape);
    MS_CHECK(ms_iter_tensor(&it, "copy", "dst", dst));
    MS_CHECK(ms_iter_tensor(&it, "copy", "src", src));
    if (dst->numel == 0)
        return MS_OK;
    if (dst->dtype == src->dtype) {
        if (same_geometry(dst, src))
            return MS_OK;
        size_t elem_size = ms_dtype_size(dst->dtype);
        if (src->numel == dst->numel && ms_tensor_is_contiguous(dst) &&
            ms_tensor_is_contiguous(src)) {
            copy_bytes(ms_tensor_data(dst), ms_tensor_data(src), ms_tensor_nbytes(dst));
            return MS_OK;
        }
        it.any_order = 1;
        ms_iter_run(&it, ms_cpu_copy_run, &elem_size);
        return MS_OK;
    }
    it.any_order = 1;
    ms_iter_run(&it, convert_table[dst->dtype][src->dtype], NULL);
    return MS_OK;
}

int ms_cpu_fill(ms_tensor *t, double value)
{
    uint64_t element = 0; /* the converted value, at most 8 bytes */
    ms_store_double(t->dtype, &element, value);
    size_t elem_size = ms_dtype_size(t->dtype);
    ms_iter it;
    ms_iter_begin(&it, t->ndim, t->shape);
    MS_CHECK(ms_iter_tensor(&it, "fill", "t", t));
    ms_iter_raw(&it, &element, elem_size, NULL);
    it.any_order = 1;
    ms_iter_run(&it, ms_cpu_copy_run, &elem_size);
    return MS_OK;
}

/* ---- arange ---- */

typedef struct arange_ctx {
    int dtype;
    int exact_int; /* start and step are integers: integer dtypes count exactly */
    double start, step;
    int64_t start_int, step_int;
    int64_t next; /* row-major index of the run's first element */
} arange_ctx;

static void arange_run(void *ctx, int64_t n, char *const *p, const int64_t *s)
{
    arange_ctx *c = ctx;
    size_t elem_size = ms_dtype_size(c->dtype);
    if (c->dtype == MS_F32) {
        float *out = (float *)p[0];
        for (int64_t i = 0; i < n; i++)
            out[i * s[0]] = (float)(c->start + (double)(c->next + i) * c->step);
    } else if (c->dtype == MS_F64) {
        double *out = (double *)p[0];
        for (int64_t i = 0; i < n; i++)
            out[i * s[0]] = c->start + (double)(c->next + i) * c->step;
    } else {
        for (int64_t i = 0; i < n; i++) {
            char *dst = p[0] + i * s[0] * (int64_t)elem_size;
            if (c->exact_int) /* unsigned arithmetic: wraps instead of overflowing */
                ms_store_int(c->dtype, dst,
                                 (int64_t)((uint64_t)c->start_int +
                                           (uint64_t)(c->next + i) * (uint64_t)c->step_int));
            else
                ms_store_double(c->dtype, dst, c->start + (double)(c->next + i) * c->step);
        }
    }
    c->next += n;
}

static int is_int64(double v)
{
    return v == v && v >= -9.2e18 && v <= 9.2e18 && v == (double)(int64_t)v;
}

int ms_cpu_arange(ms_tensor *t, double start, double step)
{
    arange_ctx c = {.dtype = t->dtype, .start = start, .step = step};
    c.exact_int = is_int64(start) && is_int64(step);
    if (c.exact_int) {
        c.start_int = (int64_t)start;
        c.step_int = (int64_t)step;
    }
    ms_iter it;
    ms_iter_begin(&it, t->ndim, t->shape);
    MS_CHECK(ms_iter_tensor(&it, "arange", "t", t));
    ms_iter_run(&it, arange_run, &c);
    return MS_OK;
}

/* ---- comparisons ---- */

typedef struct equal_ctx { size_t elem_size; int equal; } equal_ctx;

static void equal_run(void *ctx, int64_t n, char *const *p, const int64_t *s)
{
    equal_ctx *c = ctx;
    if (!c->equal)
        return;
    int64_t step_a = s[0] * (int64_t)c->elem_size, step_b = s[1] * (int64_t)c->elem_size;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(p[0] + i * step_a, p[1] + i * step_b, c->elem_size) != 0) {
            c->equal = 0;
            return;
        }
}

int ms_cpu_equal(int *equal, const ms_tensor *a, const ms_tensor *b)
{
    equal_ctx c = {ms_dtype_size(a->dtype), 1};
    if (ms_tensor_is_contiguous(a) && ms_tensor_is_contiguous(b)) {
        c.equal = a->numel == 0 ||
                  memcmp(ms_tensor_data(a), ms_tensor_data(b), ms_tensor_nbytes(a)) == 0;
    } else {
        ms_iter it;
        ms_iter_begin(&it, a->ndim, a->shape);
        MS_CHECK(ms_iter_tensor(&it, "equal", "a", a));
        MS_CHECK(ms_iter_tensor(&it, "equal", "b", b));
        ms_iter_run(&it, equal_run, &c);
    }
    *equal = c.equal;
    return MS_OK;
}

typedef struct close_ctx {
    int dtype_a, dtype_b;
    double rtol, atol;
    int close;
} close_ctx;

static void close_run(void *ctx, int64_t n, char *const *p, const int64_t *s)
{
    close_ctx *c = ctx;
    if (!c->close)
        return;
    int64_t step_a = s[0] * (int64_t)ms_dtype_size(c->dtype_a);
    int64_t step_b = s[1] * (int64_t)ms_dtype_size(c->dtype_b);
    for (int64_t i = 0; i < n; i++) {
        double x = ms_load_double(c->dtype_a, p[0] + i * step_a);
        double y = ms_load_double(c->dtype_b, p[1] + i * step_b);
        /* Equal values (infinities included) are close; otherwise the tolerance decides,
         * and every comparison with NaN is false. */
        if (x == y)
            continue;
        if (!(isfinite(x) && isfinite(y) && fabs(x - y) <= c->atol + c->rtol * fabs(y))) {
            c->close = 0;
            return;
        }
    }
}

int ms_cpu_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                    double atol)
{
    close_ctx c = {a->dtype, b->dtype, rtol, atol, 1};
    ms_iter it;
    ms_iter_begin(&it, a->ndim, a->shape);
    MS_CHECK(ms_iter_tensor(&it, "allclose", "a", a));
    MS_CHECK(ms_iter_tensor(&it, "allclose", "b", b));
    ms_iter_run(&it, close_run, &c);
    *close = c.close;
    return MS_OK;
}
