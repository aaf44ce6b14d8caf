/* moonshard runtime: the local backend's processes: fork, finish, wait and outcomes.
 * Each rank reports through its own pipe; the parent reaps ranks and fails the segment
 * when one ends without returning, so its peers stop waiting for it, and stops them all
 * when it is interrupted. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "local.h"

enum {
    READ_PIECE = 64 * 1024,
    INTERRUPT_GRACE_MS = 500, /* how long ranks may take to stop after an interrupt */
};

static const uint32_t FINISH_MAGIC = 0x6d736669; /* "msfi" */
static const int UNKNOWN_STATUS = -1; /* no wait status (never a real one: those are >= 0) */

/* What a rank writes to its pipe when it finishes, followed by nbytes of payload. */
typedef struct finish_record {
    uint32_t magic;
    uint32_t failed;
    uint64_t nbytes;
} finish_record;

typedef struct spawned_rank {
    pid_t pid;
    int fd;            /* read end of the rank's pipe; -1 after end of file */
    int32_t state;     /* ms_rank_state */
    int32_t code;
    char *received;    /* everything read from the pipe: a finish_record and its payload */
    size_t nreceived, capacity;
    int lost_bytes;    /* the parent could not hold what the rank sent */
    char reason[96];
} spawned_rank;

struct ms_spawn {
    local_segment *seg;
    int world_size;
    int running;
    int64_t timeout_ms;     /* the world's initial timeout: how long ranks outlive a failure */
    int first_failed;       /* the first rank that ended without returning, or -1 */
    int64_t failed_at_ms;   /* when the parent saw it */
    int interrupted;        /* the signal that interrupted the parent's wait, or 0 */
    int64_t interrupted_at_ms;
    int handling_signals;   /* the parent handles SIGINT and SIGTERM until the wait ends */
    struct sigaction saved[2];
    spawned_rank ranks[];
};

static int finish_fd = -1;                /* in a rank: write end of its pipe */
static local_segment *rank_segment = NULL; /* in a rank: its job's segment */

static int64_t monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* Parent: end ranks that are still running and reap them. */
static void kill_and_reap(ms_spawn *job)
{
    for (int r = 0; r < job->world_size; r++) {
        spawned_rank *rank = &job->ranks[r];
        if (rank->pid > 0 && rank->state == MS_RANK_RUNNING) {
            kill(rank->pid, SIGKILL);
            while (waitpid(rank->pid, NULL, 0) < 0 && errno == EINTR) {
            }
            rank->state = MS_RANK_KILLED;
            rank->code = SIGKILL;
            snprintf(rank->reason, sizeof rank->reason, "died (signal %d)", SIGKILL);
        }
        close_fd(&rank->fd);
    }
    job->running = 0;
}

/* In the new rank: die with the parent, keep only this rank's pipe end. */
static void become_rank(ms_spawn *job, int r, const int *write_fds, pid_t parent,
                        ms_group *world)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1);
    for (int i = 0; i < job->world_size; i++) {
        close_fd(&job->ranks[i].fd);
        if (i != r)
            close(write_fds[i]);
    }
    finish_fd = write_fds[r];
    rank_segment = job->seg;
    ms_local_world_rank = r;
    ms_interrupt_install();
    ms_interrupt_take(); /* a signal the parent had pending is the parent's */
    world->rank = r;
    ms_dist_set_world(world);
    ms_threads_share_cores(job->world_size);
    /* Without memory for the arena's bookkeeping this rank's tensors stay private and its
     * collectives stage (its posts say so). */
    (void)local_heap_attach(job->seg, r);
    free(job);
}

