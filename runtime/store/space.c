/* moonshard store: the file space behind LMDB's maps - a file is checked against its meta
 * pages before it is mapped, and writable maps and lock files are backed by allocated space. */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store_internal.h"

/* LMDB's on-disk meta page (lmdb.h does not export it): a 16-byte page header, then. */
enum {
    META_MAGIC = 0xBEEFC0DE,
    META_OFFSET = 16,
    META_DB_BYTES = 48,                        /* MDB_db */
    META_PSIZE_AT = 24,                        /* mm_dbs[FREE_DBI].md_pad: the page size */
    META_DBS_AT = 24,
    META_LAST_PAGE_AT = META_DBS_AT + 2 * META_DB_BYTES,
    META_TXNID_AT = META_LAST_PAGE_AT + 8,
    META_BYTES = META_TXNID_AT + 8,
    DB_ROOT_AT = 40,                           /* md_root within MDB_db */
    LOCK_FILE_BYTES = 128 << 10,               /* LMDB's lock file for 1024 readers, and more */
};

static uint64_t le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static int damaged(const store_env *e, const char *why)
{
    return MS_FAIL(MS_ERR_CORRUPT, "%s is damaged (%s)", e->path, why);
}

/* Files shorter than LMDB's two meta pages are left to LMDB, which creates a new file under
 * its lock file's lock (another process may be creating this one right now);
 * space_short_file names them when LMDB then fails. */
