/* moonshard runtime: local collectives whose buffers all lie in the ranks' heaps.
 * Members copy straight from and into each other's buffers: one copy per byte, no ring. */
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "local.h"

/* Streaming stores write whole lines without reading them first; worth it once the
 * destination will not be in cache anyway. */
enum { STREAM_MIN = 2 * 1024 * 1024 };
/* Pieces of a source copied to several destinations while it sits in L2. */
enum { PIECE = 256 * 1024 };

/* Copy n bytes, with streaming stores when stream != 0 (no fence). */
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

/* src to every destination, piece by piece, so src is read from memory once. */
static void copy_out_many(uint8_t *const *dsts, int ndst, const uint8_t *src, size_t n)
{
    int stream = n >= STREAM_MIN;
    for (size_t offset = 0; offset < n; offset += PIECE) {
        size_t len = n - offset < PIECE ? n - offset : PIECE;
        for (int i = 0; i < ndst; i++)
            copy_lines(dsts[i] + offset, src + offset, len, stream);
    }
    fence_streams();
}

/* Each member writes its input into every member's output (its own block of each). */
int local_direct_all_gather(ms_group *g, const local_call *call, uint8_t *const *outs,
                            const void *in, size_t block_bytes)
{
    uint8_t *dsts[LOCAL_MAX_RANKS];
    int ndst = 0;
    for (int i = 0; i < g->size; i++) {
        int m = (g->rank + i) % g->size; /* members start on different peers */
        uint8_t *dst = outs[m] + (size_t)g->rank * block_bytes;
        if (dst != in)
            dsts[ndst++] = dst;
    }
    copy_out_many(dsts, ndst, in, block_bytes);
    return local_barrier_step(g, call);
}

/* Each member reduces its block straight from every member's input. */
int local_direct_reduce_scatter(ms_group *g, const local_call *call, void *out,
                                uint8_t *const *ins, int64_t count, int dtype, int op)
{
    const void *srcs[LOCAL_MAX_RANKS];
    size_t block = (size_t)count * ms_dtype_size(dtype);
    for (int k = 0; k < g->size; k++)
        srcs[k] = ins[k] + (size_t)g->rank * block;
    if (count > 0)
        ms_comm_reduce(out, srcs, g->size, (size_t)count, dtype, op);
    return local_barrier_step(g, call);
}

/* Member r reduces piece r of every member's data into its own, then writes the result
 * into piece r of every other member's data. */
int local_direct_all_reduce(ms_group *g, const local_call *call, uint8_t *const *datas,
                            int64_t count, int dtype, int op)
{
    size_t esize = ms_dtype_size(dtype);
    int64_t line = 64 / (int64_t)esize;
    int64_t piece = ((count + g->size - 1) / g->size + line - 1) / line * line;
    int64_t start = piece * g->rank;
    int64_t len = count - start < piece ? count - start : piece;
    size_t offset = (size_t)start * esize;
    const void *srcs[LOCAL_MAX_RANKS];
    for (int k = 0; k < g->size; k++)
        srcs[k] = datas[k] + offset;
    if (len > 0)
        ms_comm_reduce(datas[g->rank] + offset, srcs, g->size, (size_t)len, dtype, op);
    MS_CHECK(local_barrier_step(g, call));
    uint8_t *dsts[LOCAL_MAX_RANKS];
    for (int i = 1; i < g->size; i++)
        dsts[i - 1] = datas[(g->rank + i) % g->size] + offset;
    if (len > 0)
        copy_out_many(dsts, g->size - 1, datas[g->rank] + offset, (size_t)len * esize);
    return local_barrier_step(g, call);
}

int local_direct_broadcast(ms_group *g, const local_call *call, void *data,
                           const uint8_t *root_data, size_t bytes)
{
    if (data != root_data && bytes > 0)
        local_copy_out(data, root_data, bytes, bytes);
    return local_barrier_step(g, call);
}