int ms_spawn_new(ms_spawn **job, int world_size, int64_t timeout_ms, int *rank)
{
    if (!job || !rank)
        return MS_FAIL(MS_ERR_INVALID, "spawn: job and rank must not be NULL");
    if (ms_local_world_rank >= 0)
        return MS_FAIL(MS_ERR_STATE, "spawn: rank %d cannot spawn ranks of its own",
                       ms_local_world_rank);
    if (ms_dist_current_world())
        return MS_FAIL(MS_ERR_STATE, "spawn: this process already has a %s process group",
                       ms_dist_current_world()->backend->name);
    if (world_size < 1 || world_size > LOCAL_MAX_RANKS)
        return MS_FAIL(MS_ERR_INVALID, "spawn: %d ranks (1 to %d)", world_size,
                       LOCAL_MAX_RANKS);
    ms_spawn *made = calloc(1, sizeof *made + sizeof(spawned_rank) * (size_t)world_size);
    if (!made)
        return MS_FAIL(MS_ERR_OOM, "spawn: out of host memory");
    made->world_size = world_size;
    made->timeout_ms = timeout_ms > 0 ? timeout_ms : MS_DIST_DEFAULT_TIMEOUT_MS;
    made->first_failed = -1;
    for (int r = 0; r < world_size; r++)
        made->ranks[r].fd = -1;
    int status = local_segment_create(&made->seg, world_size);
    if (status != MS_OK) {
        free(made);
        return status;
    }
    ms_group *world = NULL;
    int write_fds[LOCAL_MAX_RANKS];
    int opened = 0;
    status = local_world_group(&world, made->seg, timeout_ms);
    for (; status == MS_OK && opened < world_size; opened++) {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) != 0) {
            status = MS_FAIL(errno, "spawn: cannot make a pipe: %s", strerror(errno));
            break;
        }
        made->ranks[opened].fd = fds[0];
        write_fds[opened] = fds[1];
    }
    pid_t parent = getpid();
    if (status == MS_OK) {
        status = ms_interrupt_push(made->saved); /* from before the first rank exists */
        made->handling_signals = status == MS_OK;
    }
    fflush(NULL); /* or buffered output would be written once per rank */
    for (int r = 0; status == MS_OK && r < world_size; r++) {
        pid_t pid = fork();
        if (pid == 0) {
            become_rank(made, r, write_fds, parent, world);
            *job = NULL;
            *rank = r;
            return MS_OK;
        }
        if (pid < 0) {
            status = MS_FAIL(errno, "spawn: fork of rank %d failed: %s", r, strerror(errno));
            break;
        }
        made->ranks[r].pid = pid;
        made->running++;
    }
    for (int i = 0; i < opened; i++)
        close(write_fds[i]);
    if (world)
        local_group_free(world);
    if (status != MS_OK) {
        ms_spawn_free(made);
        return status;
    }
    for (int r = 0; r < world_size; r++)
        fcntl(made->ranks[r].fd, F_SETFL, O_NONBLOCK);
    *job = made;
    *rank = -1;
    return MS_OK;
}

static int write_all(int fd, const void *bytes, size_t nbytes)
{
    const char *p = bytes;
    while (nbytes > 0) {
        ssize_t n = write(fd, p, nbytes);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        p += n;
        nbytes -= (size_t)n;
    }
    return 1;
}

int ms_local_finish(int failed, const void *bytes, size_t nbytes)
{
    if (finish_fd < 0)
        return MS_FAIL(MS_ERR_STATE, "local_finish: this process is not a spawned rank");
    fflush(NULL);
    finish_record record = {.magic = FINISH_MAGIC, .failed = failed != 0, .nbytes = nbytes};
    int sent = write_all(finish_fd, &record, sizeof record) &&
               (nbytes == 0 || write_all(finish_fd, bytes, nbytes));
    _exit(sent ? 0 : 1);
}

/* Read whatever the rank's pipe holds now. */
static void drain(spawned_rank *rank)
{
    while (rank->fd >= 0) {
        if (rank->capacity - rank->nreceived < READ_PIECE) {
            size_t capacity = rank->capacity ? rank->capacity * 2 : READ_PIECE * 2;
            char *grown = realloc(rank->received, capacity);
            if (!grown) {
                rank->lost_bytes = 1;
                rank->nreceived = 0;
            } else {
                rank->received = grown;
                rank->capacity = capacity;
            }
        }
        char scratch[256];
        char *into = rank->lost_bytes ? scratch : rank->received + rank->nreceived;
        size_t room = rank->lost_bytes ? sizeof scratch : rank->capacity - rank->nreceived;
        ssize_t n = read(rank->fd, into, room);
        if (n > 0) {
            if (!rank->lost_bytes)
                rank->nreceived += (size_t)n;
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
            close_fd(&rank->fd);
        } else if (errno == EAGAIN) {
            return;
        }
    }
}

