/* moonshard CPU backend: the ops table of the cpu and host pools (ops/backend.h), whose
 * kernels run on this process's threads with OpenBLAS for GEMM. */
#include "cpu.h"

const ms_ops_backend ms_cpu_ops = {
    .name = "cpu",
    .device_tensors = 0,
    .copy = ms_cpu_copy,
    .fill = ms_cpu_fill,
    .arange = ms_cpu_arange,
    .equal = ms_cpu_equal,
    .allclose = ms_cpu_allclose,
    .binary = ms_cpu_binary,
    .binary_scalar = ms_cpu_binary_scalar,
    .unary = ms_cpu_unary,
    .unary_backward = ms_cpu_unary_backward,
    .reduce = ms_cpu_reduce,
    .max_dim = ms_cpu_max_dim,
    .matmul = ms_cpu_matmul,
    .softmax = ms_cpu_softmax,
    .softmax_backward = ms_cpu_softmax_backward,
    .layer_norm = ms_cpu_layer_norm,
    .layer_norm_backward = ms_cpu_layer_norm_backward,
    .embedding = ms_cpu_embedding,
    .embedding_backward = ms_cpu_embedding_backward,
    .nll_loss = ms_cpu_nll_loss,
    .nll_loss_backward = ms_cpu_nll_loss_backward,
    .rand_uniform = ms_cpu_rand_uniform,
    .rand_normal = ms_cpu_rand_normal,
    .dropout = ms_cpu_dropout,
    .dropout_backward = ms_cpu_dropout_backward,
    .sgd_step = ms_cpu_sgd_step,
    .adam_step = ms_cpu_adam_step,
};
