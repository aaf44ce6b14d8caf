/* moonshard runtime: the op profiler's counters and switch (ms_profile_*): self time and calls
 * per category, kept in atomics so ops on any thread may charge them. */
#include <stdatomic.h>
#include <time.h>

#include "internal.h"
#include "profile.h"

int ms_profile_on;
static int scope = -1;
static _Atomic uint64_t self_ns[MS_PROF_CATEGORIES];
static _Atomic uint64_t calls[MS_PROF_CATEGORIES];
static _Thread_local uint64_t child_ns; /* time of the regions closed inside the open one */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void ms_profile_begin(ms_profile_frame *frame)
{
    frame->outer_child = child_ns;
    child_ns = 0;
    frame->start = now_ns();
}

void ms_profile_end(ms_profile_frame *frame, int category)
{
    uint64_t elapsed = now_ns() - frame->start;
    int charged = scope >= 0 && category != MS_PROF_ALLOCATOR ? scope : category;
    atomic_fetch_add_explicit(&self_ns[charged], elapsed - (child_ns < elapsed ? child_ns : elapsed),
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&calls[charged], 1, memory_order_relaxed);
    child_ns = frame->outer_child + elapsed;
}

int ms_profile_enable(int on)
{
    if (on) {
        for (int c = 0; c < MS_PROF_CATEGORIES; c++) {
            atomic_store(&self_ns[c], 0);
            atomic_store(&calls[c], 0);
        }
        scope = -1;
    }
    ms_profile_on = on != 0;
    return MS_OK;
}

int ms_profile_scope(int category)
{
    int previous = scope;
    scope = category >= 0 && category < MS_PROF_CATEGORIES ? category : -1;
    return previous;
}

int ms_profile_read(uint64_t *ns, uint64_t *count, int n)
{
    if (!ns || !count || n < 0)
        return MS_FAIL(MS_ERR_INVALID, "profile_read: ns and count must not be NULL, n >= 0");
    for (int c = 0; c < n && c < MS_PROF_CATEGORIES; c++) {
        ns[c] = atomic_load_explicit(&self_ns[c], memory_order_relaxed);
        count[c] = atomic_load_explicit(&calls[c], memory_order_relaxed);
    }
    return MS_OK;
}
