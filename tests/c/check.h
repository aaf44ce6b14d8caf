/* moonshard C tests: helpers shared by the op tests (tensor construction, layouts, element
 * access by row-major position, deterministic data) and check macros that count failures. */
#ifndef MS_TEST_CHECK_H
#define MS_TEST_CHECK_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms.h"
#include "convert.h"

static int check_total, check_failures;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        check_total++;                                                                   \
        if (!(cond)) {                                                                   \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);          \
        }                                                                                \
    } while (0)

/* Like CHECK, with a printf-style note of the case being checked. */
#define CHECK_MSG(cond, ...)                                                             \
    do {                                                                                 \
        check_total++;                                                                   \
        if (!(cond)) {                                                                   \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                \
            fputc('\n', stderr);                                                         \
        }                                                                                \
    } while (0)

#define CHECK_OK(expr)                                                                   \
    do {                                                                                 \
        int check_status_ = (expr);                                                      \
        check_total++;                                                                   \
        if (check_status_ != MS_OK) {                                                    \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: %s returned %d (%s): %s\n", __FILE__, __LINE__,      \
                    #expr, check_status_, ms_strerror(check_status_), ms_last_error());  \
        }                                                                                \
    } while (0)

/* The call fails with exactly `code` and leaves a message naming the problem. */
#define CHECK_ERR(expr, code)                                                            \
    do {                                                                                 \
        int check_status_ = (expr);                                                      \
        check_total++;                                                                   \
        if (check_status_ != (code) || ms_last_error()[0] == '\0') {                     \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d (%s); message '%s'\n", \
                    __FILE__, __LINE__, #expr, check_status_, ms_strerror(check_status_), \
                    (code), ms_strerror(code), ms_last_error());                         \
        }                                                                                \
    } while (0)

static inline int close_enough(double got, double want, double rtol, double atol)
{
    if (isnan(want))
        return isnan(got);
    if (isinf(want))
        return got == want;
    return fabs(got - want) <= atol + rtol * fabs(want);
}

#define CHECK_NEAR(got, want, rtol, atol)                                                \
    do {                                                                                 \
        double check_got_ = (got), check_want_ = (want);                                 \
        check_total++;                                                                   \
        if (!close_enough(check_got_, check_want_, (rtol), (atol))) {                    \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__,   \
                    #got, check_got_, check_want_);                                      \
        }                                                                                \
    } while (0)

/* Prints "name: N checks, M failed" and returns the process status. */
static inline int check_summary(const char *name)
{
    printf("%s: %d checks, %d failed\n", name, check_total, check_failures);
    return check_failures ? 1 : 0;
}

/* ---- tensors ---- */

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

static inline ms_tensor *make(int dtype, int ndim, const int64_t *shape)
{
    ms_tensor *t = NULL;
    if (ms_tensor_new(&t, dtype, ndim, shape, MS_POOL_CPU) != MS_OK) {
        fprintf(stderr, "tensor_new failed: %s\n", ms_last_error());
        exit(2);
    }
    return t;
}

static inline int64_t elem_offset(const ms_tensor *t, int64_t position)
{
    int64_t offset = 0;
    for (int d = t->ndim - 1; d >= 0; d--) {
        int64_t size = t->shape[d];
        offset += (position % size) * t->strides[d];
        position /= size;
    }
    return offset;
}

static inline void *elem_ptr(const ms_tensor *t, int64_t position)
{
    return (char *)ms_tensor_data(t) + elem_offset(t, position) * (int64_t)ms_dtype_size(t->dtype);
}

/* Element at row-major position as double (through the kernels' conversions for bf16/f16,
 * which test_ops_kernels checks on their own). */
static inline double get(const ms_tensor *t, int64_t position)
{
    void *p = elem_ptr(t, position);
    switch (t->dtype) {
    case MS_F32: return *(float *)p;
    case MS_F64: return *(double *)p;
    case MS_BF16: return ms_k_bf16_to_f32(*(uint16_t *)p);
    case MS_F16: return ms_k_f16_to_f32(*(uint16_t *)p);
    case MS_I32: return *(int32_t *)p;
    case MS_I64: return (double)*(int64_t *)p;
    default: return *(uint8_t *)p;
    }
}

static inline void set(ms_tensor *t, int64_t position, double v)
{
    void *p = elem_ptr(t, position);
    switch (t->dtype) {
    case MS_F32: *(float *)p = (float)v; break;
    case MS_F64: *(double *)p = v; break;
    case MS_BF16: *(uint16_t *)p = ms_k_f32_to_bf16((float)v); break;
    case MS_F16: *(uint16_t *)p = ms_k_f32_to_f16((float)v); break;
    case MS_I32: *(int32_t *)p = (int32_t)v; break;
    case MS_I64: *(int64_t *)p = (int64_t)v; break;
    default: *(uint8_t *)p = (uint8_t)v; break;
    }
}

/* A test-only generator (xorshift64*), independent of the runtime's Philox stream. */
static uint64_t test_rng_state = 0x9e3779b97f4a7c15ull;

static inline void test_seed(uint64_t seed) { test_rng_state = seed * 0x9e3779b97f4a7c15ull + 1; }

static inline double test_uniform(void)
{
    test_rng_state ^= test_rng_state >> 12;
    test_rng_state ^= test_rng_state << 25;
    test_rng_state ^= test_rng_state >> 27;
    return (double)((test_rng_state * 0x2545f4914f6cdd1dull) >> 11) * 0x1p-53;
}

static inline void fill_uniform(ms_tensor *t, double low, double high)
{
    for (int64_t i = 0; i < t->numel; i++)
        set(t, i, low + (high - low) * test_uniform());
}

static inline ms_tensor *random_tensor(int dtype, int ndim, const int64_t *shape, double low,
                                double high)
{
    ms_tensor *t = make(dtype, ndim, shape);
    fill_uniform(t, low, high);
    return t;
}

/* Layouts every op is tried with: the same logical values stored differently. */
enum { LAYOUT_DENSE = 0, LAYOUT_REVERSED = 1, LAYOUT_PADDED = 2, LAYOUT_COUNT = 3 };
static const char *const layout_names[LAYOUT_COUNT] = {"dense", "reversed", "padded"};

/* A view with src's shape and values in the given layout: REVERSED stores dims in reverse
 * order (a transposed view for 2-D), PADDED has inner stride 2, padded rows and offset 1.
 * The storage around the view holds a sentinel (see sentinel_intact). */
static const double sentinel_value = 251.0; /* exact in every dtype */

static inline ms_tensor *with_layout(const ms_tensor *src, int layout)
{
    int nd = src->ndim;
    int64_t strides[MS_MAX_DIMS];
    int64_t stride = layout == LAYOUT_PADDED ? 2 : 1;
    if (layout == LAYOUT_REVERSED) {
        for (int d = 0; d < nd; d++) {
            strides[d] = stride;
            stride *= src->shape[d] > 0 ? src->shape[d] : 1;
        }
    } else {
        for (int d = nd - 1; d >= 0; d--) {
            strides[d] = stride;
            stride *= (src->shape[d] > 0 ? src->shape[d] : 1) + (layout == LAYOUT_PADDED);
        }
    }
    int64_t offset = layout == LAYOUT_PADDED ? 1 : 0;
    int64_t capacity = stride + offset + 1;
    ms_tensor *base = make(src->dtype, 1, &capacity);
    for (int64_t i = 0; i < capacity; i++)
        set(base, i, sentinel_value);
    ms_tensor *view = NULL;
    if (ms_tensor_view(&view, base, nd, src->shape, strides, offset) != MS_OK) {
        fprintf(stderr, "tensor_view failed: %s\n", ms_last_error());
        exit(2);
    }
    ms_tensor_free(base);
    for (int64_t i = 0; i < src->numel; i++)
        set(view, i, get(src, i));
    return view;
}

/* 1 when every storage element outside the view still holds the sentinel. */
static inline int sentinel_intact(const ms_tensor *view)
{
    size_t size = ms_dtype_size(view->dtype);
    int64_t capacity = (int64_t)(view->storage->nbytes / size);
    char *used = calloc((size_t)capacity, 1);
    for (int64_t i = 0; i < view->numel; i++)
        used[view->offset + elem_offset(view, i)] = 1;
    ms_tensor flat = *view;
    flat.ndim = 1;
    flat.offset = 0;
    flat.numel = capacity;
    flat.shape[0] = capacity;
    flat.strides[0] = 1;
    int intact = 1;
    for (int64_t i = 0; i < capacity && intact; i++)
        if (!used[i] && get(&flat, i) != sentinel_value)
            intact = 0;
    free(used);
    return intact;
}

static inline const char *dtype_label(int dtype) { return ms_dtype_name(dtype); }

#endif
