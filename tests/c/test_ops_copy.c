/* C unit tests of ms_copy, ms_fill, ms_arange, ms_equal and ms_allclose: every dtype pair,
 * broadcasting, strided views, conversion edge cases and argument errors. */
#include "check.h"

static const int all_dtypes[MS_DTYPE_COUNT] = {MS_F32, MS_F64, MS_BF16, MS_F16,
                                               MS_I32, MS_I64, MS_U8};

/* Small integers are exact in every dtype, so every pair must round-trip them. */
static void test_copy_every_pair(void)
{
    const int64_t shape[3] = {2, 3, 5};
    for (int s = 0; s < MS_DTYPE_COUNT; s++)
        for (int d = 0; d < MS_DTYPE_COUNT; d++)
            for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                ms_tensor *src0 = make(all_dtypes[s], 3, shape);
                for (int64_t i = 0; i < src0->numel; i++)
                    set(src0, i, (double)((i * 7) % 23));
                ms_tensor *src = with_layout(src0, layout);
                ms_tensor *dst0 = make(all_dtypes[d], 3, shape);
                ms_tensor *dst = with_layout(dst0, (layout + 1) % LAYOUT_COUNT);
                CHECK_OK(ms_copy(dst, src));
                int same = 1;
                for (int64_t i = 0; i < src0->numel; i++)
                    same &= get(dst, i) == (double)((i * 7) % 23);
                CHECK_MSG(same, "copy %s -> %s, %s", dtype_label(all_dtypes[s]),
                          dtype_label(all_dtypes[d]), layout_names[layout]);
                CHECK(sentinel_intact(dst));
                ms_tensor_free(src0);
                ms_tensor_free(src);
                ms_tensor_free(dst0);
                ms_tensor_free(dst);
            }
}

static void test_copy_broadcast(void)
{
    /* src [3, 1] broadcast into dst [2, 3, 4]: dst[i, j, k] = src[j, 0] */
    ms_tensor *src = make(MS_F64, 2, SHAPE(3, 1));
    for (int j = 0; j < 3; j++)
        set(src, j, 10.0 + j);
    ms_tensor *dst0 = make(MS_F32, 3, SHAPE(2, 3, 4));
    for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
        ms_tensor *dst = with_layout(dst0, layout);
        CHECK_OK(ms_copy(dst, src));
        int ok = 1;
        for (int64_t i = 0; i < 24; i++)
            ok &= get(dst, i) == 10.0 + (double)((i / 4) % 3);
        CHECK_MSG(ok, "broadcast copy into %s", layout_names[layout]);
        ms_tensor_free(dst);
    }
    /* a 0-dim source fills everything */
    ms_tensor *scalar = make(MS_I64, 0, NULL);
    set(scalar, 0, 7);
    CHECK_OK(ms_copy(dst0, scalar));
    CHECK(get(dst0, 0) == 7 && get(dst0, 23) == 7);
    /* same size, shapes that do not broadcast: a row-major (reshaping) copy */
    ms_tensor *flat0 = make(MS_I32, 1, SHAPE(24));
    CHECK_OK(ms_arange(flat0, 0, 1));
    for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
        ms_tensor *flat = with_layout(flat0, layout);
        ms_tensor *dst = with_layout(dst0, (layout + 1) % LAYOUT_COUNT);
        ms_tensor *back = make(MS_F64, 2, SHAPE(6, 4));
        CHECK_OK(ms_copy(dst, flat));
        CHECK_OK(ms_copy(back, dst));
        int ok = 1;
        for (int64_t i = 0; i < 24; i++)
            ok &= get(dst, i) == (double)i && get(back, i) == (double)i;
        CHECK_MSG(ok && sentinel_intact(dst), "reshaping copy %s", layout_names[layout]);
        ms_tensor_free(flat);
        ms_tensor_free(dst);
        ms_tensor_free(back);
    }
    ms_tensor *column = make(MS_F32, 2, SHAPE(24, 1));
    CHECK_OK(ms_copy(column, flat0)); /* [24] -> [24, 1] (FSDP's flat buffers) */
    CHECK(get(column, 23) == 23);
    ms_tensor_free(column);
    ms_tensor_free(flat0);
    /* shapes that neither broadcast nor match in size */
    ms_tensor *wrong = make(MS_F32, 2, SHAPE(4, 5));
    CHECK_ERR(ms_copy(dst0, wrong), MS_ERR_SHAPE);
    CHECK(strstr(ms_last_error(), "[4, 5]") != NULL);
    CHECK_ERR(ms_copy(src, dst0), MS_ERR_SHAPE); /* bigger into smaller */
    ms_tensor_free(src);
    ms_tensor_free(dst0);
    ms_tensor_free(scalar);
    ms_tensor_free(wrong);
}

