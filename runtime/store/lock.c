/* moonshard store: one writer at a time. The writing job's rank 0 holds an exclusive flock
 * on <store>/writer.lock (its pid, host and step written inside) from ms_store_lock (or its
 * begin) to close; each rank holds one on shard-<rank>.mdb-writer from begin to close. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "store_internal.h"

enum { HOLDER_BYTES = 256, HOLDER_RETRIES = 20 };

static int open_lock_file(ms_store *s, const char *name, int *fd)
{
    char *path = store_file_path(s->path, name);
    if (!path)
        return MS_FAIL(MS_ERR_OOM, "store: out of memory");
    *fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    int err = errno;
    free(path);
    if (*fd < 0)
        return MS_FAIL(err, "%s: cannot open %s: %s", s->path, name, strerror(err));
    return MS_OK;
}

/* The holder line of a lock file ("pid 123 on host h"), or "" when there is none. */
static void read_holder(int fd, char *holder, size_t size)
{
    ssize_t n = pread(fd, holder, size - 1, 0);
    holder[n > 0 ? n : 0] = 0;
    holder[strcspn(holder, "\n")] = 0;
}

/* "pid 123 on host h, step 5\n": who holds a lock and, when known, what for (doing). */
static void write_holder(int fd, const char *doing)
{
    char host[128] = "?", line[HOLDER_BYTES];
    gethostname(host, sizeof host - 1);
    int n = doing ? snprintf(line, sizeof line, "pid %d on host %s, %s\n", (int)getpid(), host, doing)
                  : snprintf(line, sizeof line, "pid %d on host %s\n", (int)getpid(), host);
    if (n >= (int)sizeof line)
        n = (int)sizeof line - 1;
    if (ftruncate(fd, 0) != 0 || pwrite(fd, line, (size_t)n, 0) != n) {
        /* the lock holds without its line; another writer is then told "a process" holds it */
    }
}

static const char *step_doing(char *buf, size_t size, int64_t step)
{
    if (step < 0)
        return NULL;
    snprintf(buf, size, "step %lld", (long long)step);
    return buf;
}

/* Take the exclusive lock on name without waiting: EBUSY naming the holder when another
 * process has it. A holder line left by a process that died is a stale lock: the kernel
 * dropped the flock with the process, so it is taken over. [OUT] *fd holds the lock. */
static int take(ms_store *s, const char *name, const char *what, const char *doing, int *fd)
{
    MS_CHECK(open_lock_file(s, name, fd));
    char holder[HOLDER_BYTES] = "";
    int err = 0;
    /* A holder writes its line just after locking and clears it just before unlocking:
     * while the line is empty, look again shortly. */
    for (int attempt = 0; attempt < HOLDER_RETRIES; attempt++) {
        if (flock(*fd, LOCK_EX | LOCK_NB) == 0) {
            err = 0;
            break;
        }
        err = errno;
        read_holder(*fd, holder, sizeof holder);
        if (err != EWOULDBLOCK || *holder)
            break;
        usleep(1000);
    }
    if (err) {
        close(*fd);
        *fd = -1;
        if (err == EWOULDBLOCK)
            return MS_FAIL(EBUSY, "%s is being written by another job (%s holds %s)", s->path,
                           *holder ? holder : "a process", name);
        return MS_FAIL(err, "%s: cannot lock %s for %s: %s", s->path, name, what, strerror(err));
    }
    write_holder(*fd, doing);
    return MS_OK;
}

static void drop(int *fd)
{
    if (*fd < 0)
        return;
    if (ftruncate(*fd, 0) != 0) {
        /* the holder line stays; the next writer takes the lock over as stale */
    }
    flock(*fd, LOCK_UN);
    close(*fd);
    *fd = -1;
}

int store_lock_writer(ms_store *s, const char *what, const char *doing)
{
    if (s->writer_lock_fd >= 0)
        return MS_OK;
    return take(s, "writer.lock", what, doing, &s->writer_lock_fd);
}

void store_unlock_writer(ms_store *s)
{
    drop(&s->writer_lock_fd);
}

/* Rank 0 takes writer.lock unless it holds it; every rank takes the lock of its own shard
 * file until the handle closes, begins again or aborts, so no other process reclaims or
 * overwrites this rank's chunks before the manifest names them. */
int store_lock_shard(ms_store *s, int rank, int64_t step)
{
    char doing[48];
    step_doing(doing, sizeof doing, step);
    if (rank == 0 && s->writer_lock_fd < 0) {
        MS_CHECK(store_lock_writer(s, "saving", doing));
        s->writer_lock_for_save = true;
    } else if (rank == 0) {
        write_holder(s->writer_lock_fd, doing); /* locked before the step was chosen */
    }
    if (s->shard_lock_fd >= 0)
        return MS_OK;
    char name[48];
    snprintf(name, sizeof name, "shard-%d.mdb-writer", rank);
    return take(s, name, "saving", doing, &s->shard_lock_fd);
}

void store_unlock_shard(ms_store *s)
{
    drop(&s->shard_lock_fd);
}

void store_end_save_locks(ms_store *s)
{
    drop(&s->shard_lock_fd);
    if (s->writer_lock_for_save)
        drop(&s->writer_lock_fd);
    s->writer_lock_for_save = false;
}

int ms_store_lock(ms_store *s)
{
    MS_CHECK(store_check(s, "store_lock"));
    if (s->mode != MS_STORE_READ_WRITE)
        return MS_FAIL(MS_ERR_STATE, "store_lock: %s was opened read-only", s->path);
    MS_CHECK(store_lock_writer(s, "writing", NULL));
    s->writer_lock_for_save = false;
    return MS_OK;
}
