/* moonshard runtime: helpers shared by the runtime's own .c files (not part of the FFI).
 * Error recording and the check macros that carry __FILE__:__LINE__ upward. */
#ifndef MS_INTERNAL_H
#define MS_INTERNAL_H

#include <stdarg.h>
#include "ms.h"

/* Record this thread's detailed message (printf format) with the failing site and return
 * status unchanged, so a failure reads: return MS_FAIL(MS_ERR_SHAPE, "matmul: ..."). */
int ms_fail_at(const char *file, int line, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define MS_FAIL(status, ...) ms_fail_at(__FILE__, __LINE__, (status), __VA_ARGS__)

/* Propagate a non-zero status from a runtime call. */
#define MS_CHECK(expr)                        \
    do {                                      \
        int ms_check_status_ = (expr);        \
        if (ms_check_status_ != 0)            \
            return ms_check_status_;          \
    } while (0)

/* "[2, 3]" into buf (for messages); returns buf. */
const char *ms_shape_str(char *buf, size_t size, int ndim, const int64_t *shape);

/* Element size and row-major strides (elements) of shape. */
void ms_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides);

/* 1 when a and b have the same shape. */
int ms_shapes_match(const ms_tensor *a, const ms_tensor *b);
/* 1 when src broadcasts to dst's shape (numpy rules, aligned right). */
int ms_broadcasts(const ms_tensor *src, const ms_tensor *dst);

/* Validate a tensor pointer argument for op (non-NULL, known dtype): MS_ERR_INVALID. */
int ms_check_tensor(const char *op, const char *name, const ms_tensor *t);

/* ---- interrupts (interrupt.c) ---- */
/* When a signal is pending, take it and fail with MS_ERR_INTERRUPTED
 * ("<what>: interrupted by SIGINT"); in_wait says the caller is inside a started
 * collective, which polls only while waits are interruptible. Else 0. */
int ms_interrupt_check(const char *what, int in_wait);
/* Handle SIGINT and SIGTERM until ms_interrupt_pop puts back the
 * dispositions saved[0] (SIGINT) and saved[1] (SIGTERM) held before. */
struct sigaction;
int ms_interrupt_push(struct sigaction *saved);
void ms_interrupt_pop(const struct sigaction *saved);

/* Set this process's thread count to its share of the usable cores when local_ranks
 * processes share them (at least 1), or to MOONSHARD_NUM_THREADS when that is set
 * (runtime/threads.c). Local ranks call it right after fork. */
void ms_threads_share_cores(int local_ranks);

/* From now on the cpu pool carves its blocks of at least min_block bytes from [base, base +
 * bytes) (runtime/arena.c), falling back to private memory when the range is full; blocks
 * already cached stay where they are. Once per process: the local backend gives each forked
 * rank its slice of a heap shared by the job's ranks. */
int ms_pool_use_arena(void *base, size_t bytes, size_t min_block);
/* 1 when [p, p + bytes) lies in the cpu pool's arena. */
int ms_pool_in_arena(const void *p, size_t bytes);

#endif
