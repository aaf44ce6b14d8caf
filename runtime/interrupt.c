/* moonshard runtime: SIGINT and SIGTERM as a pending flag. The handlers only store the
 * signal number (async-signal-safe); callers poll it through ms_interrupt_check. */
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

#include "internal.h"

static volatile sig_atomic_t pending;           /* the first signal not yet taken, or 0 */
static volatile sig_atomic_t repeated[2];       /* SIGINT, SIGTERM seen again while pending */
static atomic_int waits_interruptible = 1;
static atomic_int installed;

static int slot(int sig) { return sig == SIGINT ? 0 : 1; }

static void on_signal(int sig)
{
    if (pending == 0) {
        pending = sig;
        repeated[0] = repeated[1] = 0;
        return;
    }
    /* A second SIGINT (or SIGTERM) that nothing noticed the first of: the default action. */
    if (repeated[slot(sig)] || pending == sig) {
        signal(sig, SIG_DFL);
        raise(sig); /* delivered when this handler returns */
        return;
    }
    repeated[slot(sig)] = 1;
}

static int handle(int sig, struct sigaction *saved)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART; /* reads and writes go on; poll and futex waits return */
    if (sigaction(sig, &action, saved) != 0)
        return MS_FAIL(MS_ERR_STATE, "interrupt_install: cannot handle signal %d", sig);
    return MS_OK;
}

int ms_interrupt_install(void)
{
    if (atomic_exchange(&installed, 1))
        return MS_OK;
    MS_CHECK(handle(SIGINT, NULL));
    return handle(SIGTERM, NULL);
}

int ms_interrupt_push(struct sigaction *saved)
{
    MS_CHECK(handle(SIGINT, &saved[0]));
    return handle(SIGTERM, &saved[1]);
}

void ms_interrupt_pop(const struct sigaction *saved)
{
    sigaction(SIGINT, &saved[0], NULL);
    sigaction(SIGTERM, &saved[1], NULL);
}

int ms_interrupt_pending(void) { return pending; }

int ms_interrupt_take(void)
{
    int sig = pending;
    pending = 0;
    repeated[0] = repeated[1] = 0;
    return sig;
}

int ms_interrupt_set_waits(int interruptible)
{
    return atomic_exchange(&waits_interruptible, interruptible != 0);
}

int ms_interrupt_ignore_sigint(int ignore)
{
    MS_CHECK(ms_interrupt_install());
    if (!ignore)
        return handle(SIGINT, NULL);
    signal(SIGINT, SIG_IGN);
    if (pending == SIGINT)
        ms_interrupt_take();
    return MS_OK;
}

int ms_interrupt_check(const char *what, int in_wait)
{
    if (pending == 0 || (in_wait && !atomic_load(&waits_interruptible)))
        return MS_OK;
    int sig = ms_interrupt_take();
    return MS_FAIL(MS_ERR_INTERRUPTED, "%s: interrupted by %s", what,
                   sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal");
}
