/* moonshard runtime: copying a collective's data out of the local segment into its
 * destination, with streaming stores once the destination is too large to stay in cache. */
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "local.h"

/* Streaming stores write whole lines without reading them first; worth it once the
 * destination will not be in cache anyway. */
enum { STREAM_MIN = 2 * 1024 * 1024 };

/* Copy n bytes, with streaming stores when stream != 0 (no fence). Four lines per
 * iteration keep more loads in flight. */
static void copy_lines(uint8_t *d, const uint8_t *s, size_t n, int stream)
{
#if defined(__AVX512F__) || defined(__SSE2__)
    size_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (!stream || n < head + 64) {
        memcpy(d, s, n);
        return;
    }
    memcpy(d, s, head);
    d += head, s += head, n -= head;
#if defined(__AVX512F__)
    for (; n >= 256; d += 256, s += 256, n -= 256) {
        __m512i a = _mm512_loadu_si512(s), b = _mm512_loadu_si512(s + 64),
                c = _mm512_loadu_si512(s + 128), e = _mm512_loadu_si512(s + 192);
        _mm512_stream_si512((void *)d, a);
        _mm512_stream_si512((void *)(d + 64), b);
        _mm512_stream_si512((void *)(d + 128), c);
        _mm512_stream_si512((void *)(d + 192), e);
    }
#endif
    for (; n >= 64; d += 64, s += 64, n -= 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((void *)d, _mm512_loadu_si512(s));
#else
        for (int i = 0; i < 64; i += 16)
            _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
#endif
    }
#else
    (void)stream;
#endif
    memcpy(d, s, n);
}

static void fence_streams(void)
{
#if defined(__AVX512F__) || defined(__SSE2__)
    _mm_sfence(); /* streamed lines reach memory before the step that publishes them */
#endif
}

void local_copy_out(void *dst, const void *src, size_t n, size_t destination_bytes)
{
    copy_lines(dst, src, n, destination_bytes >= STREAM_MIN);
    fence_streams();
}

void ms_local_stream_copy(void *dst, const void *src, size_t n)
{
    copy_lines(dst, src, n, 1);
    fence_streams();
}

#if defined(__AVX512F__)
#define F32_LANES 16
typedef __m512 f32_vector;
#define F32_LOAD _mm512_loadu_ps
#define F32_ADD _mm512_add_ps
#define F32_DIV _mm512_div_ps
#define F32_SET1 _mm512_set1_ps
#define F32_STREAM _mm512_stream_ps
#elif defined(__AVX__)
#define F32_LANES 8
typedef __m256 f32_vector;
#define F32_LOAD _mm256_loadu_ps
#define F32_ADD _mm256_add_ps
#define F32_DIV _mm256_div_ps
#define F32_SET1 _mm256_set1_ps
#define F32_STREAM _mm256_stream_ps
#endif

#if defined(F32_LANES)
static float sum_at(const float *const *src, int nsrc, size_t i, int op)
{
    float v = src[0][i];
    for (int k = 1; k < nsrc; k++)
        v += src[k][i];
    return op == MS_DIST_AVG ? v / (float)nsrc : v;
}

/* An f32 sum or average from the sources straight into streamed lines of dst, in registers:
 * ms_comm_reduce's additions in member order and its final division, so its bits, in one
 * pass instead of a reduction into scratch and a copy out of it. */
static void reduce_f32_streamed(float *dst, const void *const *srcs, int nsrc, size_t count,
                                int op)
{
    const float *const *src = (const float *const *)srcs;
    size_t i = 0, head = ((64 - ((uintptr_t)dst & 63)) & 63) / sizeof(float);
    for (; i < head && i < count; i++)
        dst[i] = sum_at(src, nsrc, i, op);
    for (; i + F32_LANES <= count; i += F32_LANES) {
        f32_vector v = F32_LOAD(src[0] + i);
        for (int k = 1; k < nsrc; k++)
            v = F32_ADD(v, F32_LOAD(src[k] + i));
        if (op == MS_DIST_AVG)
            v = F32_DIV(v, F32_SET1((float)nsrc));
        F32_STREAM(dst + i, v);
    }
    for (; i < count; i++)
        dst[i] = sum_at(src, nsrc, i, op);
}
#endif

void local_reduce_out(void *dst, const void *const *srcs, int nsrc, size_t count, int dtype,
                      int op, size_t destination_bytes)
{
    if (destination_bytes < STREAM_MIN) {
        ms_comm_reduce(dst, srcs, nsrc, count, dtype, op);
        return;
    }
#if defined(F32_LANES)
    if (dtype == MS_F32 && (op == MS_DIST_SUM || op == MS_DIST_AVG)) {
        reduce_f32_streamed(dst, srcs, nsrc, count, op);
        fence_streams();
        return;
    }
#endif
    /* Reduce a block into scratch that stays in L1, then stream it out: the destination's
     * lines are never read, and the arithmetic is ms_comm_reduce's, bit for bit. */
    _Alignas(64) uint8_t scratch[16384];
    size_t esize = ms_dtype_size(dtype), per_block = sizeof scratch / esize;
    const void *parts[LOCAL_MAX_RANKS];
    for (size_t base = 0; base < count; base += per_block) {
        size_t len = count - base < per_block ? count - base : per_block;
        for (int k = 0; k < nsrc; k++)
            parts[k] = (const uint8_t *)srcs[k] + base * esize;
        ms_comm_reduce(scratch, parts, nsrc, len, dtype, op);
        copy_lines((uint8_t *)dst + base * esize, scratch, len * esize, 1);
    }
    fence_streams();
}