static const finish_record *complete_record(const spawned_rank *rank)
{
    const finish_record *record = (const finish_record *)rank->received;
    if (rank->nreceived < sizeof *record || record->magic != FINISH_MAGIC ||
        rank->nreceived - sizeof *record != record->nbytes)
        return NULL;
    return record;
}

/* Classify a reaped rank and tell its peers. wait_status is UNKNOWN_STATUS when the
 * system reaped it first; then its finish record alone tells whether it returned. */
static void settle(ms_spawn *job, int r, int wait_status)
{
    spawned_rank *rank = &job->ranks[r];
    drain(rank);
    close_fd(&rank->fd);
    const finish_record *record = complete_record(rank);
    int exited_cleanly = wait_status == UNKNOWN_STATUS ||
                         (WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0);
    const char *departure;
    if (exited_cleanly && record) {
        rank->state = record->failed ? MS_RANK_FAILED : MS_RANK_RETURNED;
        snprintf(rank->reason, sizeof rank->reason, "%s",
                 record->failed ? "raised an error" : "returned");
        departure = record->failed ? rank->reason : "returned without joining";
    } else if (wait_status != UNKNOWN_STATUS && WIFSIGNALED(wait_status)) {
        rank->state = MS_RANK_KILLED;
        rank->code = WTERMSIG(wait_status);
        snprintf(rank->reason, sizeof rank->reason, "died (signal %d)", rank->code);
        departure = rank->reason;
    } else {
        rank->state = MS_RANK_EXITED;
        rank->code = wait_status != UNKNOWN_STATUS && WIFEXITED(wait_status)
                         ? WEXITSTATUS(wait_status) : -1;
        if (rank->lost_bytes)
            snprintf(rank->reason, sizeof rank->reason, "sent more than the parent could hold");
        else if (rank->code < 0)
            snprintf(rank->reason, sizeof rank->reason, "exited without returning");
        else
            snprintf(rank->reason, sizeof rank->reason, "exited with status %d without "
                     "returning", rank->code);
        departure = rank->reason;
    }
    local_mark_departed(job->seg, r, departure, rank->state != MS_RANK_RETURNED);
    job->running--;
    if (rank->state != MS_RANK_RETURNED && job->first_failed < 0) {
        job->first_failed = r;
        job->failed_at_ms = monotonic_ms();
    }
}

/* Parent: SIGKILL every rank still running, reap it, and say why it was stopped
 * ("still running <why>"). */
static void kill_running(ms_spawn *job, const char *why)
{
    for (int r = 0; r < job->world_size; r++) {
        spawned_rank *rank = &job->ranks[r];
        int wait_status;
        if (rank->state != MS_RANK_RUNNING)
            continue;
        kill(rank->pid, SIGKILL);
        pid_t reaped;
        while ((reaped = waitpid(rank->pid, &wait_status, 0)) < 0 && errno == EINTR) {
        }
        settle(job, r, reaped > 0 ? wait_status : UNKNOWN_STATUS);
        if (rank->state == MS_RANK_KILLED)
            snprintf(rank->reason, sizeof rank->reason, "was stopped (signal %d): still running %s",
                     SIGKILL, why);
    }
}

/* Ranks still running a timeout after a peer failed are not waiting for anything that can
 * still come (their collectives would have failed): end them, so the parent can report. */
static void stop_stragglers(ms_spawn *job)
{
    if (job->first_failed < 0 || monotonic_ms() - job->failed_at_ms < job->timeout_ms)
        return;
    char why[96];
    snprintf(why, sizeof why, "%lld ms after rank %d failed", (long long)job->timeout_ms,
             job->first_failed);
    kill_running(job, why);
}

/* Parent: give SIGINT and SIGTERM back to what handled them before the spawn. */
static void restore_signals(ms_spawn *job)
{
    if (job->handling_signals)
        ms_interrupt_pop(job->saved);
    job->handling_signals = 0;
}

static const char *signal_name(int sig) { return sig == SIGINT ? "SIGINT" : "SIGTERM"; }

/* Parent: an interrupt asks every running rank to stop (SIGTERM: its collectives and Lua
 * code raise where they are), unless it is a SIGINT a rank's REPL owns. */
