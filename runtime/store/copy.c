/* moonshard store: moving elements between strided tensors and a chunk's row-major bytes.
 * Reads hash the chunk block by block next to the copy, so each stored byte is brought into
 * cache once; long copies bypass the cache on the destination side. */
#include <string.h>

#include "store_internal.h"
#include "stream.h"

enum {
    HASH_BLOCK_BYTES = 128 << 10,
    /* Contiguous pieces at least this long are copied first and hashed afterwards, from cache. */
    HASHED_AFTER_BYTES = 4 << 10,
};

void stream_copy(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t head = (size_t)(-(uintptr_t)dst % STREAM_LINE_BYTES);
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    size_t body = (n - head) / STREAM_LINE_BYTES * STREAM_LINE_BYTES;
    for (size_t at = head; at < head + body; at += STREAM_LINE_BYTES)
        stream_line(dst + at, src + at);
    stream_fence();
    memcpy(dst + head + body, src + head + body, n - head - body);
}

/* n elements of esize bytes from src to dst, each with its own stride in bytes. */
static void copy_elements(uint8_t *dst, int64_t dst_step, const uint8_t *src, int64_t src_step,
                          int64_t n, size_t esize)
{
    switch (esize) {
    case 1:
        for (int64_t i = 0; i < n; i++, dst += dst_step, src += src_step)
            *dst = *src;
        break;
    case 2:
        for (int64_t i = 0; i < n; i++, dst += dst_step, src += src_step)
            memcpy(dst, src, 2);
        break;
    case 4:
        for (int64_t i = 0; i < n; i++, dst += dst_step, src += src_step)
            memcpy(dst, src, 4);
        break;
    default:
        for (int64_t i = 0; i < n; i++, dst += dst_step, src += src_step)
            memcpy(dst, src, 8);
        break;
    }
}

void gather_elements(void *out, const uint8_t *base, size_t esize, int ndim, const int64_t *shape,
                     const int64_t *strides, int64_t first, int64_t count)
{
    uint8_t *dst = out;
    if (ndim == 0) {
        if (count > 0)
            memcpy(dst, base, esize);
        return;
    }
    int64_t index[MS_MAX_DIMS];
    int64_t rest = first;
    for (int d = ndim - 1; d >= 0; d--) {
        index[d] = shape[d] ? rest % shape[d] : 0;
        rest = shape[d] ? rest / shape[d] : 0;
    }
    int last = ndim - 1;
    while (count > 0) {
        int64_t offset = 0;
        for (int d = 0; d < ndim; d++)
            offset += index[d] * strides[d];
        int64_t run = shape[last] - index[last];
        if (run > count)
            run = count;
        const uint8_t *src = base + offset * (int64_t)esize;
        if (strides[last] == 1)
            memcpy(dst, src, (size_t)run * esize);
        else
            copy_elements(dst, (int64_t)esize, src, strides[last] * (int64_t)esize, run, esize);
        dst += (size_t)run * esize;
        count -= run;
        index[last] += run;
        for (int d = last; d > 0 && index[d] == shape[d]; d--) {
            index[d] = 0;
            index[d - 1]++;
        }
    }
}

typedef struct hash_cursor {
    checksum_state *hasher;
    const uint8_t *chunk;
    uint64_t nbytes;
    uint64_t done;
} hash_cursor;

/* Hash the chunk up to byte end exactly. */
static void hash_to(hash_cursor *h, uint64_t end)
{
    if (!h->hasher || end <= h->done)
        return;
    checksum_update(h->hasher, h->chunk + h->done, end - h->done);
    h->done = end;
}

/* Hash the chunk up to at least byte end, in whole blocks. */
static void hash_through(hash_cursor *h, uint64_t end)
{
    uint64_t target = (end + HASH_BLOCK_BYTES - 1) / HASH_BLOCK_BYTES * HASH_BLOCK_BYTES;
    hash_to(h, target < h->nbytes ? target : h->nbytes);
}

