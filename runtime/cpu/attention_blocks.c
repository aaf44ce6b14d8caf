/* moonshard CPU backend: f32 attention in blocks of query rows, one head per pool range at a
 * time. A block's scores come from one GEMM (scale Q K^T over the keys any of its rows sees),
 * its softmax from kernels/attention.h, its output from a second GEMM (P V) straight into out;
 * the backward recomputes the block's probabilities from lse and runs four more GEMMs. A block
 * holds at most BLOCK_SCORES scores, so no [L, S] matrix is made for long sequences. A head's
 * work runs on one thread in a fixed order, so results do not depend on the thread count. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>

#include "attention.h"
#include "cpu.h"

/* Scores per block (rows x keys): 64 Ki f32 = 256 KiB per buffer, an L2's worth. */
enum { BLOCK_SCORES = 65536, MIN_BLOCK_ROWS = 16 };

/* One operand: element (lead0, lead1, row, col) at data + b0 * s[0] + b1 * s[1] + row * s[2]
 * + col (a unit last stride, checked by the op layer); lse and delta have no col. */
typedef struct operand {
    float *data;
    int64_t s[3];
} operand;

typedef struct attention_job {
    int64_t lead1, rows, keys, d, dv, block_rows;
    float scale;
    int causal;
    operand q, k, v, out, lse, mask, dout, dq, dk, dv_, delta;
    int64_t mask_col;
    _Atomic int status;  /* the first failure, MS_OK if none */
    char message[256];   /* its error message, from the thread that failed */
} attention_job;

static operand operand_of(const ms_tensor *t, int with_col)
{
    operand o = {t ? (float *)ms_tensor_data(t) : NULL, {0, 0, 0}};
    if (!t)
        return o;
    int lead = t->ndim - (with_col ? 2 : 1); /* dims before row */
    for (int d = 0; d <= lead && d < t->ndim; d++)
        o.s[2 - lead + d] = t->strides[d];
    return o;
}

static float *at(const operand *o, int64_t head, int64_t lead1, int64_t row)
{
    return o->data + (head / lead1) * o->s[0] + (head % lead1) * o->s[1] + row * o->s[2];
}

static int64_t block_rows_of(int64_t rows, int64_t keys)
{
    int64_t block = BLOCK_SCORES / (keys > 0 ? keys : 1);
    if (block < MIN_BLOCK_ROWS)
        block = MIN_BLOCK_ROWS;
    return block < rows ? block : rows;
}

/* The keys a block of rows [i0, i0 + count) needs: all, or with causal up to its last row. */
static int64_t block_keys(const attention_job *j, int64_t i0, int64_t count)
{
    return j->causal && i0 + count < j->keys ? i0 + count : j->keys;
}

static int64_t row_keys(const attention_job *j, int64_t i)
{
    return j->causal && i + 1 < j->keys ? i + 1 : j->keys;
}

/* Keeps the first failure; its message is in the failing (maybe worker) thread's error. */
static void fail_job(attention_job *j, int status)
{
    int none = MS_OK;
    if (atomic_compare_exchange_strong(&j->status, &none, status))
        snprintf(j->message, sizeof j->message, "%s", ms_last_error());
}

/* The job's status, its failure recorded again in the calling thread. */
static int job_status(attention_job *j)
{
    int status = atomic_load(&j->status);
    return status == MS_OK ? MS_OK : MS_FAIL(status, "%s", j->message);
}

/* scores[count x n] = scale * Q[i0 .. i0 + count) K[0 .. n)^T */
static int block_scores(const attention_job *j, int64_t head, int64_t i0, int64_t count,
                        int64_t n, float *scores)
{
    return ms_cpu_sgemm_serial(0, 1, count, n, j->d, j->scale, at(&j->q, head, j->lead1, i0),
                               j->q.s[2], at(&j->k, head, j->lead1, 0), j->k.s[2], 0.0f,
                               scores, n);
}

static const float *mask_row(const attention_job *j, int64_t head, int64_t i)
{
    return j->mask.data ? at(&j->mask, head, j->lead1, i) : NULL;
}

static void forward_heads(void *ctx, int64_t begin, int64_t end)
{
    attention_job *j = ctx;
    float *scores = NULL;
    int status = ms_cpu_scratch("attention", MS_SCRATCH_ATTENTION,
                                (size_t)(j->block_rows * j->keys) * sizeof(float),
                                (void **)&scores);
    for (int64_t head = begin; head < end && status == MS_OK; head++)
        for (int64_t i0 = 0; i0 < j->rows && status == MS_OK; i0 += j->block_rows) {
            int64_t count = j->rows - i0 < j->block_rows ? j->rows - i0 : j->block_rows;
            int64_t n = block_keys(j, i0, count);
            status = block_scores(j, head, i0, count, n, scores);
            for (int64_t r = 0; r < count && status == MS_OK; r++)
                ms_k_attn_probs_row_f32(scores + r * n, row_keys(j, i0 + r), n,
                                        mask_row(j, head, i0 + r), j->mask_col,
                                        at(&j->lse, head, j->lead1, i0 + r));
            if (status == MS_OK)
                status = ms_cpu_sgemm_serial(0, 0, count, j->dv, n, 1.0f, scores, n,
                                             at(&j->v, head, j->lead1, 0), j->v.s[2], 0.0f,
                                             at(&j->out, head, j->lead1, i0), j->out.s[2]);
        }
    if (status != MS_OK)
        fail_job(j, status);
}

static void zero_rows(float *data, int64_t rows, int64_t row_stride, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            data[r * row_stride + c] = 0.0f;
}