/* Transposed reads are walked in tiles: shapes around and beyond the tile size. */
static void test_copy_transposed(void)
{
    const int64_t shapes[][3] = {{70, 45, 1}, {33, 64, 1}, {3, 40, 50}, {2, 31, 97}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int ndim = shapes[s][2] == 1 ? 2 : 3;
        for (int k = 0; k < 3; k++) {
            const int dtypes[3][2] = {{MS_F32, MS_F32}, {MS_F64, MS_BF16}, {MS_U8, MS_I64}};
            ms_tensor *src0 = make(dtypes[k][0], ndim, shapes[s]);
            for (int64_t i = 0; i < src0->numel; i++)
                set(src0, i, (double)(i % 200));
            ms_tensor *src = with_layout(src0, LAYOUT_REVERSED);
            ms_tensor *dst = make(dtypes[k][1], ndim, shapes[s]);
            CHECK_OK(ms_copy(dst, src));
            int ok = 1;
            for (int64_t i = 0; i < src0->numel; i++)
                ok &= get(dst, i) == (double)(i % 200);
            CHECK_MSG(ok, "transposed copy shape %zu %s -> %s", s, dtype_label(dtypes[k][0]),
                      dtype_label(dtypes[k][1]));
            ms_tensor_free(src0);
            ms_tensor_free(src);
            ms_tensor_free(dst);
        }
    }
}

