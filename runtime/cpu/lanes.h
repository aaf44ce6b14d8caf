/* moonshard CPU backend: MS_LANES elements as one value, through GCC/Clang vector extensions
 * (the target's widest registers, or scalar code where it has none; no instruction set is
 * assumed). Sums kept in lanes add element j to lane j % MS_LANES, in order, and end with
 * ms_lanes_total's fixed pairwise order. */
#ifndef MS_CPU_LANES_H
#define MS_CPU_LANES_H

#include <string.h>

enum { MS_LANES = 8 };

typedef float ms_lanes_f32 __attribute__((vector_size(MS_LANES * sizeof(float))));
typedef double ms_lanes_f64 __attribute__((vector_size(MS_LANES * sizeof(double))));

/* The pairwise total of the lanes: (0+4 + 2+6) + (1+5 + 3+7). */
static inline double ms_lanes_total(double lanes[MS_LANES])
{
    for (int width = MS_LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++)
            lanes[l] += lanes[l + width];
    return lanes[0];
}

/* MS_LANES elements from p (any alignment), stored back, and widened to double. */
#define MS_LANE_LOADS(SUF, T, VT)                                                         \
    static inline VT ms_lanes_load_##SUF(const T *p)                                      \
    {                                                                                     \
        VT v;                                                                             \
        memcpy(&v, p, sizeof v);                                                          \
        return v;                                                                         \
    }                                                                                     \
    static inline void ms_lanes_store_##SUF(T *p, VT v) { memcpy(p, &v, sizeof v); }      \
    static inline ms_lanes_f64 ms_lanes_wide_##SUF(VT v)                                  \
    {                                                                                     \
        return __builtin_convertvector(v, ms_lanes_f64);                                  \
    }

MS_LANE_LOADS(f32, float, ms_lanes_f32)
MS_LANE_LOADS(f64, double, ms_lanes_f64)

#endif