/* Drop dims of size 1 and merge dims that are contiguous in both layouts. */
static int coalesce(int ndim, const int64_t *shape, const int64_t *dst_strides,
                    const int64_t *src_strides, int64_t *out_shape, int64_t *out_dst,
                    int64_t *out_src)
{
    int k = 0;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 1)
            continue;
        if (k && out_dst[k - 1] == shape[d] * dst_strides[d] &&
            out_src[k - 1] == shape[d] * src_strides[d]) {
            out_shape[k - 1] *= shape[d];
            out_dst[k - 1] = dst_strides[d];
            out_src[k - 1] = src_strides[d];
            continue;
        }
        out_shape[k] = shape[d];
        out_dst[k] = dst_strides[d];
        out_src[k] = src_strides[d];
        k++;
    }
    return k;
}

/* n elements from src (stride src_stride) to dst (stride dst_stride), strides in elements;
 * streaming when the piece belongs to a long contiguous run. */
static void copy_run(uint8_t *dst, int64_t dst_stride, const uint8_t *src, int64_t src_stride,
                     int64_t n, size_t esize, bool streaming)
{
    if (src_stride == 1 && dst_stride == 1 && streaming)
        stream_copy(dst, src, (size_t)n * esize);
    else if (src_stride == 1 && dst_stride == 1)
        memcpy(dst, src, (size_t)n * esize);
    else
        copy_elements(dst, dst_stride * (int64_t)esize, src, src_stride * (int64_t)esize, n, esize);
}

void copy_box_from_chunk(uint8_t *dst, const int64_t *dst_strides, const uint8_t *chunk,
                         uint64_t chunk_bytes, int64_t src_first, const int64_t *chunk_strides,
                         size_t esize, int ndim, const int64_t *box_shape, checksum_state *hasher,
                         uint64_t *digest)
{
    int64_t shape[MS_MAX_DIMS], ds[MS_MAX_DIMS], ss[MS_MAX_DIMS];
    int k = coalesce(ndim, box_shape, dst_strides, chunk_strides, shape, ds, ss);
    hash_cursor h = {.hasher = hasher, .chunk = chunk, .nbytes = chunk_bytes};
    if (hasher)
        checksum_reset(hasher);
    if (k == 0) {
        hash_through(&h, (uint64_t)(src_first + 1) * esize);
        memcpy(dst, chunk + src_first * (int64_t)esize, esize);
    } else {
        int64_t index[MS_MAX_DIMS] = {0};
        int inner = k - 1;
        for (;;) {
            int64_t src_at = src_first, dst_at = 0;
            for (int d = 0; d < inner; d++) {
                src_at += index[d] * ss[d];
                dst_at += index[d] * ds[d];
            }
            /* Long runs go in cache-sized pieces. A contiguous piece is hashed right after its
             * copy brought it into cache (bytes the box skips before it are hashed first);
             * short or strided ones are covered by whole blocks hashed ahead of the copy. */
            int64_t run = shape[inner];
            bool contiguous = ss[inner] == 1 && ds[inner] == 1;
            bool streaming = contiguous && (uint64_t)run * esize >= STREAM_MIN_BYTES;
            int64_t piece = ss[inner] == 1 ? HASH_BLOCK_BYTES / (int64_t)esize : run;
            for (int64_t done = 0; done < run; done += piece) {
                int64_t n = run - done < piece ? run - done : piece;
                int64_t first = src_at + done * ss[inner];
                uint64_t begin = (uint64_t)first * esize;
                uint64_t end = (uint64_t)(first + (n - 1) * ss[inner] + 1) * esize;
                bool hashed_after = contiguous && end - begin >= HASHED_AFTER_BYTES;
                if (hashed_after)
                    hash_to(&h, begin);
                else
                    hash_through(&h, end);
                copy_run(dst + (dst_at + done * ds[inner]) * (int64_t)esize, ds[inner],
                         chunk + begin, ss[inner], n, esize, streaming);
                if (hashed_after)
                    hash_to(&h, end);
            }
            int d = inner - 1;
            while (d >= 0 && ++index[d] == shape[d])
                index[d--] = 0;
            if (d < 0)
                break;
        }
    }
    if (hasher) {
        hash_to(&h, chunk_bytes);
        *digest = checksum_digest(hasher);
    }
}
