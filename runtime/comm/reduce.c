/* moonshard runtime: the element reductions of the collectives, for every dtype.
 * Sources combine left to right in blocks that stay in L1, so results are deterministic. */
#include <string.h>

#include "comm.h"

enum { BLOCK = 512 };

static inline float bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet and signed */
        return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16); /* round to nearest even */
}

static inline float f16_to_float(uint16_t h)
{
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline uint16_t float_to_f16(float f)
{
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}

#define IDENTITY(x) (x)
#define ADD_FLOAT(a, b) ((a) + (b))
#define MAX_NAN(a, b) (((a) > (b) || (a) != (a)) ? (a) : (b))
#define MIN_NAN(a, b) (((a) < (b) || (a) != (a)) ? (a) : (b))

/* One pass over count elements: acc = LOAD(src0); acc = COMBINE(acc, LOAD(srck)); the
 * average divides after the last source; dst = STORE(acc). Two sources, the common case,
 * combine in one loop (dst may be either source: each element is read before written). */
#define REDUCE_BLOCKS(T, ACC, LOAD, STORE, COMBINE, DIVIDE)                                  \
    if (nsrc == 2) {                                                                        \
        const T *a = srcs[0], *b = srcs[1];                                                 \
        T *out = dst;                                                                       \
        for (size_t i = 0; i < count; i++) {                                                \
            ACC v = COMBINE(LOAD(a[i]), LOAD(b[i]));                                        \
            out[i] = STORE(DIVIDE ? (ACC)(v / (ACC)2) : v);                                 \
        }                                                                                   \
    } else                                                                                  \
        for (size_t base = 0; base < count; base += BLOCK) {                                \
            size_t n = count - base < BLOCK ? count - base : BLOCK;                         \
            ACC acc[BLOCK];                                                                 \
            const T *first = (const T *)srcs[0] + base;                                     \
            for (size_t i = 0; i < n; i++)                                                  \
                acc[i] = LOAD(first[i]);                                                    \
            for (int k = 1; k < nsrc; k++) {                                                \
                const T *src = (const T *)srcs[k] + base;                                   \
                for (size_t i = 0; i < n; i++)                                              \
                    acc[i] = COMBINE(acc[i], LOAD(src[i]));                                 \
            }                                                                               \
            if (DIVIDE)                                                                     \
                for (size_t i = 0; i < n; i++)                                              \
                    acc[i] = (ACC)(acc[i] / (ACC)nsrc);                                     \
            T *out = (T *)dst + base;                                                       \
            for (size_t i = 0; i < n; i++)                                                  \
                out[i] = STORE(acc[i]);                                                     \
        }

/* A reduction for storage type T accumulated in ACC; SUM_COMBINE wraps integers. */
#define DEFINE_REDUCE(NAME, T, ACC, LOAD, STORE, SUM_COMBINE)                               \
    static void NAME(void *dst, const void *const *srcs, int nsrc, size_t count, int op)   \
    {                                                                                       \
        switch (op) {                                                                       \
        case MS_DIST_SUM: REDUCE_BLOCKS(T, ACC, LOAD, STORE, SUM_COMBINE, 0) break;         \
        case MS_DIST_AVG: REDUCE_BLOCKS(T, ACC, LOAD, STORE, SUM_COMBINE, 1) break;         \
        case MS_DIST_MAX: REDUCE_BLOCKS(T, ACC, LOAD, STORE, MAX_NAN, 0) break;             \
        default: REDUCE_BLOCKS(T, ACC, LOAD, STORE, MIN_NAN, 0) break;                      \
        }                                                                                   \
    }

#define ADD_U32(a, b) ((int32_t)((uint32_t)(a) + (uint32_t)(b)))
#define ADD_U64(a, b) ((int64_t)((uint64_t)(a) + (uint64_t)(b)))
#define ADD_U8(a, b) ((uint8_t)((a) + (b)))

DEFINE_REDUCE(reduce_f32, float, float, IDENTITY, IDENTITY, ADD_FLOAT)
DEFINE_REDUCE(reduce_f64, double, double, IDENTITY, IDENTITY, ADD_FLOAT)
DEFINE_REDUCE(reduce_bf16, uint16_t, float, bf16_to_float, float_to_bf16, ADD_FLOAT)
DEFINE_REDUCE(reduce_f16, uint16_t, float, f16_to_float, float_to_f16, ADD_FLOAT)
DEFINE_REDUCE(reduce_i32, int32_t, int32_t, IDENTITY, IDENTITY, ADD_U32)
DEFINE_REDUCE(reduce_i64, int64_t, int64_t, IDENTITY, IDENTITY, ADD_U64)
DEFINE_REDUCE(reduce_u8, uint8_t, uint8_t, IDENTITY, IDENTITY, ADD_U8)

void ms_comm_reduce(void *dst, const void *const *srcs, int nsrc, size_t count, int dtype,
                    int op)
{
    switch (dtype) {
    case MS_F32: reduce_f32(dst, srcs, nsrc, count, op); break;
    case MS_F64: reduce_f64(dst, srcs, nsrc, count, op); break;
    case MS_BF16: reduce_bf16(dst, srcs, nsrc, count, op); break;
    case MS_F16: reduce_f16(dst, srcs, nsrc, count, op); break;
    case MS_I32: reduce_i32(dst, srcs, nsrc, count, op); break;
    case MS_I64: reduce_i64(dst, srcs, nsrc, count, op); break;
    default: reduce_u8(dst, srcs, nsrc, count, op); break;
    }
}

#define DIVIDE_LOOP(T, LOAD, STORE, ACC)                                                    \
    for (size_t i = 0; i < count; i++)                                                      \
        ((T *)data)[i] = STORE((ACC)(LOAD(((T *)data)[i]) / (ACC)divisor));

void ms_comm_divide(void *data, size_t count, int dtype, int divisor)
{
    switch (dtype) {
    case MS_F32: DIVIDE_LOOP(float, IDENTITY, IDENTITY, float) break;
    case MS_F64: DIVIDE_LOOP(double, IDENTITY, IDENTITY, double) break;
    case MS_BF16: DIVIDE_LOOP(uint16_t, bf16_to_float, float_to_bf16, float) break;
    case MS_F16: DIVIDE_LOOP(uint16_t, f16_to_float, float_to_f16, float) break;
    case MS_I32: DIVIDE_LOOP(int32_t, IDENTITY, IDENTITY, int32_t) break;
    case MS_I64: DIVIDE_LOOP(int64_t, IDENTITY, IDENTITY, int64_t) break;
    default: DIVIDE_LOOP(uint8_t, IDENTITY, IDENTITY, uint8_t) break;
    }
}

const char *ms_comm_op_name(int op)
{
    static const char *const names[] = {"sum", "avg", "max", "min"};
    return op >= MS_DIST_SUM && op <= MS_DIST_MIN ? names[op] : "?";
}
