/* moonshard CPU backend: the worker pool that splits a kernel's independent work across this
 * process's threads (ms_get_num_threads), made in the process that uses it, after any fork. */
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu.h"

/* A job is cut into more chunks than threads, which the caller and the workers claim one
 * at a time from a shared counter: the caller starts at once, and a worker joins when it
 * wakes (waking a sleeping thread can take tens of microseconds), so a late worker takes
 * fewer chunks instead of holding the caller up. Workers sleep on a futex word of their
 * own until the caller bumps it; the caller, out of chunks, sleeps on `done` until the
 * last chunk finishes. Nothing spins. One job at a time: a second thread asking while a
 * job runs, or a kernel inside a job, runs inline. */
enum { MAX_WORKERS = 63, CHUNKS_PER_RANGE = 4 };

static struct {
    pthread_mutex_t lock;
    int workers; /* started worker threads */
    pthread_t threads[MAX_WORKERS];
    _Atomic uint32_t go[MAX_WORKERS];
    /* The current job's chunks: the next to claim (high 32 bits) and the count (low). */
    _Atomic uint64_t claim;
    _Atomic uint32_t done; /* chunks of the current job finished */
    ms_parallel_fn fn;
    void *ctx;
    int64_t n;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static _Thread_local int in_job; /* a worker, or a caller while its job runs */
static pthread_once_t fork_handlers = PTHREAD_ONCE_INIT;

static void futex_wait(_Atomic uint32_t *word, uint32_t value)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word, int count)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

/* Run chunks of the current job until none is left to claim. A chunk's claim makes the
 * job's fields visible (the caller published them before the counter), and the job
 * cannot end, nor its fields change, before the chunk is counted done. Returns whether
 * this thread finished the job's last chunk. */
static int run_chunks(void)
{
    int finished_last = 0;
    uint64_t word = atomic_load_explicit(&pool.claim, memory_order_acquire);
    for (;;) {
        uint32_t next = (uint32_t)(word >> 32), count = (uint32_t)word;
        if (next >= count)
            return finished_last;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &word,
                                                   word + ((uint64_t)1 << 32),
                                                   memory_order_acquire, memory_order_acquire))
            continue;
        int64_t n = pool.n;
        pool.fn(pool.ctx, n * next / count, n * (next + 1) / count);
        finished_last = atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel) + 1 ==
                        count;
        word = atomic_load_explicit(&pool.claim, memory_order_acquire);
    }
}

static void *worker_main(void *arg)
{
    int index = (int)(intptr_t)arg;
    in_job = 1;
    uint32_t seen = 0;
    for (;;) {
        uint32_t now;
        while ((now = atomic_load_explicit(&pool.go[index], memory_order_acquire)) == seen)
            futex_wait(&pool.go[index], seen);
        seen = now;
        if (run_chunks())
            futex_wake(&pool.done, 1);
    }
    return NULL;
}

/* Around fork: no job runs while the process is copied; the child has none of the
 * parent's workers and makes its own on first use. */
static void before_fork(void) { pthread_mutex_lock(&pool.lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void after_fork_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pool.workers = 0;
    atomic_store(&pool.claim, 0);
    atomic_store(&pool.done, 0);
    for (int i = 0; i < MAX_WORKERS; i++)
        atomic_store(&pool.go[i], 0);
}
static void register_fork_handlers(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* Every signal but the synchronous ones, which a fault raises in the faulting thread and
 * which cannot wait (the copy-on-write snapshot handles SIGSEGV in any thread). */
static void async_signals(sigset_t *set)
{
    sigfillset(set);
    sigdelset(set, SIGSEGV);
    sigdelset(set, SIGBUS);
    sigdelset(set, SIGFPE);
    sigdelset(set, SIGILL);
}

/* Start workers until there are `wanted` (under the lock); returns how many run. Workers
 * take no asynchronous signals (they stay with the threads the program made) but keep the
 * synchronous ones, which the copy-on-write snapshot handles in any thread. */
static int grow(int wanted)
{
    if (wanted > MAX_WORKERS)
        wanted = MAX_WORKERS;
    if (pool.workers >= wanted)
        return wanted;
    pthread_once(&fork_handlers, register_fork_handlers);
    sigset_t all, old;
    async_signals(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.workers < wanted) {
        int i = pool.workers;
        atomic_store(&pool.go[i], 0);
        if (pthread_create(&pool.threads[i], NULL, worker_main, (void *)(intptr_t)i) != 0)
            break;
        pool.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.workers;
}

int ms_parallel_ranges(int64_t n, double work)
{
    if (n < 2 || work < MS_PARALLEL_GRAIN || in_job)
        return 1;
    int threads = ms_get_num_threads();
    double by_work = work / MS_PARALLEL_GRAIN;
    int ranges = threads;
    if (by_work < ranges)
        ranges = (int)by_work;
    if (n < ranges)
        ranges = (int)n;
    return ranges < 1 ? 1 : ranges;
}

void ms_parallel_for(int64_t n, int ranges, ms_parallel_fn fn, void *ctx)
{
    if (ranges < 2 || n < 2 || in_job || pthread_mutex_trylock(&pool.lock) != 0) {
        fn(ctx, 0, n);
        return;
    }
    int workers = grow(ranges - 1);
    if (ranges > workers + 1)
        ranges = workers + 1;
    int64_t chunks = (int64_t)ranges * CHUNKS_PER_RANGE;
    if (chunks > n)
        chunks = n;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.claim, (uint64_t)chunks, memory_order_release);
    for (int i = 0; i < ranges - 1; i++) {
        atomic_fetch_add_explicit(&pool.go[i], 1, memory_order_release);
        futex_wake(&pool.go[i], 1);
    }
    in_job = 1;
    run_chunks();
    in_job = 0;
    uint32_t finished;
    while ((finished = atomic_load_explicit(&pool.done, memory_order_acquire)) != chunks)
        futex_wait(&pool.done, finished);
    pthread_mutex_unlock(&pool.lock);
}

void ms_parallel_for_signals_held(int64_t n, int ranges, ms_parallel_fn fn, void *ctx)
{
    sigset_t held, saved;
    async_signals(&held);
    pthread_sigmask(SIG_BLOCK, &held, &saved);
    ms_parallel_for(n, ranges, fn, ctx);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}
