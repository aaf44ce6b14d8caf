/* moonshard CPU backend: counter-based uniform and normal draws, dropout and its backward.
 * Element i (row-major) uses the Philox block (seed, offset + i); dx of dropout is assigned. */
#include <math.h>

#include "cpu.h"
#include "rng.h"

/* The iterator visits elements in row-major order, so the running index `next` is each
 * element's logical position whatever the strides. */
typedef struct draw_ctx {
    uint64_t seed, next;
    double low, high;  /* uniform range, or mean and std for normal */
    double p;          /* dropout probability */
    double scale;      /* 1 / (1 - p) */
} draw_ctx;

/* Blocks are made CHUNK at a time into structure-of-arrays form, so the Philox rounds
 * vectorise across elements; the kernels then map words to values. */
enum { CHUNK = 64 };

typedef struct words { uint32_t w[4][CHUNK]; } words;

static void make_blocks(uint64_t seed, uint64_t first, words *out)
{
    for (int j = 0; j < CHUNK; j++) {
        uint32_t block[4];
        ms_k_rng_block(seed, first + (uint64_t)j, block);
        out->w[0][j] = block[0];
        out->w[1][j] = block[1];
        out->w[2][j] = block[2];
        out->w[3][j] = block[3];
    }
}

/* Iterates chunk by chunk with `blocks` holding the chunk's words; element i of the run
 * is lane j of the chunk. */
#define CHUNK_LOOP_BEGIN(c, n, blocks)                                                    \
    for (int64_t base = 0; base < (n); base += CHUNK) {                                   \
        make_blocks((c)->seed, (c)->next + (uint64_t)base, &(blocks));                    \
        int64_t count = (n) - base < CHUNK ? (n) - base : CHUNK;                          \
        for (int64_t j = 0; j < count; j++) {                                             \
            int64_t i = base + j;
#define CHUNK_LOOP_END                                                                    \
        }                                                                                 \
    }

/* low + (high - low) * u can round up to high; keep the half-open range. */
#define UNIFORM_KERNEL(NAME, T, DRAW, NEXTAFTER)                                          \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        draw_ctx *c = ctx;                                                                \
        T *out = (T *)p[0];                                                               \
        T low = (T)c->low, high = (T)c->high, width = (T)(c->high - c->low);              \
        T below_high = NEXTAFTER(high, low);                                              \
        words blocks;                                                                     \
        CHUNK_LOOP_BEGIN(c, n, blocks)                                                    \
            T v = low + width * (T)(DRAW);                                                \
            out[i * s[0]] = (v >= high && high > low) ? below_high : v;                   \
        CHUNK_LOOP_END                                                                    \
        c->next += (uint64_t)n;                                                           \
    }

UNIFORM_KERNEL(uniform_f32, float, ms_k_uniform24(blocks.w[0][j]), nextafterf)
UNIFORM_KERNEL(uniform_f64, double, ms_k_uniform53(blocks.w[0][j], blocks.w[1][j]), nextafter)

#define NORMAL_KERNEL(NAME, T)                                                            \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        draw_ctx *c = ctx;                                                                \
        T *out = (T *)p[0];                                                               \
        words blocks;                                                                     \
        CHUNK_LOOP_BEGIN(c, n, blocks)                                                    \
            uint32_t w[4] = {blocks.w[0][j], blocks.w[1][j], blocks.w[2][j],              \
                             blocks.w[3][j]};                                             \
            out[i * s[0]] = (T)(c->low + c->high * ms_k_normal(w));                       \
        CHUNK_LOOP_END                                                                    \
        c->next += (uint64_t)n;                                                           \
    }

NORMAL_KERNEL(normal_f32, float)
NORMAL_KERNEL(normal_f64, double)

/* Operand 0 is written, operand 1 read: out/x forward, dx/dy backward (same mask). The
 * keep test is ms_k_dropout_keep's, applied to the chunk's words. */
#define DROPOUT_KERNEL(NAME, T)                                                           \
    static void NAME(void *ctx, int64_t n, char *const *p, const int64_t *s)              \
    {                                                                                     \
        draw_ctx *c = ctx;                                                                \
        T *out = (T *)p[0];                                                               \
        const T *x = (const T *)p[1];                                                     \
        T scale = (T)c->scale;                                                            \
        words blocks;                                                                     \
        CHUNK_LOOP_BEGIN(c, n, blocks)                                                    \
            int keep = ms_k_uniform53(blocks.w[0][j], blocks.w[1][j]) >= c->p;            \
            out[i * s[0]] = keep ? x[i * s[1]] * scale : (T)0;                            \
        CHUNK_LOOP_END                                                                    \
        c->next += (uint64_t)n;                                                           \
    }

DROPOUT_KERNEL(dropout_f32, float)
DROPOUT_KERNEL(dropout_f64, double)

static int draw(const char *op, ms_tensor *out, draw_ctx *c, ms_iter_fn f32, ms_iter_fn f64)
{
    ms_iter it;
    ms_iter_begin(&it, out->ndim, out->shape);
    MS_CHECK(ms_iter_tensor(&it, op, "out", out));
    ms_iter_run(&it, out->dtype == MS_F32 ? f32 : f64, c);
    return MS_OK;
}

int ms_cpu_rand_uniform(ms_tensor *out, double low, double high, uint64_t seed, uint64_t offset)
{
    draw_ctx c = {.seed = seed, .next = offset, .low = low, .high = high};
    return draw("rand_uniform", out, &c, uniform_f32, uniform_f64);
}

int ms_cpu_rand_normal(ms_tensor *out, double mean, double std, uint64_t seed, uint64_t offset)
{
    draw_ctx c = {.seed = seed, .next = offset, .low = mean, .high = std};
    return draw("rand_normal", out, &c, normal_f32, normal_f64);
}

static int dropout_run(const char *op, ms_tensor *out, const char *out_name,
                       const ms_tensor *x, const char *x_name, double p, uint64_t seed,
                       uint64_t offset)
{
    /* p == 1 drops everything; the scale is never applied */
    draw_ctx c = {.seed = seed, .next = offset, .p = p, .scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0};
    ms_iter it;
    ms_iter_begin(&it, out->ndim, out->shape);
    MS_CHECK(ms_iter_tensor(&it, op, out_name, out));
    MS_CHECK(ms_iter_tensor(&it, op, x_name, x));
    ms_iter_run(&it, out->dtype == MS_F32 ? dropout_f32 : dropout_f64, &c);
    return MS_OK;
}

int ms_cpu_dropout(ms_tensor *out, const ms_tensor *x, double p, uint64_t seed, uint64_t offset)
{
    return dropout_run("dropout", out, "out", x, "x", p, seed, offset);
}

int ms_cpu_dropout_backward(ms_tensor *dx, const ms_tensor *dy, double p, uint64_t seed,
                        uint64_t offset)
{
    return dropout_run("dropout_backward", dx, "dx", dy, "dy", p, seed, offset);
}
