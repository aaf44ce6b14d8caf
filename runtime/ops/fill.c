/* moonshard runtime: ms_fill, ms_arange and ms_tensor_zeros (a new tensor filled with 0);
 * every element is assigned, in any dtype. */
#include <string.h>

#include "checks.h"

int ms_fill(ms_tensor *t, double value)
{
    ms_place place = ms_place_of(t);
    MS_CHECK(ms_check_output(&place, "fill", "t", t));
    return place.backend->fill(t, value);
}

int ms_arange(ms_tensor *t, double start, double step)
{
    ms_place place = ms_place_of(t);
    MS_CHECK(ms_check_output(&place, "arange", "t", t));
    return place.backend->arange(t, start, step);
}

int ms_tensor_zeros(ms_tensor **out, int dtype, int ndim, const int64_t *shape, int pool)
{
    MS_CHECK(ms_tensor_new(out, dtype, ndim, shape, pool));
    if ((*out)->storage->nbytes && pool < MS_POOL_CUDA0)
        memset((*out)->storage->data, 0, (*out)->storage->nbytes);
    else if ((*out)->storage->nbytes)
        return ms_fill(*out, 0.0);
    return MS_OK;
}