static void test_conversion_rules(void)
{
    ms_tensor *f = make(MS_F64, 1, SHAPE(8));
    const double values[8] = {NAN, INFINITY, -INFINITY, 3.9, -3.9, 1e30, -1e30, 300.5};
    for (int i = 0; i < 8; i++)
        set(f, i, values[i]);
    /* float -> int truncates toward zero, saturates, NaN -> 0 */
    ms_tensor *i32 = make(MS_I32, 1, SHAPE(8));
    CHECK_OK(ms_copy(i32, f));
    const int32_t want32[8] = {0, INT32_MAX, INT32_MIN, 3, -3, INT32_MAX, INT32_MIN, 300};
    for (int i = 0; i < 8; i++)
        CHECK_MSG(((int32_t *)ms_tensor_data(i32))[i] == want32[i], "f64 %g -> i32", values[i]);
    ms_tensor *i64 = make(MS_I64, 1, SHAPE(8));
    CHECK_OK(ms_copy(i64, f));
    CHECK(((int64_t *)ms_tensor_data(i64))[1] == INT64_MAX);
    CHECK(((int64_t *)ms_tensor_data(i64))[6] == INT64_MIN);
    ms_tensor *u8 = make(MS_U8, 1, SHAPE(8));
    CHECK_OK(ms_copy(u8, f));
    const uint8_t want8[8] = {0, 255, 0, 3, 0, 255, 0, 255};
    for (int i = 0; i < 8; i++)
        CHECK_MSG(((uint8_t *)ms_tensor_data(u8))[i] == want8[i], "f64 %g -> u8", values[i]);
    /* int -> narrower int wraps */
    int64_t *wide = ms_tensor_data(i64);
    wide[0] = 0x100000005ll;
    wide[1] = -1;
    wide[2] = 9007199254740993ll; /* 2^53 + 1: not a double */
    CHECK_OK(ms_copy(i32, i64));
    CHECK(((int32_t *)ms_tensor_data(i32))[0] == 5);
    CHECK_OK(ms_copy(u8, i64));
    CHECK(((uint8_t *)ms_tensor_data(u8))[1] == 255);
    /* i64 -> i64 through a strided view stays exact beyond 2^53 */
    ms_tensor *i64_strided = with_layout(i64, LAYOUT_PADDED);
    wide = ms_tensor_data(i64);
    ((int64_t *)elem_ptr(i64_strided, 2))[0] = 9007199254740993ll;
    CHECK_OK(ms_copy(i64, i64_strided));
    CHECK(((int64_t *)ms_tensor_data(i64))[2] == 9007199254740993ll);
    /* f64 -> f32 rounds to nearest; f32 -> bf16 / f16 round to nearest even */
    ms_tensor *one = make(MS_F32, 1, SHAPE(3));
    float *o = ms_tensor_data(one);
    o[0] = 1.0f + 0x1p-8f;            /* halfway between bf16 1.0 and 1.0078125: to even 1.0 */
    o[1] = 1.0f + 3 * 0x1p-8f;        /* halfway: to even 1.015625 */
    o[2] = 65520.0f;                  /* rounds past f16's max: inf */
    ms_tensor *bf = make(MS_BF16, 1, SHAPE(3));
    CHECK_OK(ms_copy(bf, one));
    CHECK(((uint16_t *)ms_tensor_data(bf))[0] == 0x3f80);
    CHECK(((uint16_t *)ms_tensor_data(bf))[1] == 0x3f82);
    ms_tensor *h = make(MS_F16, 1, SHAPE(3));
    CHECK_OK(ms_copy(h, one));
    CHECK(((uint16_t *)ms_tensor_data(h))[2] == 0x7c00);
    /* bf16 -> f16 -> f32 */
    ((uint16_t *)ms_tensor_data(bf))[0] = 0x4049; /* 3.140625 */
    CHECK_OK(ms_copy(h, bf));
    CHECK_OK(ms_copy(one, h));
    CHECK(o[0] == 3.140625f);
    ms_tensor *list[] = {f, i32, i64, u8, i64_strided, one, bf, h};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

static void test_fill_and_arange(void)
{
    for (int k = 0; k < MS_DTYPE_COUNT; k++) {
        ms_tensor *t0 = make(all_dtypes[k], 2, SHAPE(3, 5));
        for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
            ms_tensor *t = with_layout(t0, layout);
            CHECK_OK(ms_fill(t, 6.0));
            int ok = 1;
            for (int64_t i = 0; i < t->numel; i++)
                ok &= get(t, i) == 6.0;
            CHECK_MSG(ok && sentinel_intact(t), "fill %s %s", dtype_label(all_dtypes[k]),
                      layout_names[layout]);
            CHECK_OK(ms_arange(t, 2.0, 3.0));
            ok = 1;
            for (int64_t i = 0; i < t->numel; i++)
                ok &= get(t, i) == 2.0 + 3.0 * (double)i;
            CHECK_MSG(ok && sentinel_intact(t), "arange %s %s", dtype_label(all_dtypes[k]),
                      layout_names[layout]);
            ms_tensor_free(t);
        }
        ms_tensor_free(t0);
    }
    ms_tensor *f = make(MS_F64, 1, SHAPE(4));
    CHECK_OK(ms_arange(f, 0.5, -0.25));
    CHECK(get(f, 3) == -0.25);
    ms_tensor *big = make(MS_I64, 1, SHAPE(2));
    CHECK_OK(ms_arange(big, 9007199254740992.0, 1.0)); /* integers count exactly past 2^53 */
    CHECK(((int64_t *)ms_tensor_data(big))[1] == 9007199254740993ll);
    ms_tensor *u8 = make(MS_U8, 1, SHAPE(1));
    CHECK_OK(ms_fill(u8, -5.0)); /* saturates */
    CHECK(get(u8, 0) == 0);
    ms_tensor *scalar = make(MS_F32, 0, NULL);
    CHECK_OK(ms_fill(scalar, 1.5));
    CHECK(get(scalar, 0) == 1.5);
    /* an expanded view cannot be written */
    ms_tensor *expanded = NULL;
    CHECK_OK(ms_tensor_view(&expanded, f, 2, SHAPE(3, 4), SHAPE(0, 1), 0));
    CHECK_ERR(ms_fill(expanded, 1.0), MS_ERR_INVALID);
    CHECK_ERR(ms_fill(NULL, 1.0), MS_ERR_INVALID);
    ms_tensor *list[] = {f, big, u8, scalar, expanded};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        ms_tensor_free(list[i]);
}

