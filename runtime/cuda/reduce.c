/* moonshard CUDA backend: ms_reduce and ms_max_dim on a device, after
 * the checks of runtime/ops/; outputs are assigned. */
#include "cuda_internal.h"
#include "reduce.cuh"

int ms_cuda_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask,
                   const int64_t *kept_shape, int64_t count)
{
    (void)kept_shape;
    (void)count;
    if (out->numel == 0)
        return MS_OK;
    int device = ms_cuda_device_of(out);
    ms_cu_shape kept = {0, 1, {0}}, reduced = {0, 1, {0}};
    ms_cu_operand out_kept = {ms_tensor_data(out), {0}}, a_kept = {ms_tensor_data(a), {0}};
    ms_cu_operand a_reduced = {ms_tensor_data(a), {0}};
    for (int d = 0; d < a->ndim; d++) {
        if ((dims_mask >> d) & 1u) {
            a_reduced.strides[reduced.ndim] = a->strides[d];
            reduced.sizes[reduced.ndim++] = a->shape[d];
            reduced.numel *= a->shape[d];
        } else {
            a_kept.strides[kept.ndim] = a->strides[d];
            out_kept.strides[kept.ndim] = out->strides[d];
            kept.sizes[kept.ndim++] = a->shape[d];
            kept.numel *= a->shape[d];
        }
    }
    int64_t chunks = ms_cu_reduce_chunks(kept.numel, reduced.numel);
    ms_tensor *partials = NULL;
    if (chunks > 1) {
        int64_t partials_shape[1] = {kept.numel * chunks};
        MS_CHECK(ms_cuda_tensor_new(&partials, MS_F64, 1, partials_shape, a->storage->pool));
    }
    int status = ms_cuda_launched("reduce", ms_cu_reduce(ms_cuda_compute_stream(device), &kept,
                                                         out_kept, a_kept, &reduced, a_reduced,
                                                         a->dtype, op,
                                                         partials ? ms_tensor_data(partials)
                                                                  : NULL));
    ms_tensor_free(partials);
    return status;
}

int ms_cuda_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim,
                    const int64_t *kept_shape)
{
    if (values->numel == 0)
        return MS_OK;
    int device = ms_cuda_device_of(values);
    int64_t length = a->ndim ? a->shape[dim] : 1, stride = a->ndim ? a->strides[dim] : 0;
    ms_cu_shape kept;
    ms_cu_operand v, idx, in;
    ms_cuda_shape_of(&kept, a->ndim, kept_shape);
    MS_CHECK(ms_cuda_operand(&v, "max_dim", "values", &kept, values));
    MS_CHECK(ms_cuda_operand(&idx, "max_dim", "indices", &kept, indices));
    in.data = ms_tensor_data(a);
    for (int d = 0; d < MS_CU_MAX_DIMS; d++)
        in.strides[d] = d < a->ndim && d != dim ? a->strides[d] : 0;
    return ms_cuda_launched("max_dim", ms_cu_max_dim(ms_cuda_compute_stream(device), &kept, v,
                                                     idx, in, length, stride, a->dtype));
}
