/* C tests of the local backend's collectives: every op and dtype, odd and empty sizes,
 * sizes that span many segment chunks, world sizes 1 to 4, in-place use and sub-groups,
 * read in place from the peers or, when a member cannot be read, staged. */
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "comm/local.h"
#include "test_comm_cases.h"

static int every_collective(int rank, int n, void *context)
{
    (void)context;
    ms_group *world = NULL;
    EXPECT_STATUS(MS_OK, ms_dist_world(&world));
    EXPECT(ms_group_rank(world) == rank && ms_group_size(world) == n);
    EXPECT(strcmp(ms_group_backend(world), "local") == 0);
    EXPECT(ms_group_device(world) == -1); /* a host backend: collectives on CPU tensors */
    collective_cases(NULL);
    return 0;
}

/* Drop CAP_SYS_PTRACE, and make rank 1's memory unreadable to the others (not dumpable). */
static void make_rank_1_unreadable(int rank)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    EXPECT(syscall(SYS_capget, &header, caps) == 0);
    caps[CAP_SYS_PTRACE / 32].effective &= ~(1u << (CAP_SYS_PTRACE % 32));
    caps[CAP_SYS_PTRACE / 32].permitted &= ~(1u << (CAP_SYS_PTRACE % 32));
    EXPECT(syscall(SYS_capset, &header, caps) == 0);
    if (rank == 1)
        EXPECT(prctl(PR_SET_DUMPABLE, 0) == 0);
}

/* Every collective when one member's memory cannot be read by the others: the members agree
 * to stage every collective through the segment. A member that read its peers in place while
 * the others staged would fall out of step. */
static int unreadable_member(int rank, int n, void *context)
{
    (void)n;
    (void)context;
    make_rank_1_unreadable(rank);
    collective_cases(NULL);
    return 0;
}

typedef struct hash_case {
    int dtype;
    int unreadable; /* rank 1 unreadable: the all_reduce is staged, else read in place */
} hash_case;

/* Inexact f32 and bf16 sums come out bitwise identical on every rank. */
static int report_all_reduce_hash(int rank, int n, void *context)
{
    (void)n;
    hash_case *c = context;
    if (c->unreadable)
        make_rank_1_unreadable(rank);
    ms_tensor *t = new_tensor(c->dtype, 2500001); /* at least 4 MiB in every dtype */
    for (int64_t i = 0; i < t->numel; i++)
        store_element(ms_tensor_data(t), c->dtype, i, sin((double)(i + 1) * (rank + 1.37)) * 1e3);
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(NULL, t, MS_DIST_SUM));
    uint64_t hash = fnv1a(ms_tensor_data(t), ms_tensor_nbytes(t));
    ms_tensor_free(t);
    char text[64];
    int len = snprintf(text, sizeof text, "%llu", (unsigned long long)hash);
    ms_local_finish(0, text, (size_t)len);
    return 0;
}

/* ... on every rank, and alike whether read in place or staged. */
static void test_identical_results(void)
{
    int kinds[] = {MS_F32, MS_BF16, MS_F16};
    for (int k = 0; k < 3; k++) {
        char first_hash[2][64] = {{0}};
        for (int unreadable = 0; unreadable < 2; unreadable++) {
            hash_case c = {kinds[k], unreadable};
            ms_spawn *job = NULL;
            int rank = -1;
            EXPECT_STATUS(MS_OK, ms_spawn_new(&job, 3, 20000, &rank));
            if (rank >= 0)
                report_all_reduce_hash(rank, 3, &c);
            EXPECT_STATUS(MS_OK, ms_spawn_wait(job));
            ms_rank_outcome first, other;
            ms_spawn_outcome(job, 0, &first);
            EXPECT(first.state == MS_RANK_RETURNED && first.nbytes < sizeof first_hash[0]);
            for (int r = 1; r < 3; r++) {
                ms_spawn_outcome(job, r, &other);
                EXPECT(other.state == MS_RANK_RETURNED && other.nbytes == first.nbytes &&
                       memcmp(other.bytes, first.bytes, first.nbytes) == 0);
            }
            memcpy(first_hash[unreadable], first.bytes, first.nbytes < 63 ? first.nbytes : 63);
            ms_spawn_free(job);
        }
        EXPECT(strcmp(first_hash[0], first_hash[1]) == 0);
    }
}

/* Sub-groups of a world of 4: {0, 2}, {1, 3} (a 2 x 2 mesh's columns), {1, 2, 3} and a
 * group made twice with the same members, used alternately. */
