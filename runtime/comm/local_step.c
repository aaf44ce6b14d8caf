/* moonshard runtime: the local backend's step protocol: futex waits with deadlines.
 * A waiter sleeps in slices, checking the parent's abort flag, the peer's departure and
 * interrupts (ms_interrupt_*, ms.h). One that gives up waiting for a peer's post refuses it,
 * so the late peer's collective fails as well instead of completing. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "local.h"

static int64_t monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* Shared (not private) futexes: the words live in a MAP_SHARED segment. */
static void futex_sleep(_Atomic uint32_t *word, uint32_t expected, int64_t ms)
{
    struct timespec span = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    syscall(SYS_futex, word, FUTEX_WAIT, expected, &span, NULL, 0);
}

void local_wake_all(local_counter *counter)
{
    syscall(SYS_futex, &counter->value, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static inline int reached(uint32_t value, uint32_t target)
{
    return (int32_t)(value - target) >= 0;
}

static uint32_t min_step(uint32_t a, uint32_t b) { return reached(a, b) ? b : a; }

/* Far enough ahead that no publish reaches it before a sleeper announces its own value. */
enum { WAKE_NONE = 1u << 30 };

/* A post counter whose member a peer gave up waiting for is moved this far back: no step
 * reaches it, and the member's next post (a compare-and-swap from the value it left) fails. */
enum { REFUSED = 1u << 30 };

/* 1 when value is further from target than members' progress can ever be apart: refused. */
static inline int refused(uint32_t value, uint32_t target)
{
    int32_t apart = (int32_t)(value - target);
    return apart < -(int32_t)(REFUSED / 2) || apart > (int32_t)(REFUSED / 2);
}

static void wake_sleepers(local_counter *counter, uint32_t value)
{
    if (atomic_load(&counter->sleepers) && reached(value, atomic_load(&counter->wake_at))) {
        /* Woken sleepers that still wait announce their value again. */
        atomic_store(&counter->wake_at, value + WAKE_NONE);
        local_wake_all(counter);
    }
}

static void publish(local_counter *counter, uint32_t value)
{
    atomic_store(&counter->value, value);
    wake_sleepers(counter, value);
}

/* publish for a member's own post counter: 0 (nothing published) once a peer refused it. */
static int publish_post(local_counter *counter, uint32_t value)
{
    uint32_t current = atomic_load(&counter->value);
    do {
        if (refused(current, value))
            return 0;
    } while (!atomic_compare_exchange_weak(&counter->value, &current, value));
    wake_sleepers(counter, value);
    return 1;
}

/* Lower counter's wake_at to want unless a sleeper waits for less. */
static void announce(local_counter *counter, uint32_t want)
{
    uint32_t current = atomic_load(&counter->wake_at);
    while ((int32_t)(want - current) < 0)
        if (atomic_compare_exchange_weak(&counter->wake_at, &current, want))
            return;
}

/* Why the segment failed, or 0: a rank ended without returning. */
static int check_abort(const char *name, local_segment *seg)
{
    int failed = atomic_load(&seg->abort_rank);
    if (failed < 0)
        return 0;
    return MS_FAIL(MS_ERR_PEER_DIED, "%s: rank %d %s", name, failed,
                   seg->departed[failed].reason);
}

static void sleep_ms(int64_t ms)
{
    struct timespec span = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&span, &span) != 0 && errno == EINTR) {
    }
}

/* The error of a member whose post a peer refused, or that waits for such a post: the peer
 * gave up on the collective, so it fails on every member. */
static int refused_error(ms_group *g, const char *name)
{
    local_failure *failure = ((local_group *)g->impl)->failure;
    /* the one that refused writes why right after */
    for (int i = 0; i < 100 && !atomic_load(&failure->ready); i++)
        sleep_ms(1);
    if (!atomic_load(&failure->ready))
        return MS_FAIL(MS_ERR_TIMEOUT, "%s: a member gave up on this collective, so it fails "
                                       "on every member", name);
    return MS_FAIL(failure->status, "%s: rank %d gave up on this collective, so it fails on "
                                    "every member (%s)", name, atomic_load(&failure->by) - 1,
                   failure->message);
}

/* This member stops waiting for counter, a peer's post counter, to reach target (status and
 * the last error say why): unless the post arrived meanwhile, the counter is moved back so
 * that the peer's post fails and so does every member's wait for it, and the first member to
 * give up records why. Returns MS_OK when a timeout finds the post arrived after all (an
 * interrupt was taken, so it fails either way); otherwise status, with the group broken. */
