/* moonshard CUDA backend: ms_equal (bit for bit) and ms_allclose on a device, after
 * the checks of runtime/ops/; the kernels clear a device flag that is read back once. */
#include "cuda_internal.h"
#include "copy.cuh"

/* Run a comparison kernel into a device flag that starts at 1; [OUT] *result. */
typedef int (*compare_launch)(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                              ms_cu_operand b, const void *args, int32_t *flag);

static int compare(const char *op, const ms_tensor *a, const ms_tensor *b, int device,
                   compare_launch launch, const void *args, int *result)
{
    ms_cu_shape shape;
    ms_cu_operand in_a, in_b;
    ms_cuda_shape_of(&shape, a->ndim, a->shape);
    MS_CHECK(ms_cuda_operand(&in_a, op, "a", &shape, a));
    MS_CHECK(ms_cuda_operand(&in_b, op, "b", &shape, b));
    ms_cu_operand *operands[2] = {&in_a, &in_b};
    ms_cuda_coalesce(&shape, operands, 2);
    ms_tensor *flag = NULL;
    MS_CHECK(ms_cuda_tensor_new(&flag, MS_I32, 0, NULL, a->storage->pool));
    int32_t host_flag = 1;
    cudaStream_t stream = ms_cuda_compute_stream(device);
    int status = MS_CUDA_STATUS(cudaMemcpyAsync(ms_tensor_data(flag), &host_flag,
                                                sizeof host_flag, cudaMemcpyHostToDevice,
                                                stream), op);
    if (status == MS_OK)
        status = ms_cuda_launched(op, launch(stream, &shape, in_a, in_b, args,
                                             ms_tensor_data(flag)));
    if (status == MS_OK)
        status = ms_cuda_download(device, &host_flag, ms_tensor_data(flag), sizeof host_flag);
    ms_tensor_free(flag);
    if (status == MS_OK)
        *result = host_flag;
    return status;
}

static int launch_equal(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                        ms_cu_operand b, const void *args, int32_t *flag)
{
    return ms_cu_equal(stream, shape, a, b, *(const size_t *)args, flag);
}

int ms_cuda_equal(int *equal, const ms_tensor *a, const ms_tensor *b)
{
    int device = ms_cuda_device_of(a);
    if (a->numel == 0) {
        *equal = 1;
        return MS_OK;
    }
    size_t elem_size = ms_dtype_size(a->dtype);
    return compare("equal", a, b, device, launch_equal, &elem_size, equal);
}

typedef struct close_args {
    int a_dtype, b_dtype;
    double rtol, atol;
} close_args;

static int launch_close(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand a,
                        ms_cu_operand b, const void *args, int32_t *flag)
{
    const close_args *c = args;
    return ms_cu_allclose(stream, shape, a, c->a_dtype, b, c->b_dtype, c->rtol, c->atol, flag);
}

int ms_cuda_allclose(int *close, const ms_tensor *a, const ms_tensor *b, double rtol,
                     double atol)
{
    int device = ms_cuda_device_of(a);
    if (a->numel == 0) {
        *close = 1;
        return MS_OK;
    }
    close_args args = {a->dtype, b->dtype, rtol, atol};
    return compare("allclose", a, b, device, launch_close, &args, close);
}
