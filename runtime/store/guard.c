/* moonshard store: reads of mapped files that survive damage. A damaged page can send LMDB (or
 * a copy out of the map) past the end of a file (SIGBUS) or into an assertion (abort); inside
 * guard_run such a signal ends the reads and becomes an error naming the file. (Values LMDB
 * returns are checked against the file before use, space_value_in_file.) */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "store_internal.h"

enum { MAX_OPEN_READS = 64 };

typedef struct guard_frame {
    sigjmp_buf jump;
    struct guard_frame *outer;
    int open_at_start;
} guard_frame;

typedef struct open_read {
    store_env *env;
    MDB_txn *txn;
    bool locked; /* under env->map_lock (env_read_begin) */
} open_read;

/* Per thread: the innermost guard, the read transactions open, the file read last. */
static __thread guard_frame *innermost;
static __thread open_read open_reads[MAX_OPEN_READS];
static __thread int open_count;
static __thread const store_env *last_env;
static __thread const store_env *faulting_env;
static __thread bool ended_reads; /* the last guard_run of this thread ended on a signal */

static const int GUARDED_SIGNALS[] = {SIGBUS, SIGABRT};
static struct sigaction previous[2];
static pthread_once_t install_once = PTHREAD_ONCE_INIT;

void guard_note_txn(store_env *e, MDB_txn *txn, bool locked)
{
    last_env = e;
    if (open_count < MAX_OPEN_READS)
        open_reads[open_count++] = (open_read){e, txn, locked};
}

void guard_forget_txn(MDB_txn *txn)
{
    for (int i = open_count - 1; i >= 0; i--)
        if (open_reads[i].txn == txn) {
            open_reads[i] = open_reads[--open_count];
            return;
        }
}

static void pass_on(int signal, siginfo_t *info, void *context, int slot)
{
    const struct sigaction *p = &previous[slot];
    if (p->sa_flags & SA_SIGINFO)
        p->sa_sigaction(signal, info, context);
    else if (p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN)
        p->sa_handler(signal);
    else {
        sigaction(signal, p, NULL); /* the default: the fault repeats, or abort raises again */
        if (signal == SIGABRT)
            raise(SIGABRT);
    }
}

static void on_signal(int signal, siginfo_t *info, void *context)
{
    int slot = signal == SIGBUS ? 0 : 1;
    const store_env *e = signal == SIGABRT ? last_env : env_mapping(info->si_addr);
    const uint8_t *a = info->si_addr;
    if (!e && last_env && last_env->map_begin && a >= last_env->map_begin && a < last_env->map_end)
        e = last_env; /* a file being opened, not registered yet */
    if (innermost && e) {
        faulting_env = e;
        siglongjmp(innermost->jump, signal);
    }
    pass_on(signal, info, context, slot);
}

static void install(void)
{
    for (int i = 0; i < 2; i++) {
        struct sigaction ours;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = on_signal;
        ours.sa_flags = SA_SIGINFO;
        sigemptyset(&ours.sa_mask);
        sigaction(GUARDED_SIGNALS[i], &ours, &previous[i]);
    }
}

bool guard_ended_reads(void)
{
    return ended_reads;
}

void guard_lmdb_assert(MDB_env *env, const char *message)
{
    (void)env;
    (void)message;
    if (innermost && last_env) {
        faulting_env = last_env;
        siglongjmp(innermost->jump, SIGABRT);
    }
    /* unguarded: LMDB prints the message and aborts */
}

int guard_run(int (*fn)(void *), void *arg)
{
    pthread_once(&install_once, install);
    guard_frame frame = {.outer = innermost, .open_at_start = open_count};
    int signal = sigsetjmp(frame.jump, 1);
    ended_reads = signal != 0;
    if (signal) {
        innermost = frame.outer;
        while (open_count > frame.open_at_start) {
            open_read r = open_reads[--open_count];
            if (r.locked)
                env_read_end_unguarded(r.env, r.txn);
            else
                mdb_txn_abort(r.txn);
        }
        const store_env *e = faulting_env;
        return MS_FAIL(MS_ERR_CORRUPT, "%s is damaged (%s while reading it)",
                       e ? e->path : "a store file",
                       signal == SIGBUS ? "SIGBUS: a page past the end of the file"
                                        : "LMDB stopped at a damaged page");
    }
    innermost = &frame;
    int status = fn(arg);
    innermost = frame.outer;
    return status;
}
