/* moonshard store tests: checksum_copy copies exactly the bytes asked for and returns what
 * libxxhash's XXH3-64 gives for them, for lengths around XXH3's stripe, block and size-class
 * boundaries, any source and destination alignment, with and without streaming stores. */
#include <stdbool.h>
#include <xxhash.h>

#include "check.h"
#include "store/store_internal.h"

enum { GUARD = 64, GUARD_BYTE = 0xA5, MAX_BYTES = (3 << 20) + 4097 };

static const size_t LENGTHS[] = {0,    1,    15,   16,   17,     63,        64,        65,
                                 128,  129,  239,  240,  241,    255,       256,       1023,
                                 1024, 1025, 1087, 1088, 2047,   2048,      4103,      65539,
                                 1 << 20, (1 << 20) + 4097, 3 << 20, MAX_BYTES};
static const size_t SRC_SHIFTS[] = {0, 3, 64};
static const size_t DST_SHIFTS[] = {0, 8, 65};

static void check_copy(const uint8_t *src, uint8_t *area, size_t n, size_t dst_shift,
                       bool streaming)
{
    memset(area, GUARD_BYTE, GUARD + dst_shift + n + GUARD);
    uint8_t *dst = area + GUARD + dst_shift;
    uint64_t digest = checksum_copy(dst, src, n, streaming);
    CHECK_MSG(digest == XXH3_64bits(src, n), "n %zu, dst shift %zu, streaming %d", n, dst_shift,
              streaming);
    CHECK_MSG(memcmp(dst, src, n) == 0, "n %zu, dst shift %zu, streaming %d", n, dst_shift,
              streaming);
    bool guards_intact = true;
    for (size_t i = 0; i < GUARD + dst_shift; i++)
        guards_intact = guards_intact && area[i] == GUARD_BYTE;
    for (size_t i = 0; i < GUARD; i++)
        guards_intact = guards_intact && dst[n + i] == GUARD_BYTE;
    CHECK_MSG(guards_intact, "bytes around the copy changed (n %zu, dst shift %zu)", n, dst_shift);
}

static void test_copies_match_xxh3(void)
{
    size_t source_bytes = (MAX_BYTES + 128 + 63) / 64 * 64;
    size_t area_bytes = (MAX_BYTES + 256 + 2 * GUARD + 63) / 64 * 64;
    uint8_t *source = aligned_alloc(64, source_bytes), *area = aligned_alloc(64, area_bytes);
    uint64_t state = 0x9E3779B97F4A7C15u;
    for (size_t i = 0; i < MAX_BYTES + 128; i++) {
        state = state * 6364136223846793005u + 1442695040888963407u;
        source[i] = (uint8_t)(state >> 56);
    }
    for (size_t l = 0; l < sizeof LENGTHS / sizeof *LENGTHS; l++)
        for (size_t s = 0; s < sizeof SRC_SHIFTS / sizeof *SRC_SHIFTS; s++)
            for (size_t d = 0; d < sizeof DST_SHIFTS / sizeof *DST_SHIFTS; d++)
                for (int streaming = 0; streaming < 2; streaming++)
                    check_copy(source + SRC_SHIFTS[s], area, LENGTHS[l], DST_SHIFTS[d], streaming);
    free(source);
    free(area);
}

static void test_streaming_copy_is_exact(void)
{
    enum { BYTES = 1000003 };
    uint8_t *source = malloc(BYTES), *area = malloc(BYTES + 128);
    for (size_t i = 0; i < BYTES; i++)
        source[i] = (uint8_t)(i * 131 + 7);
    for (size_t shift = 0; shift < 64; shift += 7) {
        memset(area, GUARD_BYTE, BYTES + 128);
        stream_copy(area + shift, source, BYTES);
        CHECK_MSG(memcmp(area + shift, source, BYTES) == 0, "dst shift %zu", shift);
        CHECK_MSG(area[shift + BYTES] == GUARD_BYTE && (shift == 0 || area[shift - 1] == GUARD_BYTE),
                  "bytes around the copy changed (dst shift %zu)", shift);
    }
    free(source);
    free(area);
}

int main(void)
{
    test_copies_match_xxh3();
    test_streaming_copy_is_exact();
    return check_summary("test_store_checksum");
}
