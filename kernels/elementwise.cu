/* moonshard kernels: binary, scalar, unary and unary-backward ops on the device, one thread
 * per output element (bf16 and f16 read and written as they are, computed in f32). Outputs
 * are assigned; activation math comes from activation.h. */
#include "elementwise.cuh"
#include "math.cuh"
#include "value.cuh"

/* ms_binary_op and ms_unary_op values (ops.h), repeated for device code. */
enum { ADD, SUB, MUL, DIV, MAXIMUM, MINIMUM, POW, EQ, NE, LT, LE, GT, GE };
enum { NEG, EXP, LOG, SQRT, RSQRT, ABS, TANH, SIGMOID, RELU, GELU, GELU_TANH, SIN, COS, SIGN,
       RECIPROCAL, SQUARE };
enum { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, I32 = 4, I64 = 5 };

/* ---- kernels ---- */

template <typename T>
__device__ __forceinline__ T float_binary(int op, T x, T y)
{
    switch (op) {
    case ADD: return x + y;
    case SUB: return x - y;
    case MUL: return x * y;
    case DIV: return x / y;
    case MAXIMUM: return (x > y || x != x) ? x : y; /* NaN from either side, as torch.maximum */
    case MINIMUM: return (x < y || x != x) ? x : y;
    case POW: return pow(x, y);
    case EQ: return (T)(x == y);
    case NE: return (T)(x != y);
    case LT: return (T)(x < y);
    case LE: return (T)(x <= y);
    case GT: return (T)(x > y);
    default: return (T)(x >= y);
    }
}

/* Integer arithmetic runs in unsigned so overflow wraps. */
template <typename T, typename U>
__device__ __forceinline__ T int_binary(int op, T x, T y)
{
    switch (op) {
    case ADD: return (T)((U)x + (U)y);
    case SUB: return (T)((U)x - (U)y);
    case MUL: return (T)((U)x * (U)y);
    case MAXIMUM: return x > y ? x : y;
    case MINIMUM: return x < y ? x : y;
    case EQ: return (T)(x == y);
    case NE: return (T)(x != y);
    case LT: return (T)(x < y);
    case LE: return (T)(x <= y);
    case GT: return (T)(x > y);
    default: return (T)(x >= y);
    }
}

__device__ __forceinline__ float apply_binary(int op, float x, float y)
{
    return float_binary(op, x, y);
}
__device__ __forceinline__ double apply_binary(int op, double x, double y)
{
    return float_binary(op, x, y);
}
__device__ __forceinline__ int32_t apply_binary(int op, int32_t x, int32_t y)
{
    return int_binary<int32_t, uint32_t>(op, x, y);
}
__device__ __forceinline__ int64_t apply_binary(int op, int64_t x, int64_t y)
{
    return int_binary<int64_t, uint64_t>(op, x, y);
}

/* S: the stored element type; T: the type computed in. scalar_side: 0 both operands are
 * tensors, 1 b is the scalar, 2 a is the scalar. */
template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void binary_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_operand a,
                              ms_cu_operand b, int op, T scalar, int scalar_side)
{
    MS_CU_FOR(i, shape.numel)
    {
        T x = scalar_side == 2 ? scalar : ms_cu_get<S>(a.data, ms_cu_offset(shape, a.strides, i));
        T y = scalar_side == 1 ? scalar : ms_cu_get<S>(b.data, ms_cu_offset(shape, b.strides, i));
        ms_cu_set<S>(out.data, ms_cu_offset(shape, out.strides, i), apply_binary(op, x, y));
    }
}

