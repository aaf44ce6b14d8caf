/* C tests of the local backend's shared heap (runtime/comm/local_heap.c, local_shared.c):
 * a rank's large tensors lie where every rank reads them, at the same address; reduce_scatter
 * and all_reduce reading them there give the bits of the staged and kernel-copy paths; a rank
 * whose input is private makes everyone stage; freed memory goes back to the system; and the
 * switch is checked. */
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"
#include "test_comm_util.h"

static const char *HEAP = "MOONSHARD_SHARED_HEAP";

/* Every rank fills a 4 MiB tensor with its own pattern and shares the address; each reads
 * every peer's tensor at that address. Small tensors stay private. */
static int peers_read_in_place(int rank, int n, void *context)
{
    (void)context;
    ms_tensor *big = new_tensor(MS_F32, 1 << 20), *small = new_tensor(MS_F32, 256);
    EXPECT(ms_pool_in_arena(ms_tensor_data(big), ms_tensor_nbytes(big)));
    EXPECT(!ms_pool_in_arena(ms_tensor_data(small), ms_tensor_nbytes(small)));
    float *data = ms_tensor_data(big);
    for (int64_t i = 0; i < big->numel; i++)
        data[i] = (float)(rank * 1000 + i % 977);
    ms_tensor *mine = new_tensor(MS_I64, 1), *all = new_tensor(MS_I64, n);
    *(int64_t *)ms_tensor_data(mine) = (int64_t)(uintptr_t)data;
    EXPECT_STATUS(MS_OK, ms_dist_all_gather_into_tensor(NULL, all, mine));
    const int64_t *addresses = ms_tensor_data(all);
    for (int m = 0; m < n; m++) {
        const float *peer = (const float *)(uintptr_t)addresses[m];
        int64_t wrong = 0;
        for (int64_t i = 0; i < big->numel; i++)
            wrong += peer[i] != (float)(m * 1000 + i % 977);
        EXPECT(wrong == 0);
    }
    EXPECT_STATUS(MS_OK, ms_dist_barrier(NULL)); /* every peer read before anything is freed */
    ms_tensor_free(all);
    ms_tensor_free(mine);
    ms_tensor_free(small);
    ms_tensor_free(big);
    return 0;
}

typedef struct hash_case {
    int dtype, op;
    int private_rank; /* this rank's input comes from the host pool (private): -1 for none */
} hash_case;

static ms_tensor *filled(int dtype, int64_t numel, int rank, int pool)
{
    ms_tensor *t = NULL;
    if (ms_tensor_new(&t, dtype, 1, &numel, pool) != MS_OK)
        exit(2);
    for (int64_t i = 0; i < numel; i++)
        store_element(ms_tensor_data(t), dtype, i, sin((double)(i + 1) * (rank + 1.37)) * 1e3);
    return t;
}

/* The hashes of a reduce_scatter's block and an all_reduce's result on this rank: sizes
 * past every path's threshold and odd, so pieces and blocks end off a cache line. */
static int report_hashes(int rank, int n, void *context)
{
    const hash_case *c = context;
    int pool = rank == c->private_rank ? MS_POOL_HOST : MS_POOL_CPU;
    int64_t block = 700001, whole = 2500001;
    ms_tensor *in = filled(c->dtype, block * n, rank, pool), *out = new_tensor(c->dtype, block);
    ms_tensor *t = filled(c->dtype, whole, rank, pool);
    EXPECT_STATUS(MS_OK, ms_dist_reduce_scatter_tensor(NULL, out, in, c->op));
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(NULL, t, c->op));
    char text[64];
    int len = snprintf(text, sizeof text, "%016llx %016llx",
                       (unsigned long long)fnv1a(ms_tensor_data(out), ms_tensor_nbytes(out)),
                       (unsigned long long)fnv1a(ms_tensor_data(t), ms_tensor_nbytes(t)));
    ms_tensor_free(t);
    ms_tensor_free(out);
    ms_tensor_free(in);
    ms_local_finish(failures, text, (size_t)len);
    return 0;
}

/* Rank r's two hashes of one run. */
static void run_hashes(const hash_case *c, const char *heap, char hashes[3][64])
{
    setenv(HEAP, heap, 1);
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 3, 30000, &rank));
    if (rank >= 0)
        report_hashes(rank, 3, (void *)c);
    EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
    for (int r = 0; r < 3; r++) {
        ms_rank_outcome outcome;
        ms_spawn_outcome(job, r, &outcome);
        EXPECT(outcome.state == MS_RANK_RETURNED && outcome.code == 0 && outcome.nbytes < 64);
        memset(hashes[r], 0, 64);
        memcpy(hashes[r], outcome.bytes, outcome.nbytes < 63 ? outcome.nbytes : 63);
    }
    ms_spawn_free(job);
    unsetenv(HEAP);
}

