/* moonshard kernels: softmax and log_softmax on the device, one block per row; the row's
 * max and sums go through fixed-order block reductions in double. dx is assigned. bf16 and
 * f16 are read and written as they are, computed in f32. */
#include "softmax.cuh"
#include "block.cuh"
#include "value.cuh"

/* ---- kernels ---- */

enum { LOG_SOFTMAX = 1, SAFE_SOFTMAX = 2 }; /* ops.h's MS_LOG_SOFTMAX, MS_SAFE_SOFTMAX */

/* S: the stored element type; T: the type computed in. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void softmax_kernel(ms_cu_shape rows, ms_cu_operand out, ms_cu_operand x,
                               int64_t length, int64_t out_step, int64_t x_step, int kind)
{
    __shared__ double scratch[MS_CU_THREADS];
    for (int64_t r = blockIdx.x; r < rows.numel; r += gridDim.x) {
        const S *in = (const S *)x.data + ms_cu_offset(rows, x.strides, r);
        S *result = (S *)out.data + ms_cu_offset(rows, out.strides, r);
        double local_max = -INFINITY;
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
            double v = (double)ms_cu_widen(in[k * x_step]);
            if (v > local_max || v != v)
                local_max = v;
        }
        T max = (T)ms_cu_block_max(local_max, scratch);
        if (kind == SAFE_SOFTMAX && max == (T)-INFINITY) {
            for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
                ms_cu_narrow(&result[k * out_step], (T)0);
            continue;
        }
        double local_sum = 0.0;
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
            local_sum += (double)exp(ms_cu_widen(in[k * x_step]) - max);
        double sum = ms_cu_block_sum(local_sum, scratch);
        if (kind == LOG_SOFTMAX) {
            T log_sum = (T)::log(sum);
            for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
                ms_cu_narrow(&result[k * out_step], (ms_cu_widen(in[k * x_step]) - max) - log_sum);
        } else {
            T inverse = (T)(1.0 / sum);
            for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
                ms_cu_narrow(&result[k * out_step],
                             exp(ms_cu_widen(in[k * x_step]) - max) * inverse);
        }
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void softmax_backward_kernel(ms_cu_shape rows, ms_cu_operand dx, ms_cu_operand y,
                                        ms_cu_operand dy, int64_t length, int64_t dx_step,
                                        int64_t y_step, int64_t dy_step, int log)
{
    __shared__ double scratch[MS_CU_THREADS];
    for (int64_t r = blockIdx.x; r < rows.numel; r += gridDim.x) {
        S *grad_in = (S *)dx.data + ms_cu_offset(rows, dx.strides, r);
        const S *out = (const S *)y.data + ms_cu_offset(rows, y.strides, r);
        const S *grad_out = (const S *)dy.data + ms_cu_offset(rows, dy.strides, r);
        double local = 0.0;
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
            double g = (double)ms_cu_widen(grad_out[k * dy_step]);
            local += log ? g : g * (double)ms_cu_widen(out[k * y_step]);
        }
        T total = (T)ms_cu_block_sum(local, scratch);
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
            T g = ms_cu_widen(grad_out[k * dy_step]), v = ms_cu_widen(out[k * y_step]);
            ms_cu_narrow(&grad_in[k * dx_step], log ? g - exp(v) * total : v * (g - total));
        }
    }
}

/* ---- launchers ---- */

static unsigned row_blocks(int64_t rows) { return (unsigned)(rows < 65535 ? rows : 65535); }

int ms_cu_softmax(cudaStream_t stream, const ms_cu_shape *rows, ms_cu_operand out,
                  ms_cu_operand x, int64_t length, const int64_t *dim_strides, int dtype,
                  int kind)
{
    MS_CU_LAUNCH_FLOAT(dtype, softmax_kernel, row_blocks(rows->numel), MS_CU_THREADS, stream,
                       *rows, out, x, length, dim_strides[0], dim_strides[1], kind)
    return ms_cu_last_error();
}

int ms_cu_softmax_backward(cudaStream_t stream, const ms_cu_shape *rows, ms_cu_operand dx,
                           ms_cu_operand y, ms_cu_operand dy, int64_t length,
                           const int64_t *dim_strides, int dtype, int log)
{
    MS_CU_LAUNCH_FLOAT(dtype, softmax_backward_kernel, row_blocks(rows->numel), MS_CU_THREADS,
                       stream, *rows, dx, y, dy, length, dim_strides[0], dim_strides[1],
                       dim_strides[2], log)
    return ms_cu_last_error();
}
