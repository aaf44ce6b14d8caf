/* moonshard CUDA backend: ms_reduce and ms_max_dim on a device. Checks match the CPU
 * backend's; outputs are assigned. */
#include "cuda_internal.h"
#include "dispatch.h"
#include "reduce.cuh"
#include "cpu/cpu.h"

static const char *const reduce_names[] = {"sum", "mean", "max", "min", "sumsq"};

int ms_cuda_reduce(ms_tensor *out, const ms_tensor *a, int op, uint32_t dims_mask)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("reduce", "out", out, &device));
    MS_CHECK(ms_cuda_input("reduce", "a", a, &device));
    MS_CHECK(ms_cpu_float("reduce", "a", a));
    MS_CHECK(ms_cpu_same_dtype("reduce", "out", out, "a", a));
    if (op < MS_SUM || op > MS_SUMSQ)
        return MS_FAIL(MS_ERR_INVALID, "reduce: unknown reduce op %d (expected 0..%d)", op,
                       MS_SUMSQ);
    if (a->ndim < 32 && (dims_mask >> a->ndim) != 0)
        return MS_FAIL(MS_ERR_INVALID, "reduce: dims_mask 0x%x names dims beyond the %d dims "
                       "of a", dims_mask, a->ndim);
    int64_t kept_shape[MS_MAX_DIMS];
    int64_t count = 1;
    ms_cu_shape kept = {0, 1, {0}}, reduced = {0, 1, {0}};
    ms_cu_operand out_kept = {ms_tensor_data(out), {0}}, a_kept = {ms_tensor_data(a), {0}};
    ms_cu_operand a_reduced = {ms_tensor_data(a), {0}};
    for (int d = 0; d < a->ndim; d++) {
        int is_reduced = (dims_mask >> d) & 1u;
        kept_shape[d] = is_reduced ? 1 : a->shape[d];
        if (is_reduced) {
            count *= a->shape[d];
            a_reduced.strides[reduced.ndim] = a->strides[d];
            reduced.sizes[reduced.ndim++] = a->shape[d];
            reduced.numel *= a->shape[d];
        } else {
            a_kept.strides[kept.ndim] = a->strides[d];
            out_kept.strides[kept.ndim] = out->ndim == a->ndim ? out->strides[d] : 0;
            kept.sizes[kept.ndim++] = a->shape[d];
            kept.numel *= a->shape[d];
        }
    }
    MS_CHECK(ms_cpu_shape_is("reduce", "out", out, a->ndim, kept_shape));
    if (out->numel == 0)
        return MS_OK;
    if (count == 0 && (op == MS_MAX || op == MS_MIN))
        return MS_FAIL(MS_ERR_SHAPE, "reduce: %s over reduced dims with no elements (a has a "
                       "size-0 dim in dims_mask 0x%x)", reduce_names[op], dims_mask);
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

int ms_cuda_max_dim(ms_tensor *values, ms_tensor *indices, const ms_tensor *a, int dim)
{
    int device = -1;
    MS_CHECK(ms_cuda_output("max_dim", "values", values, &device));
    MS_CHECK(ms_cuda_output("max_dim", "indices", indices, &device));
    MS_CHECK(ms_cuda_input("max_dim", "a", a, &device));
    MS_CHECK(ms_cpu_float("max_dim", "a", a));
    MS_CHECK(ms_cpu_same_dtype("max_dim", "values", values, "a", a));
    if (indices->dtype != MS_I64)
        return MS_FAIL(MS_ERR_DTYPE, "max_dim: indices has dtype %s; it must be i64",
                       ms_dtype_name(indices->dtype));
    MS_CHECK(ms_cpu_dim("max_dim", a, dim));
    int64_t kept_shape[MS_MAX_DIMS];
    for (int d = 0; d < a->ndim; d++)
        kept_shape[d] = d == dim ? 1 : a->shape[d];
    MS_CHECK(ms_cpu_shape_is("max_dim", "values", values, a->ndim, kept_shape));
    MS_CHECK(ms_cpu_shape_is("max_dim", "indices", indices, a->ndim, kept_shape));
    if (values->numel == 0)
        return MS_OK;
    int64_t length = a->ndim ? a->shape[dim] : 1, stride = a->ndim ? a->strides[dim] : 0;
    if (length == 0)
        return MS_FAIL(MS_ERR_SHAPE, "max_dim: dim %d of a has size 0", dim);
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