static int sub_groups(int rank, int n, void *context)
{
    (void)context;
    ms_group *column[2], *triple, *again[2];
    for (int c = 0; c < 2; c++)
        EXPECT_STATUS(MS_OK, ms_group_new(&column[c], NULL, (int[]){c, c + 2}, 2));
    EXPECT_STATUS(MS_OK, ms_group_new(&triple, NULL, (int[]){3, 1, 2}, 3));
    for (int a = 0; a < 2; a++)
        EXPECT_STATUS(MS_OK, ms_group_new(&again[a], NULL, (int[]){0, 1, 2, 3}, n));
    ms_group *mine = column[rank % 2];
    EXPECT(ms_group_rank(mine) == rank / 2 && ms_group_size(mine) == 2);
    EXPECT(ms_group_rank(column[1 - rank % 2]) == -1);
    int ranks[2];
    EXPECT_STATUS(MS_OK, ms_group_ranks(mine, ranks));
    EXPECT(ranks[0] == rank % 2 && ranks[1] == rank % 2 + 2);
    EXPECT(ms_group_rank(triple) == (rank == 0 ? -1 : rank - 1));

    ms_tensor *t = new_tensor(MS_I64, 1001);
    for (int round = 0; round < 3; round++) {
        fill_pattern(t, rank, 0);
        EXPECT_STATUS(MS_OK, ms_dist_all_reduce(mine, t, MS_DIST_SUM));
        for (int64_t i = 0; i < t->numel; i++)
            EXPECT(((int64_t *)ms_tensor_data(t))[i] ==
                   (int64_t)(pattern(rank % 2, i) + pattern(rank % 2 + 2, i)));
        if (rank != 0) {
            fill_pattern(t, rank, 0);
            EXPECT_STATUS(MS_OK, ms_dist_all_reduce(triple, t, MS_DIST_MAX));
            for (int64_t i = 0; i < 5; i++)
                EXPECT(((int64_t *)ms_tensor_data(t))[i] == (int64_t)pattern(3, i));
        } else {
            EXPECT_STATUS(MS_ERR_STATE, ms_dist_all_reduce(triple, t, MS_DIST_SUM));
        }
        for (int a = 0; a < 2; a++) {
            fill_pattern(t, rank, 0);
            EXPECT_STATUS(MS_OK, ms_dist_broadcast(again[a], t, a + 1));
            EXPECT(((int64_t *)ms_tensor_data(t))[3] == (int64_t)pattern(a + 1, 3));
        }
    }
    ms_tensor_free(t);
    for (int c = 0; c < 2; c++)
        ms_group_free(column[c]);
    ms_group_free(triple);
    for (int a = 0; a < 2; a++)
        ms_group_free(again[a]);
    return 0;
}

/* Which slot of the segment's group registry g occupies. */
static int slot_of(const ms_group *g) { return ((const local_group *)g->impl)->entry; }

static uint32_t slots_used(void)
{
    ms_group *world = NULL;
    EXPECT_STATUS(MS_OK, ms_dist_world(&world));
    return atomic_load(&((local_group *)world->impl)->seg->group_count);
}

/* A group's slot (and its area of the segment) is reused once every member freed its handle,
 * never while one still holds it: groups made and freed without end fit in the segment. */
static int group_slots(int rank, int n, void *context)
{
    (void)n;
    (void)context;
    ms_tensor *t = new_tensor(MS_F32, 3);
    for (int i = 0; i < 1000 && !failures; i++) {
        ms_group *g = NULL;
        EXPECT_STATUS(MS_OK, ms_group_new(&g, NULL, (int[]){0, 1}, 2));
        if (!g)
            break;
        fill_pattern(t, rank, 0);
        EXPECT_STATUS(MS_OK, ms_dist_all_reduce(g, t, MS_DIST_SUM));
        EXPECT(((float *)ms_tensor_data(t))[1] == (float)(pattern(0, 1) + pattern(1, 1)));
        ms_group_free(g);
    }
    EXPECT(slots_used() < 8);
    ms_group *held = NULL, *other = NULL;
    EXPECT_STATUS(MS_OK, ms_group_new(&held, NULL, (int[]){0, 1}, 2));
    int held_slot = slot_of(held);
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(held, t, MS_DIST_SUM));
    if (rank == 1)
        ms_group_free(held);
    EXPECT_STATUS(MS_OK, ms_dist_barrier(NULL));
    /* rank 0 still holds it: a new group of the same members gets another slot */
    EXPECT_STATUS(MS_OK, ms_group_new(&other, NULL, (int[]){0, 1}, 2));
    EXPECT(slot_of(other) != held_slot);
    fill_pattern(t, rank, 0);
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(other, t, MS_DIST_MAX));
    EXPECT(((float *)ms_tensor_data(t))[2] == (float)pattern(1, 2));
    if (rank == 0)
        ms_group_free(held);
    ms_group_free(other);
    ms_tensor_free(t);
    return 0;
}

