/* moonshard runtime: status codes and the thread-local detailed error message.
 * ms_strerror names any status (moonshard's block or errno); MS_FAIL records details. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

static _Thread_local char last_error[1024];
static _Thread_local char last_error_site[128];

const char *ms_strerror(int status)
{
    switch (status) {
    case MS_OK: return "success";
    case MS_ERR_INVALID: return "invalid argument";
    case MS_ERR_SHAPE: return "shape mismatch";
    case MS_ERR_DTYPE: return "dtype not supported or mismatched";
    case MS_ERR_OOM: return "out of memory";
    case MS_ERR_PEER_DIED: return "a peer rank died";
    case MS_ERR_TIMEOUT: return "timed out waiting for a peer rank";
    case MS_ERR_CORRUPT: return "data is corrupt";
    case MS_ERR_NOT_FOUND: return "not found";
    case MS_ERR_INDEX: return "index out of range";
    case MS_ERR_DEVICE: return "device not available";
    case MS_ERR_STATE: return "object is in the wrong state for this call";
    case MS_ERR_UNSUPPORTED: return "not supported by this build";
    case MS_ERR_VERSION: return "written by a newer format version";
    case MS_ERR_MISMATCH: return "ranks disagree about a collective";
    case MS_ERR_INTERRUPTED: return "interrupted by a signal";
    default: break;
    }
    if (status > 0)
        return strerror(status);
    return "unknown moonshard status";
}

const char *ms_last_error(void) { return last_error; }

const char *ms_last_error_site(void) { return last_error_site; }

int ms_fail_at(const char *file, int line, int status, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    const char *base = strrchr(file, '/');
    snprintf(last_error_site, sizeof last_error_site, "%s:%d", base ? base + 1 : file, line);
    return status;
}

const char *ms_shape_str(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, d ? ", %lld" : "%lld",
                                 (long long)shape[d]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
    return buf;
}
