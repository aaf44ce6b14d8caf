/* moonshard runtime: SIGINT and SIGTERM turned into a flag that the runtime polls, so an
 * interrupt reaches collectives, dist.spawn's parent and the REPL wherever the code runs. */
#ifndef MS_INTERRUPT_H
#define MS_INTERRUPT_H

/* ffi-begin */
/* ---- interrupts ---- */
/* Install moonshard's SIGINT and SIGTERM handlers (once; later calls do nothing). A signal
 * only records itself as pending; the runtime fails with MS_ERR_INTERRUPTED where it polls
 * (the start of every collective, waits inside collectives, dist.spawn's parent). The same
 * signal arriving again while the first is still pending ends the process as the default
 * action would, so a loop that polls nothing can still be stopped. */
int ms_interrupt_install(void);
/* The pending signal number (SIGINT or SIGTERM), or 0. */
int ms_interrupt_pending(void);
/* Clear the pending signal; returns it (0 when none was pending). */
int ms_interrupt_take(void);
/* Whether waits inside a collective stop at an interrupt (1, the default: the collective
 * fails and its group is unusable, as after a timeout) or run to the collective's end
 * (0: only a collective's start polls, so the group stays usable; the REPL's lines use
 * it). Returns the previous setting. */
int ms_interrupt_set_waits(int interruptible);
/* 1: SIGINT is ignored and a pending SIGINT is dropped (a rank idle under the REPL);
 * 0: SIGINT is handled again. Installs the handlers first when needed. */
int ms_interrupt_ignore_sigint(int ignore);
/* ffi-end */

/* Runtime-internal: when a signal is pending, take it and fail with MS_ERR_INTERRUPTED
 * ("<what>: interrupted by SIGINT"); in_wait says the caller is inside a started
 * collective, which polls only while waits are interruptible. Else 0. */
int ms_interrupt_check(const char *what, int in_wait);
/* Runtime-internal: handle SIGINT and SIGTERM until ms_interrupt_pop puts back the
 * dispositions saved[0] (SIGINT) and saved[1] (SIGTERM) held before. */
struct sigaction;
int ms_interrupt_push(struct sigaction *saved);
void ms_interrupt_pop(const struct sigaction *saved);

#endif
