/* moonshard CPU backend: per-thread scratch buffers kept for the thread's life, one per use
 * (ms_cpu_scratch_slot), grown on demand. Like oneDNN's packing buffers they are not tensor
 * memory and are not in ms_memory_stats; keeping them spares each call a fresh mapping and
 * its page faults. */
#include <pthread.h>
#include <stdlib.h>

#include "cpu.h"

typedef struct scratch {
    size_t capacity;
    void *data;
} scratch;

static pthread_key_t keys[MS_SCRATCH_SLOTS];
static pthread_once_t keys_once = PTHREAD_ONCE_INIT;

static void free_scratch(void *p)
{
    scratch *s = p;
    free(s->data);
    free(s);
}

static void make_keys(void)
{
    for (int i = 0; i < MS_SCRATCH_SLOTS; i++)
        pthread_key_create(&keys[i], free_scratch);
}

int ms_cpu_scratch(const char *op, int slot, size_t nbytes, void **ptr)
{
    pthread_once(&keys_once, make_keys);
    scratch *s = pthread_getspecific(keys[slot]);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(keys[slot], s) != 0) {
            free(s);
            return MS_FAIL(MS_ERR_OOM, "%s: out of host memory for its scratch", op);
        }
    }
    if (s->capacity < nbytes) {
        void *grown = NULL;
        if (posix_memalign(&grown, 64, nbytes) != 0)
            return MS_FAIL(MS_ERR_OOM, "%s: out of host memory for %zu bytes of scratch", op,
                           nbytes);
        free(s->data);
        s->data = grown;
        s->capacity = nbytes;
    }
    *ptr = s->data;
    return MS_OK;
}