/* In the heap, with the heap switched off (reduce_scatter staged, all_reduce through the
 * kernel's copies) and with one rank's tensors private (everyone stages): the same bits. */
static void test_same_bits_every_path(void)
{
    hash_case cases[] = {{MS_F32, MS_DIST_SUM, -1}, {MS_F32, MS_DIST_AVG, -1},
                         {MS_F32, MS_DIST_MAX, -1}, {MS_BF16, MS_DIST_SUM, -1},
                         {MS_F16, MS_DIST_SUM, -1}, {MS_F64, MS_DIST_SUM, -1}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char shared[3][64], off[3][64], mixed[3][64];
        run_hashes(&cases[k], "1", shared);
        run_hashes(&cases[k], "0", off);
        hash_case one_private = cases[k];
        one_private.private_rank = 2;
        run_hashes(&one_private, "1", mixed);
        for (int r = 0; r < 3; r++) {
            EXPECT(strcmp(shared[r], off[r]) == 0 && strcmp(shared[r], mixed[r]) == 0);
            if (failures)
                fprintf(stderr, "  case %zu rank %d: %s | %s | %s\n", k, r, shared[r], off[r],
                        mixed[r]);
        }
    }
}

static int64_t rss_shmem_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int64_t kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "RssShmem: %lld kB", (long long *)&kib) == 1)
            break;
    if (f)
        fclose(f);
    return kib;
}

/* A 64 MiB tensor's pages are shared memory while it lives, and given back once it is freed
 * and the pool's cache emptied; the pool's statistics stay exact throughout. */
static int memory_given_back(int rank, int n, void *context)
{
    (void)rank, (void)n, (void)context;
    ms_memory_stats before, during, after;
    ms_pool_empty_cache(MS_POOL_CPU);
    EXPECT_STATUS(MS_OK, ms_pool_stats(MS_POOL_CPU, &before));
    int64_t shmem_before = rss_shmem_kib();
    ms_tensor *t = new_tensor(MS_F32, 16 << 20);
    memset(ms_tensor_data(t), 1, ms_tensor_nbytes(t));
    EXPECT_STATUS(MS_OK, ms_pool_stats(MS_POOL_CPU, &during));
    EXPECT(during.allocated - before.allocated == 64 << 20);
    EXPECT(rss_shmem_kib() - shmem_before >= 64 * 1024);
    ms_tensor_free(t);
    EXPECT_STATUS(MS_OK, ms_pool_empty_cache(MS_POOL_CPU));
    EXPECT_STATUS(MS_OK, ms_pool_stats(MS_POOL_CPU, &after));
    EXPECT(after.allocated == before.allocated && after.reserved == before.reserved);
    EXPECT(rss_shmem_kib() - shmem_before < 1024);
    return 0;
}

static int heap_switched_off(int rank, int n, void *context)
{
    (void)rank, (void)n, (void)context;
    ms_tensor *big = new_tensor(MS_F32, 1 << 20);
    EXPECT(!ms_pool_in_arena(ms_tensor_data(big), ms_tensor_nbytes(big)));
    ms_tensor_free(big);
    return 0;
}

static void test_switch(void)
{
    setenv(HEAP, "0", 1);
    expect_clean_run(2, heap_switched_off, NULL, "heap_switched_off");
    setenv(HEAP, "yes", 1);
    ms_spawn *job = NULL;
    int rank = -1;
    EXPECT_STATUS(MS_ERR_INVALID, ms_spawn_new(&job, 2, 0, &rank));
    EXPECT(strstr(ms_last_error(), "MOONSHARD_SHARED_HEAP is 'yes'") != NULL);
    unsetenv(HEAP);
}

#if defined(__SANITIZE_ADDRESS__)
static const int sanitized = 1; /* its checks need the allocator's own memory: no heap */
#else
static const int sanitized = 0;
#endif

/* Whether this machine lets a process map a heap for 3 ranks as spawn does (a ulimit -v or
 * strict overcommit refuses it, and the ranks then stage: that is tested elsewhere). */
static int heap_possible(void)
{
    size_t bytes = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE) * 3;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED)
        return 0;
    munmap(p, bytes);
    return 1;
}

int main(void)
{
    if (sanitized || !heap_possible()) {
        printf("test_comm_shared: %s; only the switch is tested\n",
               sanitized ? "an address-sanitizer build has no shared heap"
                         : "this machine refuses a shared heap's address space");
    } else {
        expect_clean_run(3, peers_read_in_place, NULL, "peers_read_in_place");
        test_same_bits_every_path();
        expect_clean_run(2, memory_given_back, NULL, "memory_given_back");
    }
    test_switch();
    if (failures)
        fprintf(stderr, "test_comm_shared: %d failures\n", failures);
    return failures != 0;
}
