/* moonshard runtime: the op profiler's counters (not part of the FFI): self nanoseconds and
 * calls per category, charged by the op front door and the allocator while profiling is on. */
#ifndef MS_PROFILE_H
#define MS_PROFILE_H

#include <stdint.h>

#include "ops.h"

#pragma GCC visibility push(hidden)

/* Non-zero while ms_profile_enable(1) is in force: the one branch an op pays when off. */
extern int ms_profile_on;

/* One timed region: self time is its elapsed time less the regions timed inside it. */
typedef struct ms_profile_frame {
    uint64_t start;
    uint64_t outer_child;
} ms_profile_frame;

void ms_profile_begin(ms_profile_frame *frame);
/* Charge the frame's self time to category (or to the scope set by ms_profile_scope). */
void ms_profile_end(ms_profile_frame *frame, int category);

#pragma GCC visibility pop

#endif
