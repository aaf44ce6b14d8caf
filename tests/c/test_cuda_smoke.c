/* moonshard C tests: the CUDA build loads and reports a missing device cleanly; on a machine
 * with a GPU it moves data through cuda:0, runs a few ops there and checks the pool. */
#include <stdio.h>
#include <string.h>

#include "check.h"

/* Forked ranks have a local group to bootstrap from; without a device ms_nccl_init fails
 * cleanly on every rank and the local world stays installed. */
static void check_nccl_without_device(void)
{
    ms_spawn *job = NULL;
    int rank = -1;
    CHECK_OK(ms_spawn_new(&job, 2, 20000, &rank));
    if (rank >= 0) {
        int status = ms_nccl_init();
        ms_group *world = NULL;
        int clean = (status == MS_ERR_DEVICE || status == MS_ERR_UNSUPPORTED) &&
                    strstr(ms_last_error(), "nccl_init:") == ms_last_error() &&
                    ms_dist_world(&world) == MS_OK && strcmp(ms_group_backend(world), "local") == 0;
        ms_local_finish(clean ? 0 : 1, ms_last_error(), strlen(ms_last_error()));
    }
    CHECK_OK(ms_spawn_wait(job));
    for (int r = 0; r < 2; r++) {
        ms_rank_outcome outcome;
        CHECK_OK(ms_spawn_outcome(job, r, &outcome));
        CHECK_MSG(outcome.state == MS_RANK_RETURNED, "rank %d: %.*s", r, (int)outcome.nbytes,
                  outcome.bytes ? outcome.bytes : "");
    }
    ms_spawn_free(job);
}

static void check_no_device(void)
{
    int pool = -1;
    CHECK_ERR(ms_pool_find("cuda:0", &pool), MS_ERR_DEVICE);
    CHECK(strstr(ms_last_error(), "cuda:0 is not available") != NULL);
    CHECK(ms_cuda_unavailable_reason()[0] != '\0');
    CHECK_ERR(ms_cuda_synchronize(0), MS_ERR_DEVICE);
    ms_tensor *t = NULL;
    CHECK_ERR(ms_tensor_new(&t, MS_F32, 1, SHAPE(4), MS_POOL_CUDA0), MS_ERR_DEVICE);
    CHECK(t == NULL);
    /* without a process group there is nothing to bootstrap NCCL from */
    int status = ms_nccl_init();
    CHECK(status == MS_ERR_STATE || status == MS_ERR_UNSUPPORTED);
    check_nccl_without_device();
    /* the host pool still serves ordinary memory */
    ms_memory_stats before, after;
    CHECK_OK(ms_pool_stats(MS_POOL_HOST, &before));
    CHECK_OK(ms_tensor_zeros(&t, MS_F64, 2, SHAPE(3, 5), MS_POOL_HOST));
    CHECK_OK(ms_pool_stats(MS_POOL_HOST, &after));
    CHECK(after.allocated - before.allocated == 3 * 5 * 8);
    ms_tensor_free(t);
    printf("test_cuda_smoke: no device: %s\n", ms_cuda_unavailable_reason());
}

/* cpu -> cuda:0 -> add -> matmul -> cpu against values worked out by hand. */
static void check_device(void)
{
    int pool = -1;
    CHECK_OK(ms_pool_find("cuda:0", &pool));
    ms_tensor *host_a = make(MS_F32, 2, SHAPE(2, 3)), *a = NULL, *b = NULL, *sum = NULL;
    ms_tensor *product = NULL, *back = make(MS_F32, 2, SHAPE(2, 2));
    CHECK_OK(ms_arange(host_a, 1.0, 1.0)); /* [[1, 2, 3], [4, 5, 6]] */
    CHECK_OK(ms_tensor_new(&a, MS_F32, 2, SHAPE(2, 3), pool));
    CHECK_OK(ms_tensor_new(&b, MS_F32, 2, SHAPE(2, 3), pool));
    CHECK_OK(ms_tensor_new(&sum, MS_F32, 2, SHAPE(2, 3), pool));
    CHECK_OK(ms_tensor_new(&product, MS_F32, 2, SHAPE(2, 2), pool));
    CHECK_OK(ms_copy(a, host_a));
    CHECK_OK(ms_fill(b, 1.0));
    CHECK_OK(ms_binary(sum, a, b, MS_ADD)); /* [[2, 3, 4], [5, 6, 7]] */
    CHECK_OK(ms_matmul(product, sum, a, 0, 1, 1.0, 0.0)); /* sum @ a^T */
    CHECK_OK(ms_copy(back, product));
    const float *p = ms_tensor_data(back);
    CHECK_NEAR(p[0], 2 * 1 + 3 * 2 + 4 * 3, 0, 0);
    CHECK_NEAR(p[1], 2 * 4 + 3 * 5 + 4 * 6, 0, 0);
    CHECK_NEAR(p[2], 5 * 1 + 6 * 2 + 7 * 3, 0, 0);
    CHECK_NEAR(p[3], 5 * 4 + 6 * 5 + 7 * 6, 0, 0);
    ms_memory_stats stats;
    CHECK_OK(ms_pool_stats(pool, &stats));
    CHECK(stats.allocated == 3 * 6 * 4 + 4 * 4);
    ms_tensor_free(a);
    ms_tensor_free(b);
    ms_tensor_free(sum);
    ms_tensor_free(product);
    CHECK_OK(ms_pool_stats(pool, &stats));
    CHECK(stats.allocated == 0 && stats.reserved > 0); /* freed blocks stay cached */
    CHECK_OK(ms_pool_empty_cache(pool));
    CHECK_OK(ms_pool_stats(pool, &stats));
    CHECK(stats.reserved == 0);
    ms_tensor_free(host_a);
    ms_tensor_free(back);
    printf("test_cuda_smoke: exercised cuda:0\n");
}

int main(void)
{
    int devices = -1;
    CHECK_OK(ms_cuda_device_count(&devices));
    CHECK(devices >= 0);
    if (devices == 0)
        check_no_device();
    else
        check_device();
    return check_summary("test_cuda_smoke");
}
