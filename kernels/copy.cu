/* moonshard kernels: the copy family on the device: converting copies, fill, arange and the
 * comparisons behind ms_equal and ms_allclose. Outputs are assigned. */
#include "copy.cuh"
#include "value.cuh"

/* ---- kernels ---- */

template <typename T>
__global__ void same_dtype_copy(ms_cu_shape shape, ms_cu_operand dst, ms_cu_operand src)
{
    MS_CU_FOR(i, shape.numel)
    {
        ((T *)dst.data)[ms_cu_offset(shape, dst.strides, i)] =
            ((const T *)src.data)[ms_cu_offset(shape, src.strides, i)];
    }
}

__global__ void converting_copy(ms_cu_shape shape, ms_cu_operand dst, int dst_dtype,
                                ms_cu_operand src, int src_dtype)
{
    int dst_size = ms_cu_dtype_size(dst_dtype), src_size = ms_cu_dtype_size(src_dtype);
    MS_CU_FOR(i, shape.numel)
    {
        const char *from = (const char *)src.data + ms_cu_offset(shape, src.strides, i) * src_size;
        char *to = (char *)dst.data + ms_cu_offset(shape, dst.strides, i) * dst_size;
        ms_cu_store(dst_dtype, to, ms_cu_load(src_dtype, from));
    }
}

template <typename T>
__global__ void fill_bits(ms_cu_shape shape, ms_cu_operand dst, T value)
{
    MS_CU_FOR(i, shape.numel)
    {
        ((T *)dst.data)[ms_cu_offset(shape, dst.strides, i)] = value;
    }
}

__global__ void arange_values(ms_cu_shape shape, ms_cu_operand dst, int dtype, double start,
                              double step, int exact_int, int64_t start_int, int64_t step_int)
{
    int size = ms_cu_dtype_size(dtype);
    MS_CU_FOR(i, shape.numel)
    {
        char *to = (char *)dst.data + ms_cu_offset(shape, dst.strides, i) * size;
        if (dtype == MS_CU_F32) {
            *(float *)to = (float)(start + (double)i * step);
        } else if (dtype == MS_CU_F64) {
            *(double *)to = start + (double)i * step;
        } else {
            ms_cu_value v = {exact_int, start + (double)i * step, 0};
            if (exact_int)
                v.i = (int64_t)((uint64_t)start_int + (uint64_t)i * (uint64_t)step_int);
            ms_cu_store(dtype, to, v);
        }
    }
}

template <typename T>
__global__ void equal_bits(ms_cu_shape shape, ms_cu_operand a, ms_cu_operand b, int32_t *flag)
{
    MS_CU_FOR(i, shape.numel)
    {
        if (((const T *)a.data)[ms_cu_offset(shape, a.strides, i)] !=
            ((const T *)b.data)[ms_cu_offset(shape, b.strides, i)])
            *flag = 0;
    }
}

__global__ void close_values(ms_cu_shape shape, ms_cu_operand a, int a_dtype, ms_cu_operand b,
                             int b_dtype, double rtol, double atol, int32_t *flag)
{
    int a_size = ms_cu_dtype_size(a_dtype), b_size = ms_cu_dtype_size(b_dtype);
    MS_CU_FOR(i, shape.numel)
    {
        double x = ms_cu_as_double(ms_cu_load(
            a_dtype, (const char *)a.data + ms_cu_offset(shape, a.strides, i) * a_size));
        double y = ms_cu_as_double(ms_cu_load(
            b_dtype, (const char *)b.data + ms_cu_offset(shape, b.strides, i) * b_size));
        if (x != y && !(isfinite(x) && isfinite(y) && fabs(x - y) <= atol + rtol * fabs(y)))
            *flag = 0;
    }
}

/* ---- launchers ---- */

int ms_cu_copy(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dst, int dst_dtype,
               ms_cu_operand src, int src_dtype)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    if (dst_dtype != src_dtype) {
        converting_copy<<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, dst_dtype, src,
                                                               src_dtype);
        return ms_cu_last_error();
    }
    switch (dst_dtype) {
    case MS_CU_F64:
    case MS_CU_I64:
        same_dtype_copy<uint64_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, src);
        break;
    case MS_CU_BF16:
    case MS_CU_F16:
        same_dtype_copy<uint16_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, src);
        break;
    case MS_CU_U8:
        same_dtype_copy<uint8_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, src);
        break;
    default:
        same_dtype_copy<uint32_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, src);
        break;
    }
    return ms_cu_last_error();
}

int ms_cu_fill(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dst,
               size_t elem_size, uint64_t bits)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    switch (elem_size) {
    case 1:
        fill_bits<uint8_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, (uint8_t)bits);
        break;
    case 2:
        fill_bits<uint16_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, (uint16_t)bits);
        break;
    case 4:
        fill_bits<uint32_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, (uint32_t)bits);
        break;
    default: fill_bits<uint64_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, dst, bits); break;
    }
    return ms_cu_last_error();
}

int ms_cu_arange(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dst, int dtype,
                 double start, double step, int exact_int, int64_t start_int, int64_t step_int)
{
    arange_values<<<ms_cu_blocks(shape->numel), MS_CU_THREADS, 0, stream>>>(
        *shape, dst, dtype, start, step, exact_int, start_int, step_int);
    return ms_cu_last_error();
}

int ms_cu_equal(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a, ms_cu_operand b,
                size_t elem_size, int32_t *device_flag)
{
    unsigned blocks = ms_cu_blocks(shape->numel);
    switch (elem_size) {
    case 1:
        equal_bits<uint8_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, a, b, device_flag);
        break;
    case 2:
        equal_bits<uint16_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, a, b, device_flag);
        break;
    case 4:
        equal_bits<uint32_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, a, b, device_flag);
        break;
    default:
        equal_bits<uint64_t><<<blocks, MS_CU_THREADS, 0, stream>>>(*shape, a, b, device_flag);
        break;
    }
    return ms_cu_last_error();
}

int ms_cu_allclose(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a, int a_dtype,
                   ms_cu_operand b, int b_dtype, double rtol, double atol, int32_t *device_flag)
{
    close_values<<<ms_cu_blocks(shape->numel), MS_CU_THREADS, 0, stream>>>(
        *shape, a, a_dtype, b, b_dtype, rtol, atol, device_flag);
    return ms_cu_last_error();
}
