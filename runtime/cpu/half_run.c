/* moonshard CPU backend: runs of bf16 and f16 elements through an f32 loop, a block of each
 * operand converted to f32 on the stack at a time and the output rounded once into place. */
#include "convert.h"
#include "cpu.h"

enum { BLOCK = 256 };

static float widen_one(int dtype, const uint16_t *p)
{
    return dtype == MS_BF16 ? ms_k_bf16_to_f32(*p) : ms_k_f16_to_f32(*p);
}

static void widen_block(int dtype, float *dst, const uint16_t *src, int64_t stride, int64_t n)
{
    if (dtype == MS_BF16)
        for (int64_t i = 0; i < n; i++)
            dst[i] = ms_k_bf16_to_f32(src[i * stride]);
    else
        for (int64_t i = 0; i < n; i++)
            dst[i] = ms_k_f16_to_f32(src[i * stride]);
}

static void narrow_block(int dtype, uint16_t *dst, int64_t stride, const float *src, int64_t n)
{
    if (dtype == MS_BF16)
        for (int64_t i = 0; i < n; i++)
            dst[i * stride] = ms_k_f32_to_bf16(src[i]);
    else
        for (int64_t i = 0; i < n; i++)
            dst[i * stride] = ms_k_f32_to_f16(src[i]);
}

void ms_cpu_half_run(void *ctx, int64_t n, char *const *p, const int64_t *s)
{
    const ms_half_run *run = ctx;
    float blocks[MS_ITER_MAX_OPS][BLOCK];
    char *ptrs[MS_ITER_MAX_OPS];
    int64_t strides[MS_ITER_MAX_OPS];
    for (int k = 0; k < run->count; k++) {
        int single = k > 0 && s[k] == 0;
        ptrs[k] = (char *)blocks[k];
        strides[k] = single ? 0 : 1;
        if (run->f32_operands >> k & 1u)
            ptrs[k] = p[k]; /* a single f32 value, passed as it is */
        else if (single)
            blocks[k][0] = widen_one(run->dtype, (const uint16_t *)p[k]);
    }
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t count = n - start < BLOCK ? n - start : BLOCK;
        for (int k = 1; k < run->count; k++)
            if (strides[k] == 1)
                widen_block(run->dtype, blocks[k], (const uint16_t *)p[k] + start * s[k], s[k],
                            count);
        run->f32(run->ctx, count, ptrs, strides);
        narrow_block(run->dtype, (uint16_t *)p[0] + start * s[0], s[0], blocks[0], count);
    }
}
