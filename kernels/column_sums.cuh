/* moonshard kernels: sums over the rows of each column of a [rows, cols] computation on the
 * device (a bias's or a norm's parameter gradient), in an order fixed by the shape alone.
 * A block takes 32 columns of one chunk of MS_CU_CHUNK_ROWS rows: its 8 row lanes each walk
 * every 8th row of the chunk (a warp reads 32 adjacent columns of one row), the lanes' sums
 * are added in lane order, and each chunk's sum goes to a partial that a second kernel adds
 * in chunk order. Every element is visited by a thread of its own, unlike one thread per
 * column walking every row, which leaves most of the device idle. */
#ifndef MS_KERNELS_COLUMN_SUMS_CUH
#define MS_KERNELS_COLUMN_SUMS_CUH

#include "common.h"
#include "launch.cuh"

enum { MS_CU_COLUMN_TILE = 32, MS_CU_ROW_LANES = 8, MS_CU_CHUNK_ROWS = 256 };

/* Row chunks of a computation with rows rows: the partial sums per column a caller's scratch
 * (doubles) holds. */
MS_HD int64_t ms_cu_column_chunks(int64_t rows)
{
    return rows > 0 ? (rows + MS_CU_CHUNK_ROWS - 1) / MS_CU_CHUNK_ROWS : 1;
}

#ifdef __CUDACC__
MS_HD int64_t ms_cu_column_tiles(int64_t cols)
{
    return (cols + MS_CU_COLUMN_TILE - 1) / MS_CU_COLUMN_TILE;
}

/* Blocks of a [rows, cols] computation; a kernel loops over them from blockIdx.x in steps
 * of gridDim.x (every thread of a CUDA block visits the same ones, so it may synchronise). */
MS_HD int64_t ms_cu_column_blocks(int64_t rows, int64_t cols)
{
    return ms_cu_column_tiles(cols) * ms_cu_column_chunks(rows);
}
static inline unsigned ms_cu_column_grid(int64_t rows, int64_t cols)
{
    int64_t blocks = ms_cu_column_blocks(rows, cols);
    return (unsigned)(blocks < 1 ? 1 : blocks > 65535 ? 65535 : blocks);
}
static inline dim3 ms_cu_column_threads(void) { return dim3(MS_CU_COLUMN_TILE, MS_CU_ROW_LANES); }

/* What one thread of block b does: column col (maybe past the last column), rows first,
 * first + MS_CU_ROW_LANES, ... below last, for partial chunk. */
typedef struct ms_cu_column_block {
    int64_t col, first, last, chunk;
} ms_cu_column_block;

__device__ __forceinline__ ms_cu_column_block ms_cu_column_block_of(int64_t b, int64_t rows,
                                                                    int64_t cols)
{
    int64_t tiles = ms_cu_column_tiles(cols);
    ms_cu_column_block t;
    t.chunk = b / tiles;
    t.col = (b % tiles) * MS_CU_COLUMN_TILE + threadIdx.x;
    t.first = t.chunk * MS_CU_CHUNK_ROWS + threadIdx.y;
    int64_t end = (t.chunk + 1) * MS_CU_CHUNK_ROWS;
    t.last = end < rows ? end : rows;
    return t;
}

/* The lanes' values for this block's columns added in lane order; the total is returned to
 * every thread. Every thread of the block calls it. */
__device__ __forceinline__ double ms_cu_lanes_total(double value)
{
    __shared__ double lanes[MS_CU_ROW_LANES][MS_CU_COLUMN_TILE];
    lanes[threadIdx.y][threadIdx.x] = value;
    __syncthreads();
    double total = lanes[0][threadIdx.x];
    for (int y = 1; y < MS_CU_ROW_LANES; y++)
        total += lanes[y][threadIdx.x];
    __syncthreads();
    return total;
}

/* Column col's sum: its chunks' partials (chunk c at partials[c * stride + col]) in order. */
__device__ __forceinline__ double ms_cu_chunks_total(const double *partials, int64_t chunks,
                                                    int64_t stride, int64_t col)
{
    double total = partials[col];
    for (int64_t c = 1; c < chunks; c++)
        total += partials[c * stride + col];
    return total;
}
#endif

#endif
