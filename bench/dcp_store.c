/* moonshard bench: checkpoint store throughput against the raw file baseline in the same run.
 * Prints one JSON line per rank count: durable save vs write()+fsync, load vs read(), and a
 * resharded load (each destination overlaps two stored chunks), medians of several rounds.
 *
 *   cc -O2 -D_GNU_SOURCE -Iruntime bench/dcp_store.c -Lbuild -lmoonshard -Wl,-rpath,$PWD/build \
 *      -o build/dcp_store && build/dcp_store [total MiB = 1024] [ranks = 1,2,4] [rounds = 3]
 *
 * Ranks are forked processes, each with 1/ranks of every tensor's rows; rank 0 merges the
 * chunk tables (sent through pipes) and commits the manifest. Reads are of data the run just
 * wrote (warm page cache) for both the store and the baseline; set COLD=1 to evict the files
 * from the page cache (posix_fadvise) before each read phase. bench/dcp.lua measures the
 * same phases end to end through ms.dcp; this one isolates the store from the Lua layer. */
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ms.h"

enum { TENSORS = 32, MAX_RANKS = 16, MAX_ROUNDS = 9 };
enum { PHASE_RAW_WRITE, PHASE_SAVE, PHASE_RAW_READ, PHASE_LOAD, PHASE_RESHARD, PHASE_COUNT };
static const char *const PHASE_NAMES[] = {"raw_write_fsync", "save", "raw_read", "load",
                                          "reshard_load"};

static int64_t rows_per_tensor, columns = 4096;
static int ranks;
static char directory[512];
static bool cold;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void die(const char *what, int status)
{
    fprintf(stderr, "dcp_store: %s: %s: %s\n", what, ms_strerror(status), ms_last_error());
    exit(1);
}

static void check(int status, const char *what)
{
    if (status)
        die(what, status);
}

static void rows_of(int rank, int parts, int64_t *first, int64_t *count)
{
    int64_t c = (rows_per_tensor + parts - 1) / parts;
    *first = rank * c < rows_per_tensor ? rank * c : rows_per_tensor;
    int64_t end = (rank + 1) * c < rows_per_tensor ? (rank + 1) * c : rows_per_tensor;
    *count = end - *first;
}

