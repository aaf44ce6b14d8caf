/* moonshard kernels: attention a query row (or a key row) at a time, shared by the CPU loops
 * and the CUDA threads: softmax(scale q k^T + mask) v with a running max and sum over tiles of
 * keys, never holding a row of scores longer than one tile, and its backward. The *_probs_row
 * and *_dscores_row functions are the element math of attention in blocks of query rows,
 * whose scores and products come from GEMMs. */
#ifndef MS_KERNELS_ATTENTION_H
#define MS_KERNELS_ATTENTION_H

#include "common.h"
#include "fastmath.h"

#define MS_K_ATTN_TILE 32

#define MS_K_ATTN_LANES 8

/* One row's operands: q (or dout) rows are contiguous vectors; k and v rows are row_stride
 * apart; mask (NULL: none) holds the row's additive mask, mask_col apart per key. */
#define MS_K_ATTENTION(SUFFIX, T, EXP, LOG)                                                 \
    /* a . b in MS_K_ATTN_LANES partial sums (so the loop vectorises without reassociating    \
     * one sum), added pairwise at the end. */                                              \
    MS_HD T ms_k_attn_dot_##SUFFIX(const T *a, const T *b, int64_t n)                       \
    {                                                                                       \
        T lane[MS_K_ATTN_LANES] = {0};                                                      \
        int64_t c = 0;                                                                      \
        for (; c + MS_K_ATTN_LANES <= n; c += MS_K_ATTN_LANES)                              \
            for (int l = 0; l < MS_K_ATTN_LANES; l++)                                       \
                lane[l] += a[c + l] * b[c + l];                                             \
        for (int l = 0; c < n; c++, l++)                                                    \
            lane[l] += a[c] * b[c];                                                         \
        for (int width = MS_K_ATTN_LANES / 2; width > 0; width /= 2)                        \
            for (int l = 0; l < width; l++)                                                 \
                lane[l] += lane[l + width];                                                 \
        return lane[0];                                                                     \
    }                                                                                       \
                                                                                            \
    /* out[0..dv) = softmax over keys 0..keys) of scale q.k_j + mask_j, times v_j;         \
     * *lse = the row's log-sum-exp of the scores. */                                      \
    MS_HD void ms_k_attn_row_##SUFFIX(const T *q, const T *k, int64_t k_row, const T *v,   \
                                      int64_t v_row, const T *mask, int64_t mask_col,       \
                                      int64_t keys, int64_t d, int64_t dv, T scale, T *out, \
                                      T *lse)                                               \
    {                                                                                       \
        T scores[MS_K_ATTN_TILE];                                                           \
        T max = -INFINITY, sum = 0;                                                         \
        for (int64_t c = 0; c < dv; c++)                                                    \
            out[c] = 0;                                                                     \
        for (int64_t start = 0; start < keys; start += MS_K_ATTN_TILE) {                    \
            int64_t n = keys - start < MS_K_ATTN_TILE ? keys - start : MS_K_ATTN_TILE;      \
            T tile_max = -INFINITY;                                                         \
            for (int64_t j = 0; j < n; j++) {                                               \
                T s = ms_k_attn_dot_##SUFFIX(q, k + (start + j) * k_row, d) * scale;        \
                if (mask)                                                                   \
                    s += mask[(start + j) * mask_col];                                      \
                scores[j] = s;                                                              \
                if (s > tile_max || s != s)                                                 \
                    tile_max = s;                                                           \
            }                                                                               \
            T new_max = tile_max > max || tile_max != tile_max ? tile_max : max;            \
            if (new_max == -INFINITY)                                                       \
                continue; /* every key so far masked out */                                 \
            T rescale = EXP(max - new_max);                                                 \
            sum *= rescale;                                                                 \
            for (int64_t c = 0; c < dv; c++)                                                \
                out[c] *= rescale;                                                          \
            for (int64_t j = 0; j < n; j++) {                                               \
                T p = EXP(scores[j] - new_max);                                             \
                const T *vj = v + (start + j) * v_row;                                      \
                sum += p;                                                                   \
                for (int64_t c = 0; c < dv; c++)                                            \
                    out[c] += p * vj[c];                                                    \
            }                                                                               \
            max = new_max;                                                                  \
        }                                                                                   \
        /* a row with every key masked gives 0 (sum is 0 and out untouched), as PyTorch's   \
         * attention; its lse is -inf */                                                    \
        T inverse = max == -INFINITY ? (T)0 : (T)1 / sum;                                   \
        for (int64_t c = 0; c < dv; c++)                                                    \
            out[c] *= inverse;                                                              \
        *lse = max + LOG(sum);                                                              \
    }                                                                                       \
                                                                                            \
    /* The probability of key kj for a query row q with log-sum-exp lse (0 in a row whose  \
     * keys are all masked: lse -inf). */                                                  \
    MS_HD T ms_k_attn_p_##SUFFIX(const T *q, const T *kj, T mask, int64_t d, T scale,       \
                                 T lse)                                                     \
    {                                                                                       \
        if (lse == -INFINITY)                                                               \
            return 0;                                                                       \
        return EXP(ms_k_attn_dot_##SUFFIX(q, kj, d) * scale + mask - lse);                  \
    }                                                                                       \
                                                                                            \
    /* dq of one query row: sum over keys of scale p (dout.v_j - delta) k_j, where delta =  \
     * dout.out of the row. */                                                              \
    MS_HD void ms_k_attn_dq_row_##SUFFIX(const T *q, const T *dout, T delta, T lse,         \
                                         const T *k, int64_t k_row, const T *v,             \
                                         int64_t v_row, const T *mask, int64_t mask_col,    \
                                         int64_t keys, int64_t d, int64_t dv, T scale,      \
                                         T *dq)                                             \
    {                                                                                       \
        for (int64_t c = 0; c < d; c++)                                                     \
            dq[c] = 0;                                                                      \
        for (int64_t j = 0; j < keys; j++) {                                                \
            const T *kj = k + j * k_row;                                                    \
            T p = ms_k_attn_p_##SUFFIX(q, kj, mask ? mask[j * mask_col] : (T)0, d, scale,   \
                                       lse);                                                \
            T ds = p * (ms_k_attn_dot_##SUFFIX(dout, v + j * v_row, dv) - delta) * scale;   \
            for (int64_t c = 0; c < d; c++)                                                 \
                dq[c] += ds * kj[c];                                                        \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    /* dk and dv of key row kj over the query rows first..rows): dv = sum p dout_i, dk =    \
     * sum scale p (dout_i.v_j - delta_i) q_i. Query row i is q + i q_row (dout alike),     \
     * its mask entry mask[i * mask_row]. */                                                \
    MS_HD void ms_k_attn_dkv_row_##SUFFIX(const T *kj, const T *vj, const T *q,             \
                                          int64_t q_row, const T *dout, int64_t dout_row,   \
                                          const T *delta, const T *lse, const T *mask,      \
                                          int64_t mask_row, int64_t first, int64_t rows,    \
                                          int64_t d, int64_t dv, T scale, T *dk, T *dvj)    \
    {                                                                                       \
        for (int64_t c = 0; c < d; c++)                                                     \
            dk[c] = 0;                                                                      \
        for (int64_t c = 0; c < dv; c++)                                                    \
            dvj[c] = 0;                                                                     \
        for (int64_t i = first; i < rows; i++) {                                            \
            const T *qi = q + i * q_row, *gi = dout + i * dout_row;                         \
            T p = ms_k_attn_p_##SUFFIX(qi, kj, mask ? mask[i * mask_row] : (T)0, d, scale,  \
                                       lse[i]);                                             \
            for (int64_t c = 0; c < dv; c++)                                                \
                dvj[c] += p * gi[c];                                                        \
            T ds = p * (ms_k_attn_dot_##SUFFIX(gi, vj, dv) - delta[i]) * scale;             \
            for (int64_t c = 0; c < d; c++)                                                 \
                dk[c] += ds * qi[c];                                                        \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    /* One query row of a block: s[0..n) holds scale q.k_j on entry; keys from visible on    \
     * are masked (causal). On return s holds the probabilities softmax(s + mask) (0 past    \
     * visible, and everywhere when every key is masked, as PyTorch's attention) and *lse    \
     * their log-sum-exp (-inf when every key is masked). */                               \
    MS_HD void ms_k_attn_probs_row_##SUFFIX(T *s, int64_t visible, int64_t n, const T *mask, \
                                            int64_t mask_col, T *lse)                       \
    {                                                                                       \
        /* max and sum in MS_K_ATTN_LANES lanes (so the loops vectorise), combined at the    \
         * end in a fixed order; a NaN score makes the max NaN */                          \
        T lane_max[MS_K_ATTN_LANES], lane_sum[MS_K_ATTN_LANES];                             \
        int lane_nan[MS_K_ATTN_LANES];                                                      \
        for (int l = 0; l < MS_K_ATTN_LANES; l++) {                                         \
            lane_max[l] = -INFINITY;                                                        \
            lane_sum[l] = 0;                                                                \
            lane_nan[l] = 0;                                                                \
        }                                                                                   \
        if (mask)                                                                           \
            for (int64_t j = 0; j < visible; j++)                                           \
                s[j] += mask[j * mask_col];                                                 \
        int64_t whole = visible - visible % MS_K_ATTN_LANES;                                \
        for (int64_t j = 0; j < whole; j += MS_K_ATTN_LANES)                                \
            for (int l = 0; l < MS_K_ATTN_LANES; l++) {                                     \
                T x = s[j + l];                                                             \
                lane_max[l] = x > lane_max[l] ? x : lane_max[l];                            \
                lane_nan[l] |= x != x;                                                      \
            }                                                                               \
        for (int64_t j = whole; j < visible; j++) {                                         \
            T x = s[j];                                                                     \
            int l = (int)(j - whole);                                                       \
            lane_max[l] = x > lane_max[l] ? x : lane_max[l];                                \
            lane_nan[l] |= x != x;                                                          \
        }                                                                                   \
        T max = lane_max[0];                                                                \
        int nan = lane_nan[0];                                                              \
        for (int l = 1; l < MS_K_ATTN_LANES; l++) {                                         \
            max = lane_max[l] > max ? lane_max[l] : max;                                    \
            nan |= lane_nan[l];                                                             \
        }                                                                                   \
        if (nan)                                                                            \
            max = (T)NAN;                                                                   \
        if (max == -INFINITY) {                                                             \
            for (int64_t j = 0; j < n; j++)                                                 \
                s[j] = 0;                                                                   \
            *lse = -INFINITY;                                                               \
            return;                                                                         \
        }                                                                                   \
        for (int64_t j = 0; j < visible; j++)                                               \
            s[j] = EXP(s[j] - max);                                                         \
        for (int64_t j = 0; j < whole; j += MS_K_ATTN_LANES)                                \
            for (int l = 0; l < MS_K_ATTN_LANES; l++)                                       \
                lane_sum[l] += s[j + l];                                                    \
        for (int64_t j = whole; j < visible; j++)                                           \
            lane_sum[j - whole] += s[j];                                                    \
        for (int width = MS_K_ATTN_LANES / 2; width > 0; width /= 2)                        \
            for (int l = 0; l < width; l++)                                                 \
                lane_sum[l] += lane_sum[l + width];                                         \
        T inverse = (T)1 / lane_sum[0];                                                     \
        for (int64_t j = 0; j < visible; j++)                                               \
            s[j] *= inverse;                                                                \
        for (int64_t j = visible; j < n; j++)                                               \
            s[j] = 0;                                                                       \
        *lse = max + LOG(lane_sum[0]);                                                      \
    }                                                                                       \
                                                                                            \
    /* One query row of a block's backward: s[0..n) holds scale q.k_j and dp[0..n) dout.v_j \
     * on entry. On return s holds the probabilities p_j = exp(s_j + mask_j - lse) (0 from  \
     * visible on) and dp the scores' gradient scale p_j (dp_j - delta), delta = dout.out; \
     * both 0 in a row whose keys are all masked (lse -inf). */                            \
    MS_HD void ms_k_attn_dscores_row_##SUFFIX(T *s, T *dp, int64_t visible, int64_t n,      \
                                              const T *mask, int64_t mask_col, T lse,       \
                                              T delta, T scale)                             \
    {                                                                                       \
        if (lse == -INFINITY)                                                               \
            visible = 0;                                                                    \
        if (mask)                                                                           \
            for (int64_t j = 0; j < visible; j++)                                           \
                s[j] += mask[j * mask_col];                                                 \
        for (int64_t j = 0; j < visible; j++) {                                             \
            T p = EXP(s[j] - lse);                                                          \
            s[j] = p;                                                                       \
            dp[j] = p * (dp[j] - delta) * scale;                                            \
        }                                                                                   \
        for (int64_t j = visible; j < n; j++)                                               \
            s[j] = dp[j] = 0;                                                               \
    }

MS_K_ATTENTION(f32, float, ms_k_expf, logf)
MS_K_ATTENTION(f64, double, exp, log)

#endif