int space_check_file(const store_env *e)
{
    int fd = open(e->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? MS_OK : MS_FAIL(errno, "%s: %s", e->path, strerror(errno));
    struct stat st;
    uint8_t pages[2][512];
    int status = fstat(fd, &st) ? MS_FAIL(errno, "%s: %s", e->path, strerror(errno)) : MS_OK;
    uint64_t size = (uint64_t)st.st_size;
    bool short_file = status || size < sizeof pages[0] ||
                      pread(fd, pages[0], sizeof pages[0], 0) != (ssize_t)sizeof pages[0];
    uint32_t psize = short_file ? 0 : le32(pages[0] + META_OFFSET + META_PSIZE_AT);
    if (!short_file && le32(pages[0] + META_OFFSET) != META_MAGIC)
        status = MS_FAIL(MS_ERR_CORRUPT, "%s is not a moonshard store file (not an LMDB file)",
                         e->path);
    else if (!short_file && (psize < 512 || psize > 65536 || (psize & (psize - 1))))
        status = damaged(e, "its meta page names no valid page size");
    else if (!short_file && size < 2 * (uint64_t)psize)
        short_file = true;
    else if (!short_file && pread(fd, pages[1], sizeof pages[1], psize) != (ssize_t)sizeof pages[1])
        status = damaged(e, "its second meta page cannot be read");
    close(fd);
    if (status || short_file)
        return status;
    /* LMDB uses the meta page with the larger transaction id among the valid ones. */
    uint64_t best_txn = 0, last_page = 0;
    bool any = false;
    for (int m = 0; m < 2; m++) {
        const uint8_t *meta = pages[m] + META_OFFSET;
        if (le32(meta) != META_MAGIC)
            continue;
        uint64_t txn = le64(meta + META_TXNID_AT), last = le64(meta + META_LAST_PAGE_AT);
        uint64_t roots[2] = {le64(meta + META_DBS_AT + DB_ROOT_AT),
                             le64(meta + META_DBS_AT + META_DB_BYTES + DB_ROOT_AT)};
        for (int d = 0; d < 2; d++)
            if (roots[d] != UINT64_MAX && roots[d] > last)
                return damaged(e, "a meta page names a root beyond its last page");
        if (!any || txn > best_txn) {
            best_txn = txn;
            last_page = last;
            any = true;
        }
    }
    if (!any)
        return damaged(e, "both meta pages are invalid");
    if (last_page >= UINT64_MAX / psize || (last_page + 1) * psize > size) {
        char why[160];
        snprintf(why, sizeof why, "truncated: %llu bytes, its pages end at %llu",
                 (unsigned long long)size, (unsigned long long)((last_page + 1) * (uint64_t)psize));
        return damaged(e, why);
    }
    return MS_OK;
}

int space_short_file(const store_env *e)
{
    struct stat st;
    long page = sysconf(_SC_PAGESIZE);
    if (stat(e->path, &st) != 0)
        return MS_OK;
    if (st.st_size == 0)
        return damaged(e, "the file is empty");
    if (st.st_size < 2 * page)
        return damaged(e, "truncated inside LMDB's meta pages");
    return MS_OK;
}

bool space_value_in_file(const store_env *e, const MDB_val *value)
{
    MDB_envinfo info;
    mdb_env_info(e->env, &info);
    const uint8_t *data = value->mv_data;
    uint64_t end = ((uint64_t)info.me_last_pgno + 1) * e->page_bytes;
    if (!e->map_begin)
        return true; /* the map was not found: nothing to check against */
    return data >= e->map_begin && (uint64_t)(data - e->map_begin) <= end &&
           value->mv_size <= end - (uint64_t)(data - e->map_begin);
}

int space_reserve(const store_env *e, uint64_t bytes)
{
    mdb_filehandle_t fd;
    if (mdb_env_get_fd(e->env, &fd))
        return MS_FAIL(MS_ERR_STATE, "%s is not open", e->path);
    int err = posix_fallocate(fd, 0, (off_t)bytes);
    if (err)
        return MS_FAIL(err, "%s: cannot reserve %llu bytes of file space: %s", e->path,
                       (unsigned long long)bytes, strerror(err));
    return MS_OK;
}

int space_trim(const store_env *e)
{
    mdb_filehandle_t fd;
    MDB_envinfo info;
    struct stat st;
    if (mdb_env_get_fd(e->env, &fd) || fstat(fd, &st))
        return MS_OK;
    mdb_env_info(e->env, &info);
    off_t keep = (off_t)(((uint64_t)info.me_last_pgno + 1) * e->page_bytes + STORE_SPARE_BYTES);
    if (st.st_size > keep && ftruncate(fd, keep) != 0)
        return MS_FAIL(errno, "%s: cannot trim the file to its %lld used and spare bytes: %s",
                       e->path, (long long)keep, strerror(errno));
    return MS_OK;
}

int space_in_file(const store_env *e, uint64_t *bytes)
{
    mdb_filehandle_t fd;
    MDB_envinfo info;
    struct stat st;
    if (mdb_env_get_fd(e->env, &fd) || fstat(fd, &st))
        return MS_FAIL(MS_ERR_STATE, "%s is not open", e->path);
    mdb_env_info(e->env, &info);
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * e->page_bytes;
    uint64_t size = (uint64_t)st.st_size / e->page_bytes * e->page_bytes;
    *bytes = size > used ? size : used;
    return space_reserve(e, *bytes);
}

void space_keep_spare(const store_env *e)
{
    mdb_filehandle_t fd;
    MDB_envinfo info;
    if (mdb_env_get_fd(e->env, &fd))
        return;
    mdb_env_info(e->env, &info);
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * e->page_bytes;
    if (fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)used, (off_t)STORE_SPARE_BYTES) != 0) {
        /* no room, or a file system without it: the next commit asks the disk as before */
    }
}

int space_reserve_lock_file(const store_env *e)
{
    char path[4096];
    snprintf(path, sizeof path, "%s-lock", e->path);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return errno == EACCES || errno == EROFS ? MS_OK /* read-only media: no lock file */
                                                 : MS_FAIL(errno, "%s: %s", path, strerror(errno));
    struct stat st;
    int err = fstat(fd, &st) ? errno : 0;
    if (!err && st.st_size < LOCK_FILE_BYTES)
        err = posix_fallocate(fd, 0, LOCK_FILE_BYTES);
    close(fd);
    return err ? MS_FAIL(err, "%s: cannot reserve the lock file's space: %s", path, strerror(err))
               : MS_OK;
}
