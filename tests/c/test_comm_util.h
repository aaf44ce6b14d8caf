/* Helpers of the collective tests: a check macro, running a function on spawned ranks,
 * element conversions and the deterministic data every rank can predict for its peers. */
#ifndef TEST_COMM_UTIL_H
#define TEST_COMM_UTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms.h"

static int failures;

/* Count a failure with its site; in a rank the count travels to the parent. */
#define EXPECT(cond)                                                                     \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: expected %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, ms_last_error());                                             \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

#define EXPECT_STATUS(expected, expr)                                                    \
    do {                                                                                 \
        int got_ = (expr);                                                               \
        if (got_ != (expected)) {                                                        \
            fprintf(stderr, "%s:%d: %s gave %d (%s: %s), expected %d\n", __FILE__,       \
                    __LINE__, #expr, got_, ms_strerror(got_), ms_last_error(), expected); \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

typedef int (*rank_fn)(int rank, int world_size, void *context);

/* Run fn on world_size spawned ranks; each rank's return value is its failure count,
 * reported as text. Returns the job for the caller to inspect and free. */
static inline ms_spawn *run_ranks(int world_size, int64_t timeout_ms, rank_fn fn, void *context)
{
    ms_spawn *job = NULL;
    int rank = -1;
    if (ms_spawn_new(&job, world_size, timeout_ms, &rank) != MS_OK) {
        fprintf(stderr, "spawn failed: %s\n", ms_last_error());
        failures++;
        return NULL;
    }
    if (rank >= 0) {
        failures = 0; /* counted again from here: the parent's count came with the fork */
        int wrong = fn(rank, world_size, context) + failures;
        char text[32];
        int n = snprintf(text, sizeof text, "%d", wrong);
        ms_local_finish(0, text, (size_t)n);
    }
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    return job;
}

/* The failure count rank reported, or -1 when it did not return. */
static inline int reported_failures(ms_spawn *job, int rank)
{
    ms_rank_outcome outcome;
    if (ms_spawn_outcome(job, rank, &outcome) != MS_OK || outcome.state != MS_RANK_RETURNED)
        return -1;
    char text[32] = {0};
    memcpy(text, outcome.bytes, outcome.nbytes < 31 ? outcome.nbytes : 31);
    return atoi(text);
}

/* Spawn, wait, expect every rank to report no failures, free. */
static inline void expect_clean_run(int world_size, rank_fn fn, void *context, const char *what)
{
    ms_spawn *job = run_ranks(world_size, 20000, fn, context);
    if (!job)
        return;
    for (int r = 0; r < world_size; r++) {
        int wrong = reported_failures(job, r);
        if (wrong != 0) {
            ms_rank_outcome outcome;
            ms_spawn_outcome(job, r, &outcome);
            fprintf(stderr, "%s: world %d rank %d: %d failures (%s)\n", what, world_size, r,
                    wrong, outcome.reason);
            failures++;
        }
    }
    ms_spawn_free(job);
}

static inline float bf16_value(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t bf16_bits(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline uint16_t f16_bits(float f)
{
    _Float16 h = (_Float16)f;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

static inline float f16_value(uint16_t bits)
{
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
}

/* Store value (exactly representable or rounded like the runtime) as element i. */
static inline void store_element(void *data, int dtype, int64_t i, double value)
{
    switch (dtype) {
    case MS_F32: ((float *)data)[i] = (float)value; break;
    case MS_F64: ((double *)data)[i] = value; break;
    case MS_BF16: ((uint16_t *)data)[i] = bf16_bits((float)value); break;
    case MS_F16: ((uint16_t *)data)[i] = f16_bits((float)value); break;
    case MS_I32: ((int32_t *)data)[i] = (int32_t)value; break;
    case MS_I64: ((int64_t *)data)[i] = (int64_t)value; break;
    default: ((uint8_t *)data)[i] = (uint8_t)value; break;
    }
}

static inline double load_element(const void *data, int dtype, int64_t i)
{
    switch (dtype) {
    case MS_F32: return ((const float *)data)[i];
    case MS_F64: return ((const double *)data)[i];
    case MS_BF16: return bf16_value(((const uint16_t *)data)[i]);
    case MS_F16: return f16_value(((const uint16_t *)data)[i]);
    case MS_I32: return ((const int32_t *)data)[i];
    case MS_I64: return (double)((const int64_t *)data)[i];
    default: return ((const uint8_t *)data)[i];
    }
}

/* What rank puts at element i: small integers, so sums are exact in every dtype. */
static inline double pattern(int rank, int64_t i) { return (double)((rank + 1) * 3 + i % 17); }

/* The expected reduction over world_size ranks of pattern(r, i), computed the way the
 * runtime does: exact sums, then the average divided in the accumulation precision. */
static inline double expected_reduction(int dtype, int op, int world_size, int64_t i)
{
    double sum = 0, max = -1e300, min = 1e300;
    for (int r = 0; r < world_size; r++) {
        double v = pattern(r, i);
        sum += v;
        max = v > max ? v : max;
        min = v < min ? v : min;
    }
    switch (op) {
    case MS_DIST_SUM: return sum;
    case MS_DIST_MAX: return max;
    case MS_DIST_MIN: return min;
    default: break;
    }
    if (dtype == MS_F64)
        return sum / world_size;
    if (dtype == MS_F32 || dtype == MS_BF16 || dtype == MS_F16)
        return (float)sum / (float)world_size;
    return (double)((int64_t)sum / world_size);
}

/* Elements of data (dtype) that differ from expected after rounding it into dtype. */
static inline int64_t count_wrong(const void *data, int dtype, int64_t count, int64_t first,
                           double (*expected)(int64_t index, void *context), void *context)
{
    int64_t wrong = 0;
    size_t esize = ms_dtype_size(dtype);
    unsigned char want[8];
    for (int64_t i = 0; i < count; i++) {
        store_element(want, dtype, 0, expected(first + i, context));
        if (memcmp(want, (const char *)data + (size_t)i * esize, esize) != 0) {
            if (wrong < 3)
                fprintf(stderr, "  %s element %lld: got %g want %g\n", ms_dtype_name(dtype),
                        (long long)(first + i), load_element(data, dtype, i),
                        expected(first + i, context));
            wrong++;
        }
    }
    return wrong;
}

static inline ms_tensor *new_tensor(int dtype, int64_t numel)
{
    ms_tensor *t = NULL;
    if (ms_tensor_new(&t, dtype, 1, &numel, MS_POOL_CPU) != MS_OK) {
        fprintf(stderr, "tensor_new failed: %s\n", ms_last_error());
        exit(2);
    }
    return t;
}

static inline uint64_t fnv1a(const void *data, size_t nbytes)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < nbytes; i++)
        h = (h ^ ((const unsigned char *)data)[i]) * 1099511628211ull;
    return h;
}

#endif