static int give_up(ms_group *g, local_counter *counter, uint32_t target, int status)
{
    local_failure *failure = ((local_group *)g->impl)->failure;
    uint32_t seen = atomic_load(&counter->value);
    while (!reached(seen, target) && !refused(seen, target)) {
        if (atomic_compare_exchange_weak(&counter->value, &seen, seen - REFUSED)) {
            int32_t none = 0;
            if (atomic_compare_exchange_strong(&failure->by, &none,
                                               g->world_ranks[g->rank] + 1)) {
                failure->status = status;
                snprintf(failure->message, sizeof failure->message, "%s", ms_last_error());
                atomic_store(&failure->ready, 1);
            }
            local_wake_all(counter);
            return ms_group_break(g, status);
        }
    }
    if (reached(seen, target) && status == MS_ERR_TIMEOUT)
        return MS_OK;
    return ms_group_break(g, status);
}

/* Wait until counter (member's) reaches target, asleep on its futex: ranks may outnumber
 * the cores, and a spinning waiter would take the time its peers need to arrive. Once it
 * must sleep, it sleeps until the counter reaches want (at or after target). A wait for a
 * peer's post (refuse_late) that times out or is interrupted refuses the late post. */
static int wait_counter(ms_group *g, const char *name, local_counter *counter,
                        uint32_t target, uint32_t want, int member, int refuse_late)
{
    local_group *lg = g->impl;
    local_segment *seg = lg->seg;
    if (reached(atomic_load(&counter->value), target))
        return MS_OK;
    int peer = g->world_ranks[member];
    int64_t deadline = monotonic_ms() + g->timeout_ms;
    for (;;) {
        if (refused(atomic_load(&counter->value), target))
            return ms_group_break(g, refused_error(g, name));
        int status = check_abort(name, seg);
        if (status)
            return ms_group_break(g, status);
        status = ms_interrupt_check(name, 1);
        if (status)
            return refuse_late ? give_up(g, counter, target, status) : ms_group_break(g, status);
        if (atomic_load(&seg->departed[peer].gone)) {
            if (reached(atomic_load(&counter->value), target))
                return MS_OK;
            return ms_group_break(g, MS_FAIL(MS_ERR_PEER_DIED, "%s: rank %d %s", name, peer,
                                             seg->departed[peer].reason));
        }
        int64_t left = deadline - monotonic_ms();
        if (left <= 0) {
            status = MS_FAIL(MS_ERR_TIMEOUT, "%s: rank %d did not arrive within %lld ms", name,
                             peer, (long long)g->timeout_ms);
            return refuse_late ? give_up(g, counter, target, status) : ms_group_break(g, status);
        }
        atomic_fetch_add(&counter->sleepers, 1);
        announce(counter, want);
        uint32_t seen = atomic_load(&counter->value);
        if (!reached(seen, want))
            futex_sleep(&counter->value, seen, left < LOCAL_WAIT_SLICE_MS ? left
                                                                          : LOCAL_WAIT_SLICE_MS);
        atomic_fetch_sub(&counter->sleepers, 1);
        if (reached(atomic_load(&counter->value), want))
            return MS_OK;
    }
}

int local_wait_free(ms_group *g, const local_call *call, uint32_t step)
{
    local_group *lg = g->impl;
    uint32_t target = step + 1 - LOCAL_RING_DEPTH;
    uint32_t consumed = atomic_load(&lg->members[g->rank].consumed.value);
    uint32_t want = reached(consumed, target) ? consumed : target;
    for (int m = 0; m < g->size; m++)
        MS_CHECK(wait_counter(g, call->name, &lg->members[m].consumed, target,
                              m == g->rank ? target : want, m, 0));
    return MS_OK;
}

int local_post(ms_group *g, const local_call *call, uint32_t step)
{
    local_group *lg = g->impl;
    local_step_header *header = (local_step_header *)(local_buffer(lg, g->rank, step) -
                                                      LOCAL_HEADER_BYTES);
    *header = call->header;
    header->step = step;
    if (!publish_post(&lg->members[g->rank].posted, step + 1))
        return ms_group_break(g, refused_error(g, call->name));
    return MS_OK;
}

static const char *kind_name(int kind)
{
    switch (kind) {
    case LOCAL_ALL_GATHER: return "all_gather_into_tensor";
    case LOCAL_REDUCE_SCATTER: return "reduce_scatter_tensor";
    case LOCAL_ALL_REDUCE: return "all_reduce";
    case LOCAL_BROADCAST: return "broadcast";
    case LOCAL_BARRIER: return "barrier";
    default: return "an unknown collective";
    }
}

