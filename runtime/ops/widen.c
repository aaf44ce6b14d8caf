/* moonshard runtime: f32 copies of bf16 and f16 operands for the kernels that take only f32:
 * the math runs in f32 (sums in f64 where the kernel keeps them) and each output is rounded
 * once, when it is stored back. */
#include "widen.h"

static int widen(ms_widened *w, const ms_place *place, const ms_tensor *t, int copy_in,
                 int write_back, ms_tensor **out)
{
    *out = (ms_tensor *)t;
    if (!t || !ms_is_half(t->dtype))
        return MS_OK;
    if (w->count == MS_WIDEN_MAX)
        return MS_FAIL(MS_ERR_INVALID, "widen: more than %d 16-bit operands", MS_WIDEN_MAX);
    ms_tensor *wide = NULL;
    MS_CHECK(ms_tensor_new(&wide, MS_F32, t->ndim, t->shape, t->storage->pool));
    int status = place->backend->await ? place->backend->await(wide) : MS_OK;
    if (status == MS_OK && copy_in)
        status = place->backend->copy(wide, t);
    if (status != MS_OK) {
        ms_tensor_free(wide);
        return status;
    }
    w->items[w->count].narrow = (ms_tensor *)t;
    w->items[w->count].wide = wide;
    w->items[w->count].write_back = write_back;
    w->count++;
    *out = wide;
    return MS_OK;
}

int ms_widen_each(ms_widened *w, const ms_place *place, unsigned family, int count,
                  const ms_tensor *const *in, const char *modes, ms_tensor **out)
{
    if (place->backend->half_native & family) {
        for (int i = 0; i < count; i++)
            out[i] = (ms_tensor *)in[i];
        return MS_OK;
    }
    for (int i = 0; i < count; i++) {
        int status = widen(w, place, in[i], modes[i] != 'w', modes[i] != 'r', &out[i]);
        if (status != MS_OK)
            return ms_widen_done(w, place, status);
    }
    return MS_OK;
}

int ms_widen_done(ms_widened *w, const ms_place *place, int status)
{
    for (int i = 0; i < w->count; i++) {
        if (status == MS_OK && w->items[i].write_back)
            status = place->backend->copy(w->items[i].narrow, w->items[i].wide);
        ms_tensor_free(w->items[i].wide);
    }
    w->count = 0;
    return status;
}
