/* The collective cases shared by the local and mpi tests: every op and dtype over sizes
 * that are empty, odd, and span many of the local segment's chunks. */
#ifndef TEST_COMM_CASES_H
#define TEST_COMM_CASES_H

#include "test_comm_util.h"

static inline ms_tensor *case_tensor(int dtype, int64_t numel) { return new_tensor(dtype, numel); }

static inline void case_tensor_free(ms_tensor *t) { ms_tensor_free(t); }

static const int dtypes[] = {MS_F32, MS_F64, MS_BF16, MS_F16, MS_I32, MS_I64, MS_U8};
enum { NDTYPES = sizeof dtypes / sizeof *dtypes };
/* 0, 1, odd, above 64 KiB (every dtype), and for f32 more 512 KiB chunks than the ring of
 * 4 holds and an all_reduce large enough to read the peers in place (4 MiB). */
static const int64_t sizes[] = {0, 1, 7, 1001, 70001, 700001, 1100001};
enum { NSIZES = sizeof sizes / sizeof *sizes };

typedef struct reduction {
    int dtype, op, world_size;
} reduction;

static inline double reduction_at(int64_t i, void *context)
{
    reduction *r = context;
    return expected_reduction(r->dtype, r->op, r->world_size, i);
}

typedef struct gathered {
    int64_t per_rank;
} gathered;

static inline double gathered_at(int64_t i, void *context)
{
    gathered *g = context;
    return pattern((int)(i / g->per_rank), i % g->per_rank);
}

static inline double root_pattern(int64_t i, void *context) { return pattern(*(int *)context, i); }

static inline void fill_pattern(ms_tensor *t, int rank, int64_t first)
{
    for (int64_t i = 0; i < t->numel; i++)
        store_element(ms_tensor_data(t), t->dtype, i, pattern(rank, first + i));
}

/* Largest size worth testing for dtype: big sizes only for f32 keep the test short. */
static inline int64_t size_limit(int dtype)
{
    return dtype == MS_F32 ? sizes[NSIZES - 1] : sizes[NSIZES - 3];
}

/* The average of integers is refused (as torch.distributed does), before anything moves. */
static inline int refused_average(int dtype, int op)
{
    return op == MS_DIST_AVG && (dtype == MS_I32 || dtype == MS_I64 || dtype == MS_U8);
}

static inline void all_reduce_cases(ms_group *g, int rank, int n)
{
    for (int d = 0; d < NDTYPES; d++)
        for (int s = 0; s < NSIZES && sizes[s] <= size_limit(dtypes[d]); s++)
            for (int op = MS_DIST_SUM; op <= MS_DIST_MIN; op++) {
                ms_tensor *t = case_tensor(dtypes[d], sizes[s]);
                fill_pattern(t, rank, 0);
                if (refused_average(dtypes[d], op)) {
                    EXPECT_STATUS(MS_ERR_DTYPE, ms_dist_all_reduce(g, t, op));
                    EXPECT(strstr(ms_last_error(), "avg needs a floating dtype") != NULL);
                    EXPECT(count_wrong(ms_tensor_data(t), dtypes[d], t->numel, 0, root_pattern,
                                       &rank) == 0);
                    case_tensor_free(t);
                    continue;
                }
                EXPECT_STATUS(MS_OK, ms_dist_all_reduce(g, t, op));
                reduction r = {dtypes[d], op, n};
                EXPECT(count_wrong(ms_tensor_data(t), dtypes[d], t->numel, 0, reduction_at,
                                   &r) == 0);
                case_tensor_free(t);
            }
}

static inline void all_gather_cases(ms_group *g, int rank, int n)
{
    for (int d = 0; d < NDTYPES; d++)
        for (int s = 0; s < NSIZES && sizes[s] <= size_limit(dtypes[d]); s++) {
            int64_t count = sizes[s];
            ms_tensor *in = case_tensor(dtypes[d], count), *out = case_tensor(dtypes[d], count * n);
            fill_pattern(in, rank, 0);
            EXPECT_STATUS(MS_OK, ms_dist_all_gather_into_tensor(g, out, in));
            gathered expect = {count};
            EXPECT(count_wrong(ms_tensor_data(out), dtypes[d], out->numel, 0, gathered_at,
                               &expect) == 0);
            /* in place: the input is this rank's block of the output */
            ms_tensor *block = NULL;
            EXPECT_STATUS(MS_OK, ms_tensor_view(&block, out, 1, &count, NULL, rank * count));
            if (out->numel > 0)
                memset(ms_tensor_data(out), 0, ms_tensor_nbytes(out));
            fill_pattern(block, rank, 0);
            EXPECT_STATUS(MS_OK, ms_dist_all_gather_into_tensor(g, out, block));
            EXPECT(count_wrong(ms_tensor_data(out), dtypes[d], out->numel, 0, gathered_at,
                               &expect) == 0);
            ms_tensor_free(block);
            case_tensor_free(in);
            case_tensor_free(out);
        }
}