static void backward_heads(void *ctx, int64_t begin, int64_t end)
{
    attention_job *j = ctx;
    size_t block = (size_t)(j->block_rows * j->keys);
    float *probs = NULL;
    int status = ms_cpu_scratch("attention_backward", MS_SCRATCH_ATTENTION,
                                2 * block * sizeof(float), (void **)&probs);
    float *dscores = probs + block;
    for (int64_t head = begin; head < end && status == MS_OK; head++) {
        float *dk = at(&j->dk, head, j->lead1, 0), *dv = at(&j->dv_, head, j->lead1, 0);
        zero_rows(dk, j->keys, j->dk.s[2], j->d);
        zero_rows(dv, j->keys, j->dv_.s[2], j->dv);
        for (int64_t i0 = 0; i0 < j->rows && status == MS_OK; i0 += j->block_rows) {
            int64_t count = j->rows - i0 < j->block_rows ? j->rows - i0 : j->block_rows;
            int64_t n = block_keys(j, i0, count);
            const float *dout = at(&j->dout, head, j->lead1, i0);
            const float *q = at(&j->q, head, j->lead1, i0);
            status = block_scores(j, head, i0, count, n, probs);
            if (status == MS_OK) /* dP = dOut V^T */
                status = ms_cpu_sgemm_serial(0, 1, count, n, j->dv, 1.0f, dout,
                                             j->dout.s[2], at(&j->v, head, j->lead1, 0),
                                             j->v.s[2], 0.0f, dscores, n);
            for (int64_t r = 0; r < count && status == MS_OK; r++) {
                int64_t i = i0 + r;
                float delta = ms_k_attn_dot_f32(at(&j->dout, head, j->lead1, i),
                                                at(&j->out, head, j->lead1, i), j->dv);
                ms_k_attn_dscores_row_f32(probs + r * n, dscores + r * n, row_keys(j, i), n,
                                          mask_row(j, head, i), j->mask_col,
                                          *at(&j->lse, head, j->lead1, i), delta, j->scale);
            }
            if (status == MS_OK) /* dQ = dS K */
                status = ms_cpu_sgemm_serial(0, 0, count, j->d, n, 1.0f, dscores, n,
                                             at(&j->k, head, j->lead1, 0), j->k.s[2], 0.0f,
                                             at(&j->dq, head, j->lead1, i0), j->dq.s[2]);
            if (status == MS_OK) /* dK += dS^T Q */
                status = ms_cpu_sgemm_serial(1, 0, n, j->d, count, 1.0f, dscores, n, q,
                                             j->q.s[2], 1.0f, dk, j->dk.s[2]);
            if (status == MS_OK) /* dV += P^T dOut */
                status = ms_cpu_sgemm_serial(1, 0, n, j->dv, count, 1.0f, probs, n, dout,
                                             j->dout.s[2], 1.0f, dv, j->dv_.s[2]);
        }
    }
    if (status != MS_OK)
        fail_job(j, status);
}

static void job_of(attention_job *job, const ms_tensor *q, const ms_tensor *k,
                   const ms_tensor *v, const ms_tensor *mask, const ms_tensor *out,
                   const ms_tensor *lse, double scale, int causal)
{
    int n = q->ndim;
    attention_job j = {0};
    j.lead1 = n >= 3 ? q->shape[n - 3] : 1;
    j.rows = q->shape[n - 2];
    j.keys = k->shape[n - 2];
    j.d = q->shape[n - 1];
    j.dv = v->shape[n - 1];
    j.block_rows = block_rows_of(j.rows, j.keys);
    j.scale = (float)scale;
    j.causal = causal;
    j.q = operand_of(q, 1);
    j.k = operand_of(k, 1);
    j.v = operand_of(v, 1);
    j.out = operand_of(out, 1);
    j.lse = operand_of(lse, 0);
    j.mask = operand_of(mask, 1);
    j.mask_col = mask ? mask->strides[n - 1] : 0;
    *job = j;
    atomic_store(&job->status, MS_OK);
}

static int64_t heads_of(const ms_tensor *q)
{
    int64_t heads = 1;
    for (int d = 0; d < q->ndim - 2; d++)
        heads *= q->shape[d];
    return heads;
}

int ms_cpu_attention_blocks(ms_tensor *out, ms_tensor *lse, const ms_tensor *q,
                            const ms_tensor *k, const ms_tensor *v, const ms_tensor *mask,
                            double scale, int causal)
{
    attention_job j;
    job_of(&j, q, k, v, mask, out, lse, scale, causal);
    int64_t heads = heads_of(q);
    double work = (double)heads * (double)j.rows * (double)j.keys * (double)(j.d + j.dv);
    ms_parallel_for_signals_held(heads, ms_parallel_ranges(heads, work), forward_heads, &j);
    return job_status(&j);
}

int ms_cpu_attention_blocks_backward(ms_tensor *dq, ms_tensor *dk, ms_tensor *dv,
                                     const ms_tensor *dout, const ms_tensor *q,
                                     const ms_tensor *k, const ms_tensor *v,
                                     const ms_tensor *mask, const ms_tensor *out,
                                     const ms_tensor *lse, double scale, int causal)
{
    attention_job j;
    job_of(&j, q, k, v, mask, out, lse, scale, causal);
    j.dout = operand_of(dout, 1);
    j.dq = operand_of(dq, 1);
    j.dk = operand_of(dk, 1);
    j.dv_ = operand_of(dv, 1);
    int64_t heads = heads_of(q);
    double work = 3.0 * (double)heads * (double)j.rows * (double)j.keys * (double)(j.d + j.dv);
    ms_parallel_for_signals_held(heads, ms_parallel_ranges(heads, work), backward_heads, &j);
    return job_status(&j);
}
