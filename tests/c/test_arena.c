/* C tests of the arena large pool blocks are carved from (runtime/arena.c): placement and
 * alignment, a full arena saying so, freed extents merging back into one, and a random run
 * checked against a map of which pages are taken. */
#include <stdint.h>
#include <sys/mman.h>

#include "arena.h"
#include "check.h"

enum { PAGE = 4096, PAGES = 1024 };

static uint8_t *map_range(void)
{
    void *p = mmap(NULL, (size_t)PAGES * PAGE, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

static void test_placement_and_merging(void)
{
    uint8_t *base = map_range();
    ms_arena *a = ms_arena_new(base, (size_t)PAGES * PAGE);
    CHECK(a != NULL);
    uint8_t *x = ms_arena_alloc(a, 3 * PAGE, PAGE), *y = ms_arena_alloc(a, PAGE, PAGE);
    uint8_t *z = ms_arena_alloc(a, 5 * PAGE, 16 * PAGE);
    CHECK(x == base && y == base + 3 * PAGE); /* first fit, in address order */
    CHECK(z && ((uintptr_t)z % (16 * PAGE)) == 0 && z >= y + PAGE);
    CHECK(ms_arena_owns(a, x) && ms_arena_owns(a, base + (size_t)PAGES * PAGE - 1));
    CHECK(!ms_arena_owns(a, base + (size_t)PAGES * PAGE) && !ms_arena_owns(a, base - 1));
    CHECK(ms_arena_alloc(a, (size_t)PAGES * PAGE, PAGE) == NULL); /* no room: NULL */
    memset(x, 7, 3 * PAGE);
    ms_arena_free(a, x, 3 * PAGE);
    CHECK(x[0] == 0 && x[3 * PAGE - 1] == 0); /* the freed pages went back: zero again */
    CHECK(ms_arena_alloc(a, 2 * PAGE, PAGE) == x); /* the hole is reused */
    ms_arena_free(a, x, 2 * PAGE);
    ms_arena_free(a, z, 5 * PAGE);
    ms_arena_free(a, y, PAGE);
    /* everything merged back: the whole range fits again */
    CHECK(ms_arena_alloc(a, (size_t)PAGES * PAGE, PAGE) == base);
    ms_arena_delete(a);
    munmap(base, (size_t)PAGES * PAGE);
}

/* Random allocations and frees of 1 to 40 pages at alignments of 1 to 8 pages: no two live
 * blocks overlap, and once everything is freed the whole range is one extent again. */
static void test_random_run(void)
{
    uint8_t *base = map_range();
    ms_arena *a = ms_arena_new(base, (size_t)PAGES * PAGE);
    static uint8_t taken[PAGES];
    struct { uint8_t *p; size_t pages; } live[256];
    int nlive = 0, refused = 0;
    srand(12345);
    for (int step = 0; step < 20000; step++) {
        if (nlive < 256 && (nlive == 0 || rand() % 2)) {
            size_t pages = 1 + (size_t)(rand() % 40), align = (size_t)PAGE << (rand() % 4);
            uint8_t *p = ms_arena_alloc(a, pages * PAGE, align);
            if (!p) {
                refused++;
                continue;
            }
            CHECK((uintptr_t)p % align == 0 && p >= base &&
                   p + pages * PAGE <= base + (size_t)PAGES * PAGE);
            for (size_t i = 0; i < pages; i++) {
                size_t page = (size_t)(p - base) / PAGE + i;
                CHECK(!taken[page]);
                taken[page] = 1;
            }
            live[nlive].p = p, live[nlive].pages = pages, nlive++;
        } else {
            int k = rand() % nlive;
            for (size_t i = 0; i < live[k].pages; i++)
                taken[(size_t)(live[k].p - base) / PAGE + i] = 0;
            ms_arena_free(a, live[k].p, live[k].pages * PAGE);
            live[k] = live[--nlive];
        }
    }
    CHECK(refused > 0); /* the run filled the arena at times */
    while (nlive > 0) {
        nlive--;
        ms_arena_free(a, live[nlive].p, live[nlive].pages * PAGE);
    }
    CHECK(ms_arena_alloc(a, (size_t)PAGES * PAGE, PAGE) == base);
    ms_arena_delete(a);
    munmap(base, (size_t)PAGES * PAGE);
}

int main(void)
{
    test_placement_and_merging();
    test_random_run();
    return check_summary("test_arena");
}
