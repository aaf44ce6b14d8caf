/* moonshard store: streaming (non-temporal) stores of 64-byte lines, for copies into
 * destinations far larger than the cache, which cached stores would first read from memory. */
#ifndef MS_STORE_STREAM_H
#define MS_STORE_STREAM_H

#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

enum { STREAM_LINE_BYTES = 64 };

/* Copy one line from src (any alignment) to dst (STREAM_LINE_BYTES-aligned). */
static inline void stream_line(uint8_t *dst, const uint8_t *src)
{
#if defined(__AVX512F__)
    _mm512_stream_si512((void *)dst, _mm512_loadu_si512(src));
#elif defined(__AVX__)
    for (int k = 0; k < STREAM_LINE_BYTES; k += 32)
        _mm256_stream_si256((__m256i *)(dst + k), _mm256_loadu_si256((const __m256i *)(src + k)));
#elif defined(__SSE2__)
    for (int k = 0; k < STREAM_LINE_BYTES; k += 16)
        _mm_stream_si128((__m128i *)(dst + k), _mm_loadu_si128((const __m128i *)(src + k)));
#else
    memcpy(dst, src, STREAM_LINE_BYTES);
#endif
}

/* Streaming stores are weakly ordered: order them before later stores, so that other threads
 * that learn of the copy see its bytes. */
static inline void stream_fence(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

#endif