/* Rank r's input holds blocks pattern(r, block * count + i); block b reduces on rank b. */
static inline void reduce_scatter_cases(ms_group *g, int rank, int n)
{
    for (int d = 0; d < NDTYPES; d++)
        for (int s = 0; s < NSIZES && sizes[s] <= size_limit(dtypes[d]); s++)
            for (int op = MS_DIST_SUM; op <= MS_DIST_MIN; op++) {
                int64_t count = sizes[s];
                ms_tensor *in = case_tensor(dtypes[d], count * n);
                ms_tensor *out = case_tensor(dtypes[d], count);
                fill_pattern(in, rank, 0);
                if (refused_average(dtypes[d], op)) {
                    EXPECT_STATUS(MS_ERR_DTYPE, ms_dist_reduce_scatter_tensor(g, out, in, op));
                    case_tensor_free(in);
                    case_tensor_free(out);
                    continue;
                }
                EXPECT_STATUS(MS_OK, ms_dist_reduce_scatter_tensor(g, out, in, op));
                reduction r = {dtypes[d], op, n};
                EXPECT(count_wrong(ms_tensor_data(out), dtypes[d], count, rank * count,
                                   reduction_at, &r) == 0);
                /* in place: the output is this rank's block of the input */
                ms_tensor *block = NULL;
                EXPECT_STATUS(MS_OK, ms_tensor_view(&block, in, 1, &count, NULL, rank * count));
                EXPECT_STATUS(MS_OK, ms_dist_reduce_scatter_tensor(g, block, in, op));
                EXPECT(count_wrong(ms_tensor_data(block), dtypes[d], count, rank * count,
                                   reduction_at, &r) == 0);
                ms_tensor_free(block);
                case_tensor_free(in);
                case_tensor_free(out);
            }
}

static inline void broadcast_cases(ms_group *g, int rank, int n)
{
    for (int d = 0; d < NDTYPES; d++)
        for (int s = 0; s < NSIZES && sizes[s] <= size_limit(dtypes[d]); s++)
            for (int root = 0; root < n; root++) {
                ms_tensor *t = case_tensor(dtypes[d], sizes[s]);
                fill_pattern(t, rank, 0);
                EXPECT_STATUS(MS_OK, ms_dist_broadcast(g, t, root));
                EXPECT(count_wrong(ms_tensor_data(t), dtypes[d], t->numel, 0, root_pattern,
                                   &root) == 0);
                case_tensor_free(t);
            }
}

/* Every case on g (NULL: the world), as one of its members. */
static inline void collective_cases(ms_group *g)
{
    ms_group *resolved = g;
    if (!resolved)
        EXPECT_STATUS(MS_OK, ms_dist_world(&resolved));
    int rank = ms_group_rank(resolved), n = ms_group_size(resolved);
    all_reduce_cases(g, rank, n);
    all_gather_cases(g, rank, n);
    reduce_scatter_cases(g, rank, n);
    broadcast_cases(g, rank, n);
    EXPECT_STATUS(MS_OK, ms_dist_barrier(g));
}

/* The last member of g calls something else than the others, case after case; every
 * member fails with MS_ERR_MISMATCH and the group stays in step. */
static inline void mismatch_cases(ms_group *g)
{
    ms_group *resolved = g;
    if (!resolved)
        EXPECT_STATUS(MS_OK, ms_dist_world(&resolved));
    int rank = ms_group_rank(resolved), n = ms_group_size(resolved);
    int odd = rank == n - 1;
    ms_tensor *small = new_tensor(MS_F32, 100), *other = new_tensor(MS_F32, 101);
    ms_tensor *wide = new_tensor(MS_F64, 100), *big = new_tensor(MS_F32, 300000);
    ms_tensor *gathered = new_tensor(MS_F32, 100 * n);
    EXPECT_STATUS(MS_ERR_MISMATCH, ms_dist_all_reduce(g, odd ? other : small, MS_DIST_SUM));
    EXPECT(strstr(ms_last_error(), "all_reduce(f32, 101 elements, sum)") != NULL);
    EXPECT_STATUS(MS_ERR_MISMATCH, ms_dist_all_reduce(g, odd ? wide : small, MS_DIST_SUM));
    EXPECT_STATUS(MS_ERR_MISMATCH, ms_dist_all_reduce(g, small, odd ? MS_DIST_MAX : MS_DIST_SUM));
    EXPECT_STATUS(MS_ERR_MISMATCH, ms_dist_all_reduce(g, odd ? big : small, MS_DIST_SUM));
    EXPECT_STATUS(MS_ERR_MISMATCH, ms_dist_broadcast(g, small, odd ? 1 : 0));
    int status = odd ? ms_dist_all_gather_into_tensor(g, gathered, small)
                     : ms_dist_all_reduce(g, small, MS_DIST_SUM);
    EXPECT_STATUS(MS_ERR_MISMATCH, status);
    EXPECT(strstr(ms_last_error(), "all_gather_into_tensor") != NULL);
    EXPECT_STATUS(MS_ERR_MISMATCH, odd ? ms_dist_barrier(g) : ms_dist_broadcast(g, big, 0));
    for (int64_t i = 0; i < small->numel; i++)
        ((float *)ms_tensor_data(small))[i] = (float)(rank + 1);
    EXPECT_STATUS(MS_OK, ms_dist_all_reduce(g, small, MS_DIST_SUM));
    EXPECT(((float *)ms_tensor_data(small))[99] == (float)(n * (n + 1) / 2));
    EXPECT_STATUS(MS_OK, ms_dist_all_gather_into_tensor(g, gathered, small));
    ms_tensor_free(small);
    ms_tensor_free(other);
    ms_tensor_free(wide);
    ms_tensor_free(big);
    ms_tensor_free(gathered);
}

#endif