/* "all_reduce(f32, 1024 elements, sum)" */
static const char *describe(char *buf, size_t size, const local_step_header *h)
{
    const char *dtype = ms_dtype_name(h->dtype) ? ms_dtype_name(h->dtype) : "?";
    switch (h->kind) {
    case LOCAL_BARRIER:
        snprintf(buf, size, "barrier()");
        break;
    case LOCAL_BROADCAST:
        snprintf(buf, size, "broadcast(%s, %lld elements, root %d)", dtype,
                 (long long)h->count, h->root);
        break;
    case LOCAL_ALL_GATHER:
        snprintf(buf, size, "%s(%s, %lld elements)", kind_name(h->kind), dtype,
                 (long long)h->count);
        break;
    default:
        snprintf(buf, size, "%s(%s, %lld elements, %s)", kind_name(h->kind), dtype,
                 (long long)h->count, ms_comm_op_name(h->op));
        break;
    }
    return buf;
}

static int same_call(const local_step_header *a, const local_step_header *b)
{
    return a->op_seq == b->op_seq && a->step == b->step && a->kind == b->kind &&
           a->dtype == b->dtype && a->op == b->op && a->root == b->root &&
           a->count == b->count;
}

int local_wait_posted(ms_group *g, const local_call *call, uint32_t step, uint32_t until)
{
    local_group *lg = g->impl;
    for (int m = 0; m < g->size; m++)
        MS_CHECK(wait_counter(g, call->name, &lg->members[m].posted, step + 1,
                              m == g->rank ? step + 1 : until + 1, m, m != g->rank));
    const local_step_header *mine =
        (const local_step_header *)(local_buffer(lg, g->rank, step) - LOCAL_HEADER_BYTES);
    for (int m = 0; m < g->size; m++) {
        const local_step_header *theirs =
            (const local_step_header *)(local_buffer(lg, m, step) - LOCAL_HEADER_BYTES);
        if (m == g->rank || same_call(mine, theirs))
            continue;
        char my_call[96], their_call[96];
        local_consume(g, step);
        if (mine->op_seq != theirs->op_seq || mine->step != theirs->step)
            return ms_group_break(g, MS_FAIL(MS_ERR_MISMATCH, "%s: out of step: rank %d is at "
                                             "collective %u step %u, rank %d at collective %u "
                                             "step %u", call->name, g->world_ranks[g->rank],
                                             mine->op_seq, mine->step, g->world_ranks[m],
                                             theirs->op_seq, theirs->step));
        return MS_FAIL(MS_ERR_MISMATCH, "%s: ranks disagree: rank %d called %s, rank %d "
                       "called %s", call->name, g->world_ranks[g->rank],
                       describe(my_call, sizeof my_call, mine), g->world_ranks[m],
                       describe(their_call, sizeof their_call, theirs));
    }
    return MS_OK;
}

void local_consume(ms_group *g, uint32_t step)
{
    local_group *lg = g->impl;
    publish(&lg->members[g->rank].consumed, step + 1);
    lg->next_step = step + 1;
}

int local_barrier_step(ms_group *g, const local_call *call)
{
    local_group *lg = g->impl;
    uint32_t step = lg->next_step;
    MS_CHECK(local_wait_free(g, call, step));
    MS_CHECK(local_post(g, call, step));
    MS_CHECK(local_wait_posted(g, call, step, step));
    local_consume(g, step);
    return MS_OK;
}

int local_run_steps(ms_group *g, const local_call *call, const local_steps *steps)
{
    local_group *lg = g->impl;
    uint32_t first = lg->next_step;
    MS_CHECK(local_wait_free(g, call, first));
    steps->fill(g, steps->ctx, 0, local_buffer(lg, g->rank, first));
    MS_CHECK(local_post(g, call, first));
    MS_CHECK(local_wait_posted(g, call, first, first));
    uint32_t last = first + (uint32_t)(steps->nsteps - 1);
    int64_t filled = 1;
    for (int64_t t = 0; t < steps->nsteps; t++) {
        uint32_t step = first + (uint32_t)t;
        for (; filled < steps->nsteps && filled <= t + LOCAL_LOOKAHEAD; filled++) {
            uint32_t ahead = first + (uint32_t)filled;
            MS_CHECK(local_wait_free(g, call, ahead));
            steps->fill(g, steps->ctx, filled, local_buffer(lg, g->rank, ahead));
            MS_CHECK(local_post(g, call, ahead));
        }
        if (t > 0)
            MS_CHECK(local_wait_posted(g, call, step, min_step(step + LOCAL_LOOKAHEAD, last)));
        steps->read(g, steps->ctx, t, step);
        local_consume(g, step);
    }
    return MS_OK;
}