static void notice_interrupt(ms_spawn *job)
{
    int sig = ms_interrupt_pending();
    if (!sig || job->interrupted)
        return;
    ms_interrupt_take();
    if (sig == SIGINT && atomic_load(&job->seg->consoles) > 0)
        return;
    job->interrupted = sig;
    job->interrupted_at_ms = monotonic_ms();
    for (int r = 0; r < job->world_size; r++)
        if (job->ranks[r].state == MS_RANK_RUNNING)
            kill(job->ranks[r].pid, SIGTERM);
}

/* Parent: ranks still running INTERRUPT_GRACE_MS after the interrupt are killed. */
static void stop_after_interrupt(ms_spawn *job)
{
    if (!job->interrupted || monotonic_ms() - job->interrupted_at_ms < INTERRUPT_GRACE_MS)
        return;
    char why[64];
    snprintf(why, sizeof why, "%d ms after %s", INTERRUPT_GRACE_MS, signal_name(job->interrupted));
    kill_running(job, why);
}

int ms_local_hold_console(int held)
{
    if (!rank_segment)
        return MS_FAIL(MS_ERR_STATE, "local_hold_console: this process is not a spawned rank");
    atomic_fetch_add(&rank_segment->consoles, held ? 1 : -1);
    return MS_OK;
}

int ms_spawn_wait(ms_spawn *job)
{
    if (!job)
        return MS_FAIL(MS_ERR_INVALID, "spawn_wait: job must not be NULL");
    while (job->running > 0) {
        notice_interrupt(job);
        struct pollfd fds[LOCAL_MAX_RANKS];
        int owners[LOCAL_MAX_RANKS], nfds = 0;
        for (int r = 0; r < job->world_size; r++) {
            if (job->ranks[r].fd >= 0) {
                fds[nfds] = (struct pollfd){.fd = job->ranks[r].fd, .events = POLLIN};
                owners[nfds++] = r;
            }
        }
        if (poll(fds, (nfds_t)nfds, LOCAL_WAIT_SLICE_MS) < 0 && errno != EINTR)
            return MS_FAIL(errno, "spawn_wait: poll failed: %s", strerror(errno));
        for (int i = 0; i < nfds; i++)
            if (fds[i].revents)
                drain(&job->ranks[owners[i]]);
        for (int r = 0; r < job->world_size; r++) {
            spawned_rank *rank = &job->ranks[r];
            int wait_status;
            if (rank->state != MS_RANK_RUNNING)
                continue;
            pid_t reaped = waitpid(rank->pid, &wait_status, WNOHANG);
            if (reaped > 0)
                settle(job, r, wait_status);
            else if (reaped < 0 && errno == ECHILD) /* SIGCHLD ignored: reaped already */
                settle(job, r, UNKNOWN_STATUS);
        }
        stop_stragglers(job);
        stop_after_interrupt(job);
    }
    restore_signals(job);
    if (job->interrupted)
        return MS_FAIL(MS_ERR_INTERRUPTED, "interrupted by %s: every rank was stopped",
                       signal_name(job->interrupted));
    return MS_OK;
}

int ms_spawn_outcome(const ms_spawn *job, int rank, ms_rank_outcome *outcome)
{
    if (!job || !outcome)
        return MS_FAIL(MS_ERR_INVALID, "spawn_outcome: job and outcome must not be NULL");
    if (rank < 0 || rank >= job->world_size)
        return MS_FAIL(MS_ERR_INDEX, "spawn_outcome: rank %d outside [0, %d)", rank,
                       job->world_size);
    const spawned_rank *r = &job->ranks[rank];
    const finish_record *record = complete_record(r);
    int finished = r->state == MS_RANK_RETURNED || r->state == MS_RANK_FAILED;
    *outcome = (ms_rank_outcome){
        .state = r->state,
        .code = r->code,
        .pid = r->pid,
        .bytes = finished ? (const char *)(record + 1) : NULL,
        .nbytes = finished ? record->nbytes : 0,
        .reason = r->state == MS_RANK_RUNNING ? "running" : r->reason,
    };
    return MS_OK;
}

void ms_spawn_free(ms_spawn *job)
{
    if (!job)
        return;
    kill_and_reap(job);
    restore_signals(job);
    for (int r = 0; r < job->world_size; r++)
        free(job->ranks[r].received);
    local_segment_destroy(job->seg);
    free(job);
}