static void evict(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

/* Before a read phase in a cold run: drop the files it reads from the page cache. */
static void evict_for(int phase)
{
    char path[600];
    for (int r = 0; cold && phase >= PHASE_RAW_READ && r < ranks; r++) {
        if (phase == PHASE_RAW_READ)
            snprintf(path, sizeof path, "%s/raw-%d.bin", directory, r);
        else
            snprintf(path, sizeof path, "%s/shard-%d.mdb", directory, r);
        evict(path);
    }
}

/* ---- one rank's work per phase ---- */

static void raw_write(int rank, ms_tensor **local)
{
    char path[600];
    snprintf(path, sizeof path, "%s/raw-%d.bin", directory, rank);
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    for (int t = 0; t < TENSORS; t++) {
        const char *p = ms_tensor_data(local[t]);
        size_t left = ms_tensor_nbytes(local[t]);
        while (left) {
            ssize_t n = write(fd, p, left);
            if (n <= 0)
                die("raw write", 5);
            p += n;
            left -= (size_t)n;
        }
    }
    fsync(fd);
    close(fd);
}

static void raw_read(int rank, ms_tensor **local)
{
    char path[600];
    snprintf(path, sizeof path, "%s/raw-%d.bin", directory, rank);
    int fd = open(path, O_RDONLY);
    for (int t = 0; t < TENSORS; t++) {
        char *p = ms_tensor_data(local[t]);
        size_t left = ms_tensor_nbytes(local[t]);
        while (left) {
            ssize_t n = read(fd, p, left);
            if (n <= 0)
                die("raw read", 5);
            p += n;
            left -= (size_t)n;
        }
    }
    close(fd);
}

static int64_t step_of_round(int round)
{
    return 1000 + round;
}

static void save(int rank, ms_tensor **local, int round, int *table_pipes)
{
    ms_store *s;
    char fqn[64];
    int64_t gshape[2] = {rows_per_tensor, columns}, offsets[2] = {0, 0}, count;
    rows_of(rank, ranks, &offsets[0], &count);
    check(ms_store_open(&s, directory, MS_STORE_READ_WRITE), "open");
    check(ms_store_begin(s, step_of_round(round), rank, MS_STORE_FOREGROUND), "begin");
    for (int t = 0; t < TENSORS; t++) {
        snprintf(fqn, sizeof fqn, "model.layers.%d.weight", t);
        check(ms_store_put_tensor(s, fqn, local[t], gshape, offsets), "put");
    }
    check(ms_store_commit_data(s), "commit data");
    const void *table;
    int64_t size;
    check(ms_store_chunk_table(s, &table, &size), "chunk table");
    if (rank) {
        if (write(table_pipes[2 * rank + 1], &size, sizeof size) != sizeof size ||
            write(table_pipes[2 * rank + 1], table, (size_t)size) != size)
            die("send table", 5);
    } else {
        for (int r = 1; r < ranks; r++) {
            int64_t n;
            if (read(table_pipes[2 * r], &n, sizeof n) != sizeof n)
                die("receive table", 5);
            char *bytes = malloc((size_t)n);
            for (int64_t got = 0; got < n;)
                got += read(table_pipes[2 * r], bytes + got, (size_t)(n - got));
            check(ms_store_merge_chunk_table(s, bytes, n), "merge");
            free(bytes);
        }
        check(ms_store_commit_manifest(s, ranks), "commit manifest");
    }
    ms_store_close(s);
}

static void load(int rank, ms_tensor **local, int round, bool reshard)
{
    ms_store *s;
    char fqn[64];
    check(ms_store_open(&s, directory, MS_STORE_READ_ONLY), "open");
    int64_t first, count;
    rows_of(rank, ranks, &first, &count);
    for (int t = 0; t < TENSORS; t++) {
        snprintf(fqn, sizeof fqn, "model.layers.%d.weight", t);
        if (!reshard) {
            int64_t offsets[2] = {first, 0};
            check(ms_store_read_tensor(s, step_of_round(round), fqn, local[t], offsets), "read");
            continue;
        }
        /* The same rows shifted by half a slab (wrapping), so each piece spans two chunks. */
        int64_t start = (first + count / 2) % rows_per_tensor, done = 0;
        while (done < count) {
            int64_t piece =
                rows_per_tensor - start < count - done ? rows_per_tensor - start : count - done;
            ms_tensor *view;
            check(ms_tensor_view(&view, local[t], 2, (int64_t[]){piece, columns}, NULL,
                                 local[t]->offset + done * columns),
                  "view");
            check(ms_store_read_tensor(s, step_of_round(round), fqn, view, (int64_t[]){start, 0}),
                  "read resharded");
            ms_tensor_free(view);
            done += piece;
            start = (start + piece) % rows_per_tensor;
        }
    }
    ms_store_close(s);
}

/* ---- processes ---- */

static void run_rank(int rank, int rounds, int *go, int *done, int *table_pipes)
{
    ms_tensor *local[TENSORS];
    int64_t first, count;
    rows_of(rank, ranks, &first, &count);
    for (int t = 0; t < TENSORS; t++) {
        check(ms_tensor_new(&local[t], MS_F32, 2, (int64_t[]){count, columns}, MS_POOL_CPU),
              "tensor");
        float *v = ms_tensor_data(local[t]);
        for (int64_t i = 0; i < count * columns; i++)
            v[i] = (float)((first * columns + i) % 1000003) * 0.5f + (float)t;
    }
    for (int round = 0; round < rounds; round++)
        for (int phase = 0; phase < PHASE_COUNT; phase++) {
            char byte;
            if (read(go[2 * rank], &byte, 1) != 1)
                _exit(1);
            switch (phase) {
            case PHASE_RAW_WRITE:
                raw_write(rank, local);
                break;
            case PHASE_SAVE:
                save(rank, local, round, table_pipes);
                break;
            case PHASE_RAW_READ:
                raw_read(rank, local);
                break;
            case PHASE_LOAD:
                load(rank, local, round, false);
                break;
            default:
                load(rank, local, round, true);
                break;
            }
            if (write(done[1], &byte, 1) != 1)
                _exit(1);
        }
    _exit(0);
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void bench(int64_t total_bytes, int rank_count, int rounds)
{
    ranks = rank_count;
    rows_per_tensor = total_bytes / TENSORS / columns / 4;
    snprintf(directory, sizeof directory, "%s/ms-dcp-bench-%d",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    char command[700];
    snprintf(command, sizeof command, "rm -rf '%s' && mkdir -p '%s'", directory, directory);
    if (system(command) != 0)
        die("mkdir", 5);
    int go[2 * MAX_RANKS], done[2], table_pipes[2 * MAX_RANKS];
    if (pipe(done))
        die("pipe", 5);
    pid_t pids[MAX_RANKS];
    for (int r = 0; r < ranks; r++)
        if (pipe(&go[2 * r]) || pipe(&table_pipes[2 * r]))
            die("pipe", 5);
    for (int r = 0; r < ranks; r++)
        if ((pids[r] = fork()) == 0)
            run_rank(r, rounds, go, done, table_pipes);
    double seconds[PHASE_COUNT][MAX_ROUNDS];
    for (int round = 0; round < rounds; round++) {
        for (int phase = 0; phase < PHASE_COUNT; phase++) {
            evict_for(phase);
            double start = now();
            for (int r = 0; r < ranks; r++)
                if (write(go[2 * r + 1], "g", 1) != 1)
                    die("go", 5);
            for (int r = 0; r < ranks; r++) {
                char byte;
                if (read(done[0], &byte, 1) != 1)
                    die("a rank died", 5);
            }
            seconds[phase][round] = now() - start;
        }
        if (round + 1 < rounds) {
            ms_store *s;
            check(ms_store_open(&s, directory, MS_STORE_READ_WRITE), "open");
            check(ms_store_keep_last(s, 1), "keep_last");
            ms_store_close(s);
        }
    }
    for (int r = 0; r < ranks; r++)
        waitpid(pids[r], NULL, 0);
    double gbps[PHASE_COUNT];
    for (int phase = 0; phase < PHASE_COUNT; phase++) {
        qsort(seconds[phase], (size_t)rounds, sizeof(double), compare_doubles);
        gbps[phase] = (double)total_bytes / seconds[phase][rounds / 2] / 1e9;
    }
    printf("{\"bench\": \"dcp_store\", \"ranks\": %d, \"bytes\": %lld, \"rounds\": %d, "
           "\"cold\": %s",
           ranks, (long long)(rows_per_tensor * columns * 4 * TENSORS), rounds,
           cold ? "true" : "false");
    for (int phase = 0; phase < PHASE_COUNT; phase++)
        printf(", \"%s_gbps\": %.3f", PHASE_NAMES[phase], gbps[phase]);
    printf(", \"save_vs_raw\": %.2f, \"load_vs_raw\": %.2f, \"reshard_load_vs_raw\": %.2f}\n",
           gbps[PHASE_SAVE] / gbps[PHASE_RAW_WRITE], gbps[PHASE_LOAD] / gbps[PHASE_RAW_READ],
           gbps[PHASE_RESHARD] / gbps[PHASE_RAW_READ]);
    fflush(stdout);
    snprintf(command, sizeof command, "rm -rf '%s'", directory);
    if (system(command) != 0)
        die("cleanup", 5);
}

int main(int argc, char **argv)
{
    int64_t mib = argc > 1 ? atoll(argv[1]) : 1024;
    const char *rank_list = argc > 2 ? argv[2] : "1,2,4";
    int rounds = argc > 3 ? atoi(argv[3]) : 3;
    cold = getenv("COLD") && atoi(getenv("COLD"));
    if (rounds < 1 || rounds > MAX_ROUNDS || mib < 1)
        die("arguments: [total MiB] [ranks list] [rounds 1..9]", MS_ERR_INVALID);
    for (const char *p = rank_list; *p;) {
        int n = atoi(p);
        if (n < 1 || n > MAX_RANKS)
            die("ranks must be in [1, 16]", MS_ERR_INVALID);
        bench(mib << 20, n, rounds);
        p = strchr(p, ',') ? strchr(p, ',') + 1 : p + strlen(p);
    }
    return 0;
}
