/* C unit tests of the runtime core: status codes, pool statistics, tensors and views.
 * Expected counters are computed from the sizes each test allocates. */
#include <stdio.h>
#include <string.h>

#include "ms.h"

static int failures;
#define EXPECT(cond)                                                             \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);  \
            failures++;                                                          \
        }                                                                        \
    } while (0)

static ms_memory_stats stats_of(int pool)
{
    ms_memory_stats s;
    ms_pool_stats(pool, &s);
    return s;
}

static void test_status_codes(void)
{
    EXPECT(strcmp(ms_strerror(MS_OK), "success") == 0);
    EXPECT(strstr(ms_strerror(MS_ERR_SHAPE), "shape") != NULL);
    EXPECT(strlen(ms_strerror(2)) > 0); /* errno ENOENT */
    EXPECT(strlen(ms_strerror(-1)) > 0);
    int pool;
    EXPECT(ms_pool_find("nope", &pool) == MS_ERR_NOT_FOUND);
    EXPECT(strstr(ms_last_error(), "nope") != NULL);
    EXPECT(strlen(ms_last_error_site()) > 0);
}

static void test_pool_statistics(void)
{
    int pool;
    EXPECT(ms_pool_find("host", &pool) == MS_OK && pool == MS_POOL_HOST);
    ms_memory_stats before = stats_of(pool);
    void *a = NULL, *b = NULL;
    EXPECT(ms_pool_alloc(pool, 1000, &a) == MS_OK && a != NULL);
    EXPECT(ms_pool_alloc(pool, 3000, &b) == MS_OK && b != NULL);
    ms_memory_stats mid = stats_of(pool);
    EXPECT(mid.allocated - before.allocated == 4000);
    EXPECT(mid.allocs - before.allocs == 2);
    EXPECT(mid.active - before.active == 2);
    EXPECT(mid.peak >= before.allocated + 4000);
    EXPECT(mid.reserved - before.reserved >= 4000);
    EXPECT(((uintptr_t)a & 63) == 0);
    ms_pool_free(pool, b, 3000);
    ms_pool_reset_peak(pool);
    ms_memory_stats after_free = stats_of(pool);
    EXPECT(after_free.allocated - before.allocated == 1000);
    EXPECT(after_free.peak == after_free.allocated);
    /* the freed block stays cached: reserved does not fall until empty_cache */
    EXPECT(after_free.reserved == mid.reserved);
    void *c = NULL;
    EXPECT(ms_pool_alloc(pool, 3000, &c) == MS_OK);
    EXPECT(c == b); /* served from the cache */
    EXPECT(stats_of(pool).reserved == mid.reserved);
    ms_pool_free(pool, c, 3000);
    ms_pool_free(pool, a, 1000);
    ms_pool_empty_cache(pool);
    ms_memory_stats end = stats_of(pool);
    EXPECT(end.allocated == before.allocated);
    EXPECT(end.reserved <= before.reserved);
}

static void test_tensors_and_views(void)
{
    ms_memory_stats before = stats_of(MS_POOL_CPU);
    int64_t shape[2] = {3, 4};
    ms_tensor *t = NULL;
    EXPECT(ms_tensor_new(&t, MS_F32, 2, shape, MS_POOL_CPU) == MS_OK);
    EXPECT(t->numel == 12 && t->strides[0] == 4 && t->strides[1] == 1);
    EXPECT(ms_tensor_nbytes(t) == 48 && ms_tensor_is_contiguous(t));
    EXPECT(stats_of(MS_POOL_CPU).allocated - before.allocated == 48);

    int64_t tshape[2] = {4, 3}, tstrides[2] = {1, 4};
    ms_tensor *transposed = NULL;
    EXPECT(ms_tensor_view(&transposed, t, 2, tshape, tstrides, 0) == MS_OK);
    EXPECT(!ms_tensor_is_contiguous(transposed));
    EXPECT(t->storage->refcount == 2);

    int64_t too_big[1] = {13};
    ms_tensor *bad = NULL;
    EXPECT(ms_tensor_view(&bad, t, 1, too_big, NULL, 0) == MS_ERR_INDEX && bad == NULL);
    int64_t row[1] = {4};
    EXPECT(ms_tensor_view(&bad, t, 1, row, NULL, 9) == MS_ERR_INDEX);
    EXPECT(strstr(ms_last_error(), "outside the storage") != NULL);

    int64_t negative[1] = {-1};
    EXPECT(ms_tensor_new(&bad, MS_F32, 1, negative, MS_POOL_CPU) == MS_ERR_SHAPE);
    EXPECT(ms_tensor_new(&bad, 42, 1, row, MS_POOL_CPU) == MS_ERR_DTYPE);
    EXPECT(ms_tensor_new(&bad, MS_F32, 9, row, MS_POOL_CPU) == MS_ERR_INVALID);

    ms_tensor_free(t);
    EXPECT(stats_of(MS_POOL_CPU).allocated - before.allocated == 48); /* the view holds it */
    ms_tensor_free(transposed);
    EXPECT(stats_of(MS_POOL_CPU).allocated == before.allocated);
    ms_tensor_free(NULL);

    ms_tensor *scalar = NULL;
    EXPECT(ms_tensor_new(&scalar, MS_I64, 0, NULL, MS_POOL_CPU) == MS_OK);
    EXPECT(scalar->numel == 1 && ms_tensor_nbytes(scalar) == 8);
    ms_tensor_free(scalar);
}

static void test_device_pools_without_cuda(void)
{
    int pool;
    int status = ms_pool_find("cuda:0", &pool);
    EXPECT(status == MS_OK || status == MS_ERR_DEVICE);
    if (status != MS_OK)
        EXPECT(strstr(ms_last_error(), "cuda:0") != NULL);
}

int main(void)
{
    test_status_codes();
    test_pool_statistics();
    test_tensors_and_views();
    test_device_pools_without_cuda();
    printf("test_core: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
    return failures != 0;
}