static int argument_checks(int rank, int n, void *context)
{
    (void)context;
    (void)rank;
    ms_tensor *a = new_tensor(MS_F32, 8), *b = new_tensor(MS_F64, 8 * n);
    EXPECT_STATUS(MS_ERR_DTYPE, ms_dist_all_gather_into_tensor(NULL, b, a));
    EXPECT(strstr(ms_last_error(), "f64") && strstr(ms_last_error(), "f32"));
    ms_tensor *c = new_tensor(MS_F32, 8 * n + 1);
    EXPECT_STATUS(MS_ERR_SHAPE, ms_dist_all_gather_into_tensor(NULL, c, a));
    EXPECT_STATUS(MS_ERR_SHAPE, ms_dist_reduce_scatter_tensor(NULL, a, c, MS_DIST_SUM));
    EXPECT_STATUS(MS_ERR_INVALID, ms_dist_all_reduce(NULL, a, 7));
    EXPECT_STATUS(MS_ERR_INVALID, ms_dist_broadcast(NULL, a, n));
    ms_tensor *strided = NULL;
    int64_t shape = 4, stride = 2;
    EXPECT_STATUS(MS_OK, ms_tensor_view(&strided, a, 1, &shape, &stride, 0));
    EXPECT_STATUS(MS_ERR_INVALID, ms_dist_all_reduce(NULL, strided, MS_DIST_SUM));
    EXPECT(strstr(ms_last_error(), "contiguous") != NULL);
    ms_tensor *overlap = NULL;
    int64_t count = 8;
    ms_tensor *out = new_tensor(MS_F32, 8 * n);
    if (n > 1) {
        EXPECT_STATUS(MS_OK, ms_tensor_view(&overlap, out, 1, &count, NULL, 4));
        EXPECT_STATUS(MS_ERR_INVALID, ms_dist_all_gather_into_tensor(NULL, out, overlap));
    }
    ms_group *g = NULL;
    EXPECT_STATUS(MS_ERR_INVALID, ms_group_new(&g, NULL, (int[]){0, 0}, 2));
    EXPECT_STATUS(MS_ERR_INVALID, ms_group_new(&g, NULL, (int[]){n}, 1));
    ms_spawn *job = NULL;
    int inner = 0;
    EXPECT_STATUS(MS_ERR_STATE, ms_spawn_new(&job, 2, 0, &inner));
    /* the segment holds a bounded number of groups; running out is an error, not a crash */
    ms_group *made[300];
    int nmade = 0, status = MS_OK;
    while (nmade < 300 && (status = ms_group_new(&made[nmade], NULL, (int[]){0, 1}, 2)) == 0)
        nmade++;
    EXPECT_STATUS(MS_ERR_OOM, status);
    EXPECT(strstr(ms_last_error(), "no room for another group") != NULL);
    for (int i = 0; i < nmade; i++)
        ms_group_free(made[i]);
    /* the group still works after rejected calls */
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(NULL, a, MS_DIST_SUM));
    ms_tensor_free(overlap);
    ms_tensor_free(strided);
    ms_tensor_free(out);
    ms_tensor_free(a);
    ms_tensor_free(b);
    ms_tensor_free(c);
    return 0;
}

int main(void)
{
    for (int n = 1; n <= 4; n++)
        expect_clean_run(n, every_collective, NULL, "every_collective");
    expect_clean_run(3, unreadable_member, NULL, "unreadable_member");
    test_identical_results();
    expect_clean_run(4, sub_groups, NULL, "sub_groups");
    expect_clean_run(2, group_slots, NULL, "group_slots");
    expect_clean_run(2, argument_checks, NULL, "argument_checks");
    ms_group *world = NULL;
    EXPECT_STATUS(MS_ERR_STATE, ms_dist_world(&world));
    EXPECT(ms_group_device(NULL) == -1);
    if (failures)
        fprintf(stderr, "test_comm_local: %d failures\n", failures);
    return failures != 0;
}
