/* moonshard kernels: softmax and log_softmax on the device, one block per row; the row's
 * max and sums go through fixed-order block reductions in double. dx is assigned. */
#include "softmax.cuh"
#include "block.cuh"

enum { F32 = 0 };

/* ---- kernels ---- */

template <typename T>
__global__ void softmax_kernel(ms_cu_shape rows, ms_cu_operand out, ms_cu_operand x,
                               int64_t length, int64_t out_step, int64_t x_step, int log)
{
    __shared__ double scratch[MS_CU_THREADS];
    for (int64_t r = blockIdx.x; r < rows.numel; r += gridDim.x) {
        const T *in = (const T *)x.data + ms_cu_offset(rows, x.strides, r);
        T *result = (T *)out.data + ms_cu_offset(rows, out.strides, r);
        double local_max = -INFINITY;
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
            double v = (double)in[k * x_step];
            if (v > local_max || v != v)
                local_max = v;
        }
        T max = (T)ms_cu_block_max(local_max, scratch);
        double local_sum = 0.0;
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
            local_sum += (double)exp(in[k * x_step] - max);
        double sum = ms_cu_block_sum(local_sum, scratch);
        if (log) {
            T log_sum = (T)::log(sum);
            for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
                result[k * out_step] = (in[k * x_step] - max) - log_sum;
        } else {
            T inverse = (T)(1.0 / sum);
            for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
                result[k * out_step] = exp(in[k * x_step] - max) * inverse;
        }
    }
}

template <typename T>
__global__ void softmax_backward_kernel(ms_cu_shape rows, ms_cu_operand dx, ms_cu_operand y,
                                        ms_cu_operand dy, int64_t length, int64_t dx_step,
                                        int64_t y_step, int64_t dy_step, int log)
{
    __shared__ double scratch[MS_CU_THREADS];
    for (int64_t r = blockIdx.x; r < rows.numel; r += gridDim.x) {
        T *grad_in = (T *)dx.data + ms_cu_offset(rows, dx.strides, r);
        const T *out = (const T *)y.data + ms_cu_offset(rows, y.strides, r);
        const T *grad_out = (const T *)dy.data + ms_cu_offset(rows, dy.strides, r);
        double local = 0.0;
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x)
            local += log ? (double)grad_out[k * dy_step]
                         : (double)grad_out[k * dy_step] * (double)out[k * y_step];
        T total = (T)ms_cu_block_sum(local, scratch);
        for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
            T g = grad_out[k * dy_step], v = out[k * y_step];
            grad_in[k * dx_step] = log ? g - exp(v) * total : v * (g - total);
        }
    }
}

/* ---- launchers ---- */

static unsigned row_blocks(int64_t rows) { return (unsigned)(rows < 65535 ? rows : 65535); }

int ms_cu_softmax(cudaStream_t stream, const ms_cu_shape *rows, ms_cu_operand out,
                  ms_cu_operand x, int64_t length, const int64_t *dim_strides, int dtype,
                  int log)
{
    unsigned blocks = row_blocks(rows->numel);
    if (dtype == F32)
        softmax_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *rows, out, x, length, dim_strides[0], dim_strides[1], log);
    else
        softmax_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *rows, out, x, length, dim_strides[0], dim_strides[1], log);
    return ms_cu_last_error();
}

int ms_cu_softmax_backward(cudaStream_t stream, const ms_cu_shape *rows, ms_cu_operand dx,
                           ms_cu_operand y, ms_cu_operand dy, int64_t length,
                           const int64_t *dim_strides, int dtype, int log)
{
    unsigned blocks = row_blocks(rows->numel);
    if (dtype == F32)
        softmax_backward_kernel<float><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *rows, dx, y, dy, length, dim_strides[0], dim_strides[1], dim_strides[2], log);
    else
        softmax_backward_kernel<double><<<blocks, MS_CU_THREADS, 0, stream>>>(
            *rows, dx, y, dy, length, dim_strides[0], dim_strides[1], dim_strides[2], log);
    return ms_cu_last_error();
}
