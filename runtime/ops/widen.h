/* moonshard runtime: bf16 and f16 operands of a compute op, widened to f32 copies in their
 * own pool so the place's f32 kernel computes them; outputs are rounded once on the way back. */
#ifndef MS_OPS_WIDEN_H
#define MS_OPS_WIDEN_H

#include "checks.h"

#pragma GCC visibility push(hidden)

enum { MS_WIDEN_MAX = 10 };

/* 1 for the 16-bit float dtypes (bf16, f16). */
static inline int ms_is_half(int dtype) { return dtype == MS_BF16 || dtype == MS_F16; }

/* The widened operands of one call, written back and freed by ms_widen_done. */
typedef struct ms_widened {
    int count;
    struct {
        ms_tensor *narrow, *wide;
        int write_back;
    } items[MS_WIDEN_MAX];
} ms_widened;

/* For each of the count operands in[i] (NULL allowed), [OUT] out[i]: in[i] itself when it is
 * not 16-bit or when place's backend takes 16-bit for the op's family (family, an MS_HALF_*
 * bit of backend.h); else a contiguous f32 tensor of its shape in its pool. modes[i] says how
 * the op uses it: 'r' read (the copy holds its values), 'w' written (ms_widen_done copies the
 * result back, rounding to nearest even), 'b' both. */
int ms_widen_each(ms_widened *w, const ms_place *place, unsigned family, int count,
                  const ms_tensor *const *in, const char *modes, ms_tensor **out);
/* When status is MS_OK, write each widened output back into its tensor; free every widened
 * tensor. Returns status, or the first failure of a write-back. */
int ms_widen_done(ms_widened *w, const ms_place *place, int status);

#pragma GCC visibility pop

#endif
