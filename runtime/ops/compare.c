/* moonshard runtime: ms_equal (shapes, dtypes and every bit) and ms_allclose (any dtype
 * pair, within tolerances). */
#include "checks.h"

int ms_equal(int *equal, const ms_tensor *a, const ms_tensor *b)
{
    if (!equal)
        return MS_FAIL(MS_ERR_INVALID, "equal: the result pointer must not be NULL");
    *equal = 0;
    ms_place place = ms_place_of(a);
    MS_CHECK(ms_check_input(&place, "equal", "a", a));
    MS_CHECK(ms_check_input(&place, "equal", "b", b));
    if (a->dtype != b->dtype || !ms_shapes_match(a, b))
        return MS_OK;
    return place.backend->equal(equal, a, b);
}

int ms_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol, double atol)
{
    if (!close)
        return MS_FAIL(MS_ERR_INVALID, "allclose: the result pointer must not be NULL");
    *close = 0;
    ms_place place = ms_place_of(a);
    MS_CHECK(ms_check_input(&place, "allclose", "a", a));
    MS_CHECK(ms_check_input(&place, "allclose", "b", b));
    if (!(rtol >= 0.0) || !(atol >= 0.0))
        return MS_FAIL(MS_ERR_INVALID, "allclose: rtol %g and atol %g must be >= 0", rtol,
                       atol);
    if (!ms_shapes_match(a, b))
        return MS_OK;
    return place.backend->allclose(close, a, b, rtol, atol);
}
