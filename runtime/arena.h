/* moonshard runtime: an arena of address space that a pool's large blocks are carved from
 * (runtime/arena.c; installed with ms_pool_use_arena). Not thread-safe: its pool's lock
 * guards it. */
#ifndef MS_ARENA_H
#define MS_ARENA_H

#include <stddef.h>

typedef struct ms_arena ms_arena;

/* An arena over [base, base + bytes), all of it free; NULL without host memory. */
ms_arena *ms_arena_new(void *base, size_t bytes);
/* Forget the arena's bookkeeping (its memory belongs to whoever mapped it). */
void ms_arena_delete(ms_arena *a);
/* 1 when p lies in the arena. */
int ms_arena_owns(const ms_arena *a, const void *p);
/* bytes at a multiple of align (a power of two), or NULL when no free extent fits. */
void *ms_arena_alloc(ms_arena *a, size_t bytes, size_t align);
/* Return [p, p + bytes) from ms_arena_alloc, its whole pages to the system. */
void ms_arena_free(ms_arena *a, void *p, size_t bytes);

#endif