template <typename T>
__device__ __forceinline__ T apply_unary(int op, T x)
{
    switch (op) {
    case NEG: return -x;
    case EXP: return exp(x);
    case LOG: return log(x);
    case SQRT: return sqrt(x);
    case RSQRT: return (T)1 / sqrt(x);
    case ABS: return fabs(x);
    case TANH: return ms_cu::tanh(x);
    case SIGMOID: return ms_cu::sigmoid(x);
    case RELU: return ms_cu::relu(x);
    case GELU: return ms_cu::gelu(x);
    case GELU_TANH: return ms_cu::gelu_tanh(x);
    case SIN: return sin(x);
    case COS: return cos(x);
    case SIGN: return (T)((x > 0) - (x < 0));
    case RECIPROCAL: return (T)1 / x;
    default: return x * x;
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void unary_kernel(ms_cu_shape shape, ms_cu_operand out, ms_cu_operand a, int op)
{
    MS_CU_FOR(i, shape.numel)
    {
        T x = ms_cu_get<S>(a.data, ms_cu_offset(shape, a.strides, i));
        ms_cu_set<S>(out.data, ms_cu_offset(shape, out.strides, i), apply_unary(op, x));
    }
}

template <typename S, typename T = typename ms_cu_math<S>::type>
__global__ void unary_backward_kernel(ms_cu_shape shape, ms_cu_operand dx, ms_cu_operand x,
                                      ms_cu_operand dy, int op)
{
    MS_CU_FOR(i, shape.numel)
    {
        T xv = ms_cu_get<S>(x.data, ms_cu_offset(shape, x.strides, i));
        T g = ms_cu_get<S>(dy.data, ms_cu_offset(shape, dy.strides, i));
        T result;
        switch (op) {
        case RELU: result = ms_cu::relu_backward(xv, g); break;
        case GELU: result = ms_cu::gelu_backward(xv, g); break;
        case GELU_TANH: result = ms_cu::gelu_tanh_backward(xv, g); break;
        case TANH: result = ms_cu::tanh_backward(xv, g); break;
        default: result = ms_cu::sigmoid_backward(xv, g); break;
        }
        ms_cu_set<S>(dx.data, ms_cu_offset(shape, dx.strides, i), result);
    }
}

/* ---- launchers ---- */

template <typename S, typename T = typename ms_cu_math<S>::type>
static int launch_binary(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                         ms_cu_operand a, ms_cu_operand b, int op, T scalar, int scalar_side)
{
    binary_kernel<S><<<ms_cu_blocks(shape->numel), MS_CU_THREADS, 0, stream>>>(
        *shape, out, a, b, op, scalar, scalar_side);
    return ms_cu_last_error();
}

int ms_cu_binary(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                 ms_cu_operand a, ms_cu_operand b, int dtype, int op)
{
    switch (dtype) {
    case F32: return launch_binary<float>(stream, shape, out, a, b, op, 0.0f, 0);
    case F64: return launch_binary<double>(stream, shape, out, a, b, op, 0.0, 0);
    case BF16: return launch_binary<ms_cu_bf16>(stream, shape, out, a, b, op, 0.0f, 0);
    case F16: return launch_binary<ms_cu_f16>(stream, shape, out, a, b, op, 0.0f, 0);
    case I32: return launch_binary<int32_t>(stream, shape, out, a, b, op, 0, 0);
    default: return launch_binary<int64_t>(stream, shape, out, a, b, op, 0, 0);
    }
}

int ms_cu_binary_scalar(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                        ms_cu_operand a, int dtype, int op, double scalar_f, int64_t scalar_i,
                        int reverse)
{
    int side = reverse ? 2 : 1;
    switch (dtype) {
    case F32: return launch_binary<float>(stream, shape, out, a, a, op, (float)scalar_f, side);
    case F64: return launch_binary<double>(stream, shape, out, a, a, op, scalar_f, side);
    case BF16:
        return launch_binary<ms_cu_bf16>(stream, shape, out, a, a, op, (float)scalar_f, side);
    case F16:
        return launch_binary<ms_cu_f16>(stream, shape, out, a, a, op, (float)scalar_f, side);
    case I32: return launch_binary<int32_t>(stream, shape, out, a, a, op, (int32_t)scalar_i, side);
    default: return launch_binary<int64_t>(stream, shape, out, a, a, op, scalar_i, side);
    }
}

int ms_cu_unary(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand out,
                ms_cu_operand a, int dtype, int op)
{
    MS_CU_LAUNCH_FLOAT(dtype, unary_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS, stream,
                       *shape, out, a, op)
    return ms_cu_last_error();
}

int ms_cu_unary_backward(cudaStream_t stream, const ms_cu_shape *shape, ms_cu_operand dx,
                         ms_cu_operand x, ms_cu_operand dy, int dtype, int op)
{
    MS_CU_LAUNCH_FLOAT(dtype, unary_backward_kernel, ms_cu_blocks(shape->numel), MS_CU_THREADS,
                       stream, *shape, dx, x, dy, op)
    return ms_cu_last_error();
}