static void test_equal_and_allclose(void)
{
    ms_tensor *a = random_tensor(MS_F32, 2, SHAPE(4, 7), -1, 1);
    ms_tensor *b = with_layout(a, LAYOUT_REVERSED);
    int flag = -1;
    CHECK_OK(ms_equal(&flag, a, b));
    CHECK(flag == 1);
    set(b, 5, get(b, 5) + 1e-6);
    CHECK_OK(ms_equal(&flag, a, b));
    CHECK(flag == 0);
    CHECK_OK(ms_allclose(&flag, a, b, 1e-4, 0));
    CHECK(flag == 1);
    CHECK_OK(ms_allclose(&flag, a, b, 0, 1e-9));
    CHECK(flag == 0);
    /* equality is bitwise: NaN equals the same NaN, -0 differs from +0 */
    set(a, 0, NAN);
    set(b, 0, NAN);
    set(b, 5, get(a, 5));
    CHECK_OK(ms_equal(&flag, a, b));
    CHECK(flag == 1);
    CHECK_OK(ms_allclose(&flag, a, b, 1, 1));
    CHECK(flag == 0); /* NaN is never close */
    set(a, 0, 0.0);
    set(b, 0, -0.0);
    CHECK_OK(ms_equal(&flag, a, b));
    CHECK(flag == 0);
    CHECK_OK(ms_allclose(&flag, a, b, 0, 0));
    CHECK(flag == 1);
    /* infinities are close only to themselves */
    set(a, 1, INFINITY);
    set(b, 1, INFINITY);
    CHECK_OK(ms_allclose(&flag, a, b, 0, 0));
    CHECK(flag == 1);
    set(b, 1, -INFINITY);
    CHECK_OK(ms_allclose(&flag, a, b, 1e9, 1e9));
    CHECK(flag == 0);
    /* different shape or dtype: not equal, not an error */
    ms_tensor *other = make(MS_F32, 2, SHAPE(7, 4));
    CHECK_OK(ms_equal(&flag, a, other));
    CHECK(flag == 0);
    CHECK_OK(ms_allclose(&flag, a, other, 1, 1));
    CHECK(flag == 0);
    ms_tensor *f64 = make(MS_F64, 2, SHAPE(4, 7));
    CHECK_OK(ms_copy(f64, a));
    CHECK_OK(ms_equal(&flag, a, f64));
    CHECK(flag == 0);
    CHECK_OK(ms_allclose(&flag, a, f64, 0, 0)); /* allclose compares values across dtypes */
    CHECK(flag == 1);
    /* every dtype compares bitwise */
    for (int k = 0; k < MS_DTYPE_COUNT; k++) {
        ms_tensor *x = make(all_dtypes[k], 1, SHAPE(9));
        ms_tensor *y = make(all_dtypes[k], 1, SHAPE(9));
        CHECK_OK(ms_arange(x, 1, 2));
        CHECK_OK(ms_arange(y, 1, 2));
        CHECK_OK(ms_equal(&flag, x, y));
        CHECK(flag == 1);
        set(y, 8, 3);
        CHECK_OK(ms_equal(&flag, x, y));
        CHECK(flag == 0);
        ms_tensor_free(x);
        ms_tensor_free(y);
    }
    CHECK_ERR(ms_equal(NULL, a, b), MS_ERR_INVALID);
    CHECK_ERR(ms_equal(&flag, a, NULL), MS_ERR_INVALID);
    CHECK_ERR(ms_allclose(&flag, a, b, -1, 0), MS_ERR_INVALID);
    ms_tensor_free(a);
    ms_tensor_free(b);
    ms_tensor_free(other);
    ms_tensor_free(f64);
}

static void test_errors(void)
{
    ms_tensor *t = make(MS_F32, 1, SHAPE(4));
    CHECK_ERR(ms_copy(NULL, t), MS_ERR_INVALID);
    CHECK_ERR(ms_copy(t, NULL), MS_ERR_INVALID);
    ms_tensor bad = *t;
    bad.dtype = 42;
    CHECK_ERR(ms_copy(t, &bad), MS_ERR_DTYPE);
    bad = *t;
    bad.ndim = 9;
    CHECK_ERR(ms_copy(t, &bad), MS_ERR_INVALID);
    /* a released storage is a state error */
    ms_tensor *gone = make(MS_F32, 1, SHAPE(4));
    CHECK_OK(ms_storage_release(gone->storage));
    CHECK_ERR(ms_copy(t, gone), MS_ERR_STATE);
    CHECK_ERR(ms_fill(gone, 0), MS_ERR_STATE);
    ms_tensor_free(gone);
    ms_tensor_free(t);
}

int main(void)
{
    test_seed(1);
    test_copy_every_pair();
    test_copy_broadcast();
    test_copy_transposed();
    test_conversion_rules();
    test_fill_and_arange();
    test_equal_and_allclose();
    test_errors();
    return check_summary("test_ops_copy");
}
