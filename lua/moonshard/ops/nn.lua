-- Differentiable neural-network functions: softmax family, layer norm, embedding, losses,
-- dropout and causal attention (the functional forms behind moonshard.nn).
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local random = require "moonshard.random"
local scope = require "moonshard.scope"
local raw = require "moonshard.ops.raw"
local pointwise = require "moonshard.ops.pointwise"
local shape_ops = require "moonshard.ops.shape"
local reduce = require "moonshard.ops.reduce"
local linalg = require "moonshard.ops.linalg"
local profiler = require "moonshard.profiler"

local lib, check, fail = C.lib, C.check, C.fail
local record = autograd.record
local empty, empty_like = Tensor.empty_raw, Tensor.empty_like_raw
local is_tensor = Tensor.is_tensor

local M = {}

local function need_tensor(v, what, name)
  if not is_tensor(v) then fail(what, "%s must be a tensor, got %s", name, type(v)) end
end

-- ---- softmax family ----

local function softmax_backward(node, g)
  local dx = empty_like(g)
  check(lib.ms_softmax_backward(dx._c, node:saved_tensor(node.y)._c, raw.contiguous(g)._c, node.dim,
                                node.kind), node.name)
  return dx
end

-- kind: lib.MS_SOFTMAX, MS_LOG_SOFTMAX or MS_SAFE_SOFTMAX (ops.h)
local function softmax_op(x, dim, kind, what)
  need_tensor(x, what, "input")
  if dim == nil then fail(what, "dim is required") end
  dim = Tensor.normalize_dim(x, dim, what)
  local out = empty_like(x)
  check(lib.ms_softmax(out._c, x._c, dim, kind), what)
  local node = record(out, what == "softmax" and "SoftmaxBackward0" or "LogSoftmaxBackward0", softmax_backward, x)
  if node then
    node.dim, node.kind = dim, kind
    node.y = node:save(out)
  end
  return out
end

function M.softmax(x, dim) return softmax_op(x, dim, lib.MS_SOFTMAX, "softmax") end
function M.log_softmax(x, dim) return softmax_op(x, dim, lib.MS_LOG_SOFTMAX, "log_softmax") end

-- ---- layer norm ----

local function layer_norm_backward(node, g)
  local x = node:saved_tensor(node.x)
  local weight = node.weight and node:saved_tensor(node.weight)
  local dx = empty_like(x)
  local dweight = weight and raw.zeros_like(weight)
  local dbias = node.has_bias and raw.zeros_like_shape(node.bias_shape, x) or nil
  check(lib.ms_layer_norm_backward(dx._c, dweight and dweight._c, dbias and dbias._c,
                                   raw.contiguous(g)._c, x._c, node:saved_tensor(node.mean)._c,
                                   node:saved_tensor(node.rstd)._c, weight and weight._c,
                                   node.normalized_ndim), "layer_norm")
  return dx, dweight, dbias
end

-- The number of normalised dims of x for normalized_shape (a number or a table), checked
-- against x's trailing dims, and the count of rows; weight and bias are tensors or nil.
local function normalized_layout(x, normalized_shape, eps, what, weight, bias)
  if weight ~= nil and not Tensor.is_tensor(weight) then fail(what, "weight must be a tensor or nil, got %s", type(weight)) end
  if bias ~= nil and not Tensor.is_tensor(bias) then fail(what, "bias must be a tensor or nil, got %s", type(bias)) end
  if type(normalized_shape) == "number" then normalized_shape = {normalized_shape} end
  if type(normalized_shape) ~= "table" then fail(what, "normalized_shape must be a number or a table") end
  local n = #normalized_shape
  local shape = x:shape()
  if n == 0 or n > #shape then fail(what, "normalized_shape has %d dims, input %d", n, #shape) end
  local row = 1
  for i = 1, n do
    if shape[#shape - n + i] ~= normalized_shape[i] then
      fail(what, "input shape %s does not end with normalized_shape [%s]", tostring(shape),
           table.concat(normalized_shape, ", "))
    end
    row = row * normalized_shape[i]
  end
  if eps ~= nil and (type(eps) ~= "number" or eps < 0) then
    fail(what, "eps must be a non-negative number, got %s", tostring(eps))
  end
  return n, row > 0 and x:numel() / row or 0
end

function M.layer_norm(x, normalized_shape, weight, bias, eps)
  need_tensor(x, "layer_norm", "input")
  local n, rows = normalized_layout(x, normalized_shape, eps, "layer_norm", weight, bias)
  local dense = raw.contiguous(x)
  local out = empty_like(dense)
  local mean = empty({rows}, x._c.dtype, x._c.storage.pool)
  local rstd = empty({rows}, x._c.dtype, x._c.storage.pool)
  check(lib.ms_layer_norm(out._c, mean._c, rstd._c, dense._c, weight and weight._c, bias and bias._c,
                          n, eps or 1e-5), "layer_norm")
  local node = record(out, "LayerNormBackward0", layer_norm_backward, x, weight, bias)
  if node then
    node.normalized_ndim = n
    node.x, node.mean, node.rstd = node:save(dense), node:save(mean), node:save(rstd)
    if weight then node.weight = node:save(weight) end
    node.has_bias = bias ~= nil
    node.bias_shape = bias and bias:shape()
  end
  return out
end

-- ---- residual add fused with layer norm ----
-- s = x + residual and y = layer_norm(s) have one backward: dx = layer_norm_backward(dy) + ds,
-- one pass (ms_add_layer_norm_backward), recorded as one op with two outputs
-- (autograd.record_outputs); either gradient may be missing (that output got none).

local function add_layer_norm_backward(node, grads)
  local dsum, dy = grads[1], grads[2]
  if dy == nil then
    local dx = Tensor.alias_raw(dsum)
    return dx, dx
  end
  local sum = node:saved_tensor(node.sum)
  local weight = node.weight and node:saved_tensor(node.weight)
  local dx = empty_like(sum)
  local dweight = node[3] and raw.zeros_like(weight) or nil
  local dbias = node[4] and raw.zeros_like_shape(node.bias_shape, sum) or nil
  check(lib.ms_add_layer_norm_backward(dx._c, dweight and dweight._c, dbias and dbias._c,
                                       raw.contiguous(dy)._c, dsum and raw.contiguous(dsum)._c, sum._c,
                                       node:saved_tensor(node.mean)._c, node:saved_tensor(node.rstd)._c,
                                       weight and weight._c, node.normalized_ndim), "add_layer_norm")
  return dx, dx, dweight, dbias
end

local function same_as_input(t, x, name)
  need_tensor(t, "add_layer_norm", name)
  if t._c.dtype ~= x._c.dtype then
    fail("add_layer_norm", "%s has dtype %s but input has %s", name, t:dtype(), x:dtype())
  end
  local a, b = t._c, x._c
  local same = a.ndim == b.ndim
  for d = 0, a.ndim - 1 do same = same and a.shape[d] == b.shape[d] end
  if not same then
    fail("add_layer_norm", "%s has shape %s but input has %s", name, tostring(t:shape()), tostring(x:shape()))
  end
end

-- add_layer_norm(x, residual, normalized_shape, weight, bias, eps) -> s, y with s = x +
-- residual and y = layer_norm(s, normalized_shape, weight, bias, eps), from one pass over
-- the rows (a transformer block's "x = x + h; y = ln(x)").
function M.add_layer_norm(x, residual, normalized_shape, weight, bias, eps)
  need_tensor(x, "add_layer_norm", "input")
  same_as_input(residual, x, "residual")
  local n, rows = normalized_layout(x, normalized_shape, eps, "add_layer_norm", weight, bias)
  local sum, out = empty(x:shape(), x._c.dtype, x._c.storage.pool), empty(x:shape(), x._c.dtype, x._c.storage.pool)
  local mean = empty({rows}, x._c.dtype, x._c.storage.pool)
  local rstd = empty({rows}, x._c.dtype, x._c.storage.pool)
  check(lib.ms_add_layer_norm(sum._c, out._c, mean._c, rstd._c, x._c, residual._c, weight and weight._c,
                              bias and bias._c, n, eps or 1e-5), "add_layer_norm")
  -- s carries a gradient only through x or residual
  local outputs = {(x.requires_grad or residual.requires_grad) and sum, out}
  local fused = autograd.record_outputs(outputs, "AddLayerNormBackward0", add_layer_norm_backward,
                                        {x, residual, weight or false, bias or false},
                                        {"AddBackward0", "NativeLayerNormBackward0"})
  if fused then
    fused.normalized_ndim = n
    fused.sum, fused.mean, fused.rstd = fused:save(sum), fused:save(mean), fused:save(rstd)
    if weight then fused.weight = fused:save(weight) end
    fused.bias_shape = bias and bias:shape()
  end
  mean:_release()
  rstd:_release()
  return sum, out
end

-- ---- linear fused with GELU ----
-- y = gelu(x W^T + b): the GEMM without its bias, then one pass adding the bias and applying
-- GELU (ms_bias_gelu), which also writes gelu' when a graph is recorded. That derivative is
-- saved (in the dtype the math runs in: f32 for 16-bit ops); backward multiplies the incoming
-- gradient by it and sums the bias gradient in one pass (ms_bias_gelu_backward), then the two
-- GEMMs.

local approximations = {none = 0, tanh = 1}

local function gemm(a, b, trans_a, trans_b, out_shape)
  local out = empty(out_shape, a._c.dtype, a._c.storage.pool)
  check(lib.ms_matmul(out._c, a._c, b._c, trans_a, trans_b, 1, 0), "linear_gelu")
  return out
end

local function linear_gelu_backward(node, g)
  local rows, out_features, in_features = node.rows, node.out_features, node.in_features
  local g2 = raw.contiguous(g)
  g2 = Tensor.view_raw(g2, {rows, out_features}, nil, tonumber(g2._c.offset), "linear_gelu backward")
  local dacc = empty({rows, out_features}, g2._c.dtype, g2._c.storage.pool)
  local dbias = empty({out_features}, g2._c.dtype, g2._c.storage.pool)
  check(lib.ms_bias_gelu_backward(dacc._c, dbias._c, g2._c, node:saved_tensor(node.derivative)._c),
        "linear_gelu")
  local gx, gw
  if node[1] then
    gx = gemm(dacc, node:saved_tensor(node.weight), 0, 0, {rows, in_features})
    gx = Tensor.view_raw(gx, node.x_shape, nil, 0, "linear_gelu backward")
  end
  if node[2] then
    local x = node:saved_tensor(node.x)
    local x2 = Tensor.view_raw(x, {rows, in_features}, nil, tonumber(x._c.offset), "linear_gelu backward")
    gw = gemm(dacc, x2, 1, 0, {out_features, in_features})
  end
  dacc:_release()
  return gx, gw, node[3] and dbias or nil
end

-- x2 [rows, in] times weight^T, without the bias.
local function linear_product(x2, weight, rows, out_features)
  return gemm(x2, weight, 0, 1, {rows, out_features})
end

-- linear_gelu(x, weight, bias, {approximate = "none" | "tanh"}): gelu(linear(x, weight, bias)).
function M.linear_gelu(x, weight, bias, opts)
  opts = raw.options("linear_gelu", opts, {approximate = true})
  local approximate = opts.approximate or "none"
  local tanh_approx = approximations[approximate]
  if tanh_approx == nil then
    fail("linear_gelu", "approximate must be 'none' or 'tanh', got '%s'", tostring(approximate))
  end
  if bias == nil then return pointwise.gelu(linalg.linear(x, weight), {approximate = approximate}) end
  need_tensor(x, "linear_gelu", "input")
  need_tensor(weight, "linear_gelu", "weight")
  need_tensor(bias, "linear_gelu", "bias")
  if weight:dim() ~= 2 then fail("linear_gelu", "weight must be 2-D, got shape %s", tostring(weight:shape())) end
  local in_features, out_features = weight:size(1), weight:size(0)
  if x:dim() == 0 or x:size(-1) ~= in_features then
    fail("linear_gelu", "input of shape %s does not match weight of shape %s (expected last dim %d)",
         tostring(x:shape()), tostring(weight:shape()), in_features)
  end
  if bias:dim() ~= 1 or bias:size(0) ~= out_features then
    fail("linear_gelu", "bias must be a 1-D tensor of %d elements, got shape %s", out_features,
         tostring(bias:shape()))
  end
  raw.check_dtypes(x, weight, "linear_gelu")
  raw.check_dtypes(x, bias, "linear_gelu")
  local dense = raw.contiguous(x)
  local rows = linalg.leading_rows(dense)
  local x2 = Tensor.view_raw(dense, {rows, in_features}, nil, tonumber(dense._c.offset), "linear_gelu")
  local acc = autograd.run_op("linear", linear_product, x2, weight, rows, out_features)
  x2:_release()
  local out_shape = x:shape()
  out_shape[#out_shape] = out_features
  local y = empty(out_shape, acc._c.dtype, acc._c.storage.pool)
  local y2 = Tensor.view_raw(y, {rows, out_features}, nil, 0, "linear_gelu")
  local node = autograd.new_node("LinearGeluBackward0", linear_gelu_backward, x, weight, bias)
  local derivative = node and empty({rows, out_features}, acc._c.dtype == lib.MS_F64 and lib.MS_F64 or lib.MS_F32,
                                    acc._c.storage.pool)
  check(lib.ms_bias_gelu(y2._c, derivative and derivative._c, acc._c, bias._c, tanh_approx), "linear_gelu")
  y2:_release()
  if node then
    y.grad_fn, y.requires_grad = node, true
    node.rows, node.in_features, node.out_features = rows, in_features, out_features
    node.x_shape = x:shape()
    node.derivative = node:save(derivative)
    derivative:_release()
    if node[2] then node.x = node:save(dense) end
    if node[1] then node.weight = node:save(weight) end
  end
  acc:_release()
  if dense ~= x then dense:_release() end
  return y
end

-- ---- embedding ----

local function embedding_backward(node, g)
  local dweight = raw.zeros_like_shape(node.weight_shape, g)
  check(lib.ms_embedding_backward(dweight._c, node:saved_tensor(node.indices)._c, raw.contiguous(g)._c),
        "embedding")
  return nil, dweight
end

function M.embedding(indices, weight)
  need_tensor(indices, "embedding", "indices")
  need_tensor(weight, "embedding", "weight")
  local shape = indices:shape()
  shape[#shape + 1] = weight:size(1)
  local out = empty(shape, weight._c.dtype, weight._c.storage.pool)
  check(lib.ms_embedding(out._c, weight._c, indices._c), "embedding")
  local node = record(out, "EmbeddingBackward0", embedding_backward, nil, weight)
  if node then
    node.weight_shape = weight:shape()
    node.indices = node:save(indices)
  end
  return out
end

-- ---- losses ----

local reductions = {none = 0, mean = 1, sum = 2}

local function nll_backward(node, g)
  local dlogp = empty(node.input_shape, g._c.dtype, g._c.storage.pool)
  check(lib.ms_nll_loss_backward(dlogp._c, raw.contiguous(g)._c, node:saved_tensor(node.target)._c,
                                 node.ignore_index, node.reduction), "nll_loss")
  return dlogp
end

local loss_options = {reduction = true, ignore_index = true}

-- PyTorch's layouts: input [N, C] with target [N], [N, C, d1, ...] with target [N, d1, ...]
-- (classes on dim 1) or [C] with a 0-dim target. Returns the input as [M, C] rows, the
-- target as [M] and the shape a reduction = "none" result takes.
local function class_rows(input, target, what)
  local shape, target_shape = input:shape(), target:shape()
  local ok = #shape >= 1 and #target_shape == #shape - 1
  if ok and #shape >= 2 then
    ok = target_shape[1] == shape[1]
    for d = 3, #shape do ok = ok and target_shape[d - 1] == shape[d] end
  end
  if not ok then
    fail(what, "expected input [N, C] with target [N], [N, C, d1, ...] with target [N, d1, ...], or [C] " ..
         "with a 0-dim target; got %s and %s", tostring(shape), tostring(target_shape))
  end
  local classes = #shape == 1 and shape[1] or shape[2]
  if #shape == 2 then return input, target, target_shape end
  if #shape == 1 then return shape_ops.view(input, 1, classes), shape_ops.view(target, 1), target_shape end
  local order = {0}
  for d = 2, #shape - 1 do order[#order + 1] = d end
  order[#order + 1] = 1
  local rows = shape_ops.reshape(shape_ops.permute(input, unpack(order)), -1, classes)
  return rows, shape_ops.reshape(target, -1), target_shape
end

local function reduction_of(opts, what)
  local reduction = reductions[opts.reduction or "mean"]
  if not reduction then fail(what, "reduction must be 'none', 'mean' or 'sum', got '%s'", tostring(opts.reduction)) end
  return reduction
end

local function nll_rows(logp, target, reduction, ignore_index)
  local out = empty(reduction == 0 and {logp:size(0)} or {}, logp._c.dtype, logp._c.storage.pool)
  check(lib.ms_nll_loss(out._c, logp._c, target._c, ignore_index, reduction), "nll_loss")
  local node = record(out, "NllLossBackward0", nll_backward, logp)
  if node then
    node.input_shape, node.ignore_index, node.reduction = logp:shape(), ignore_index, reduction
    node.target = node:save(target)
  end
  return out
end

local function unflatten_none(loss, reduction, shape)
  if reduction ~= 0 then return loss end
  return shape_ops.reshape(loss, shape)
end

function M.nll_loss(logp, target, opts)
  opts = raw.options("nll_loss", opts, loss_options)
  need_tensor(logp, "nll_loss", "input")
  need_tensor(target, "nll_loss", "target")
  local reduction = reduction_of(opts, "nll_loss")
  local rows, flat_target, shape = class_rows(logp, target, "nll_loss")
  return unflatten_none(nll_rows(rows, flat_target, reduction, opts.ignore_index or -100), reduction, shape)
end

-- 1 where target is not ignore_index, 0 where it is, in dtype (a constant: no gradient).
local function kept_mask(target, ignore_index, dtype)
  local hits = empty(target:shape(), target._c.dtype, target._c.storage.pool)
  check(lib.ms_binary_scalar(hits._c, target._c, ignore_index, raw.NE, 0), "cross_entropy")
  local mask = empty(target:shape(), dtype, target._c.storage.pool)
  check(lib.ms_copy(mask._c, hits._c), "cross_entropy")
  hits:_release()
  return mask
end

-- With label_smoothing e, each row's loss is (1 - e) * nll + e * mean over classes of -log p
-- (PyTorch's rule); ignored rows count in neither, and "mean" divides by the rows kept.
local function smoothed(log_probs, target, reduction, ignore_index, smoothing)
  local classes = log_probs:size(1)
  local nll = nll_rows(log_probs, target, 0, ignore_index)
  local mask = kept_mask(target, ignore_index, log_probs._c.dtype)
  local uniform = pointwise.mul(pointwise.mul(reduce.sum(log_probs, 1), mask), -smoothing / classes)
  local per_row = pointwise.add(pointwise.mul(nll, 1 - smoothing), uniform)
  if reduction == 0 then return per_row end
  local total = reduce.sum(per_row)
  if reduction == 2 then return total end
  local kept = reduce.sum_of_squares(mask) -- the mask holds 0 and 1: the number of rows kept
  -- no row kept: the loss is 0/0 = NaN and every gradient 0, as PyTorch's (dividing by 0
  -- would send 1/0 back into the masked rows: inf * 0 = NaN)
  if kept == 0 then return pointwise.add(pointwise.mul(total, 0), 0 / 0) end
  return pointwise.div(total, kept)
end

-- log_softmax and nll in one op (ms_cross_entropy): no [M, C] log-probabilities are made; the
-- backward recomputes them from the logits and each row's saved max and log-sum.
local function cross_entropy_backward(node, g)
  local logits = node:saved_tensor(node.logits)
  local dlogits = empty(logits:shape(), logits._c.dtype, logits._c.storage.pool)
  check(lib.ms_cross_entropy_backward(dlogits._c, raw.contiguous(g)._c, logits._c,
                                      node:saved_tensor(node.stats)._c, node:saved_tensor(node.target)._c,
                                      node.ignore_index, node.reduction), "cross_entropy")
  return dlogits
end

local function cross_entropy_rows(logits, target, reduction, ignore_index)
  local dtype, pool, rows = logits._c.dtype, logits._c.storage.pool, logits:size(0)
  local out = empty(reduction == 0 and {rows} or {}, dtype, pool)
  local stats = empty({rows, 2}, dtype, pool)
  check(lib.ms_cross_entropy(out._c, stats._c, logits._c, target._c, ignore_index, reduction), "cross_entropy")
  local node = record(out, "CrossEntropyLossBackward0", cross_entropy_backward, logits)
  if node then
    node.ignore_index, node.reduction = ignore_index, reduction
    node.logits, node.stats, node.target = node:save(logits), node:save(stats), node:save(target)
  end
  stats:_release()
  return out
end

local cross_entropy_options = {reduction = true, ignore_index = true, label_smoothing = true}

-- cross_entropy(input, target, {reduction = "mean", ignore_index = -100, label_smoothing = 0})
-- over class indices, in PyTorch's layouts (see class_rows).
function M.cross_entropy(logits, target, opts)
  opts = raw.options("cross_entropy", opts, cross_entropy_options)
  need_tensor(logits, "cross_entropy", "input")
  need_tensor(target, "cross_entropy", "target")
  local reduction = reduction_of(opts, "cross_entropy")
  local smoothing = opts.label_smoothing or 0
  if type(smoothing) ~= "number" or smoothing < 0 or smoothing > 1 then
    fail("cross_entropy", "label_smoothing must be a number in [0, 1], got %s", tostring(smoothing))
  end
  local ignore_index = opts.ignore_index or -100
  local rows, flat_target, shape = class_rows(logits, target, "cross_entropy")
  if smoothing == 0 then
    return unflatten_none(cross_entropy_rows(rows, flat_target, reduction, ignore_index), reduction, shape)
  end
  local log_probs = M.log_softmax(rows, 1)
  local loss = smoothed(log_probs, flat_target, reduction, ignore_index, smoothing)
  log_probs:_release() -- backward holds its own handle; this one would wait for the collector
  return unflatten_none(loss, reduction, shape)
end

function M.mse_loss(input, target, opts)
  opts = raw.options("mse_loss", opts, {reduction = true})
  need_tensor(input, "mse_loss", "input")
  need_tensor(target, "mse_loss", "target")
  if not (input:shape() == target:shape()) then
    fail("mse_loss", "input %s and target %s shapes differ", tostring(input:shape()), tostring(target:shape()))
  end
  local squared = pointwise.square(pointwise.sub(input, target))
  local reduction = opts.reduction or "mean"
  if reduction == "mean" then return reduce.mean(squared) end
  if reduction == "sum" then return reduce.sum(squared) end
  if reduction == "none" then return squared end
  fail("mse_loss", "reduction must be 'none', 'mean' or 'sum', got '%s'", tostring(reduction))
end

-- ---- dropout ----

local function dropout_backward(node, g)
  local dx = empty_like(g)
  check(lib.ms_dropout_backward(dx._c, raw.contiguous(g)._c, node.p, node.seed, node.offset), "dropout")
  return dx
end

function M.dropout(x, p, training)
  need_tensor(x, "dropout", "input")
  p = p or 0.5
  if type(p) ~= "number" or p < 0 or p > 1 then fail("dropout", "p must be in [0, 1], got %s", tostring(p)) end
  if training == false or p == 0 then return x end
  local dense = raw.contiguous(x)
  local out = empty_like(dense)
  local seed, offset = random.take(dense:numel())
  check(lib.ms_dropout(out._c, dense._c, p, seed, offset), "dropout")
  local node = record(out, "DropoutBackward0", dropout_backward, x)
  if node then node.p, node.seed, node.offset = p, seed, offset end
  return out
end

-- ---- attention ----

local causal_masks = setmetatable({}, {__mode = "v"})

-- The additive [l, s] mask of is_causal: query i sees keys 0..i (PyTorch's top-left
-- aligned lower triangle, also when l ~= s).
local function causal_mask(l, s, dtype, pool)
  local key = l .. ":" .. s .. ":" .. dtype .. ":" .. pool
  local mask = causal_masks[key]
  if mask and rawget(mask, "_c") then return mask end
  mask = scope.keep(empty({l, s}, dtype, pool))
  local staging = empty({l, s}, lib.MS_F64, lib.MS_POOL_CPU)
  local values = require("ffi").cast("double*", lib.ms_tensor_data(staging._c))
  for i = 0, l - 1 do
    for j = 0, s - 1 do values[i * s + j] = j > i and -math.huge or 0 end
  end
  check(lib.ms_copy(mask._c, staging._c), "attention mask")
  staging:_release()
  causal_masks[key] = mask
  return mask
end

local INTEGER = {i32 = true, i64 = true, u8 = true}

-- A boolean mask (an integer tensor: nonzero takes part in attention) as the additive one
-- it stands for: log(1) = 0 where kept, log(0) = -inf where masked; a constant.
local function additive_mask(mask, dtype)
  local out = empty(mask:shape(), dtype, mask._c.storage.pool)
  check(lib.ms_copy(out._c, mask._c), "scaled_dot_product_attention")
  check(lib.ms_binary_scalar(out._c, out._c, 0, raw.NE, 0), "scaled_dot_product_attention")
  check(lib.ms_unary(out._c, out._c, raw.LOG), "scaled_dot_product_attention")
  return out
end

-- ---- flash-style attention (ms_attention): no [L, S] scores are made ----

local function unit_last_stride(t)
  local c = t._c
  return c.ndim > 0 and (c.shape[c.ndim - 1] <= 1 or c.strides[c.ndim - 1] == 1) and t or raw.contiguous(t)
end

-- A new tensor of `shape` (t's dims, the last one's size may differ) whose dims lie in memory
-- in the order of t's strides, largest first, the last dim last: heads read in place from a
-- [B, T, H, D] projection give results laid out as [B, T, H, D] too, which then view back to
-- [B, T, H * D] without a copy.
local function empty_laid_out_like(t, shape)
  local n = #shape
  local strides, order = t:stride(), {}
  -- dims 1 .. n - 1 by stride, largest first, ties in dim order (an insertion sort: a few dims)
  for d = 1, n - 1 do
    local at = d
    while at > 1 and strides[order[at - 1]] < strides[d] do
      order[at] = order[at - 1]
      at = at - 1
    end
    order[at] = d
  end
  order[n] = n
  local dense_shape = {}
  for i = 1, n do dense_shape[i] = shape[order[i]] end
  local dense = empty(dense_shape, t._c.dtype, t._c.storage.pool)
  local view_strides, stride = {}, 1
  for i = n, 1, -1 do
    view_strides[order[i]] = stride
    stride = stride * math.max(dense_shape[i], 1)
  end
  local out = Tensor.view_raw(dense, shape, view_strides, 0)
  dense:_release()
  return out
end

local function flash_backward(node, g)
  local q, k, v = node:saved_tensor(node.q), node:saved_tensor(node.k), node:saved_tensor(node.v)
  local mask = node.mask and node:saved_tensor(node.mask)
  local dq, dk, dv = empty_laid_out_like(q, q:shape()), empty_laid_out_like(k, k:shape()),
                     empty_laid_out_like(v, v:shape())
  check(lib.ms_attention_backward(dq._c, dk._c, dv._c, unit_last_stride(g)._c, q._c, k._c, v._c, mask and mask._c,
                                  node:saved_tensor(node.out)._c, node:saved_tensor(node.lse)._c, node.scale,
                                  node.causal), "scaled_dot_product_attention")
  return dq, dk, dv
end

-- mask: nil or an additive mask of q's dtype with the scores' shape (no gradient). The
-- kernel reads inputs whose last dim is strided from dense copies; the node's edges are the
-- inputs themselves, so their gradients reach them.
local function flash_attention(q_in, k_in, v_in, mask, scale, causal)
  local q, k, v = unit_last_stride(q_in), unit_last_stride(k_in), unit_last_stride(v_in)
  local shape = q:shape()
  local out_shape, lse_shape = {}, {}
  for i = 1, #shape - 1 do out_shape[i], lse_shape[i] = shape[i], shape[i] end
  out_shape[#shape] = v:size(-1)
  local out = empty_laid_out_like(q, out_shape)
  local lse = empty(lse_shape, q._c.dtype, q._c.storage.pool)
  check(lib.ms_attention(out._c, lse._c, q._c, k._c, v._c, mask and mask._c, scale, causal and 1 or 0),
        "scaled_dot_product_attention")
  local node = record(out, "ScaledDotProductFlashAttentionBackward0", flash_backward, q_in, k_in, v_in)
  if node then
    node.scale, node.causal = scale, causal and 1 or 0
    node.q, node.k, node.v, node.out, node.lse = node:save(q), node:save(k), node:save(v), node:save(out), node:save(lse)
    if mask then node.mask = node:save(mask) end
  end
  if q ~= q_in then q:_release() end
  if k ~= k_in then k:_release() end
  if v ~= v_in then v:_release() end
  lse:_release()
  return out
end

-- The mask as flash_attention takes it: additive, of q's dtype, expanded to the scores'
-- [..., L, S]; nil when it cannot be (the composition then names the problem).
local function flash_mask(q, k, mask)
  if mask:dim() > q:dim() then return nil end
  local additive = mask
  if INTEGER[mask:dtype()] then
    additive = additive_mask(mask, q._c.dtype)
  elseif mask:dtype() ~= q:dtype() then
    return nil
  end
  local shape = q:shape()
  shape[#shape] = k:size(-2)
  local ok, expanded = pcall(shape_ops.expand, additive, unpack(shape))
  return ok and expanded or nil
end

-- torch.backends.cuda.enable_flash_sdp's switch (on by default) for every place, and one for
-- CPU tensors alone (on by default too: on the CPU the kernel runs a head's query rows in
-- blocks through GEMMs, one head per worker thread, faster than the composition at
-- bench/fsdp.lua's sizes; off gives the composition, matmul + mask + softmax + matmul).
local flash_enabled, cpu_flash_enabled = true, true
function M.enable_flash_sdp(enabled) flash_enabled = enabled and true or false end
function M.flash_sdp_enabled() return flash_enabled end
function M.enable_cpu_flash_sdp(enabled) cpu_flash_enabled = enabled and true or false end
function M.cpu_flash_sdp_enabled() return cpu_flash_enabled end

local function flash_allowed(q)
  local storage = q._c.storage
  return flash_enabled and storage ~= nil and (cpu_flash_enabled or storage.pool >= lib.MS_POOL_CUDA0)
end

local function same_leading_dims(q, t)
  for i = 0, q:dim() - 3 do
    if t:size(i) ~= q:size(i) then return false end
  end
  return true
end

-- softmax(q k^T * scale + mask) v over [..., L, d] queries and [..., S, d] keys and values.
-- attn_mask broadcasts to [..., L, S]: an integer (boolean) mask keeps the positions where it
-- is nonzero (True), a float mask is added to the scores (and gets a gradient); is_causal
-- masks keys after each query. scale defaults to 1 / sqrt(d).
local function attention(q, k, v, opts)
  local what = "scaled_dot_product_attention"
  opts = raw.options(what, opts, {is_causal = true, dropout_p = true, scale = true, attn_mask = true})
  need_tensor(q, what, "query")
  need_tensor(k, what, "key")
  need_tensor(v, what, "value")
  for _, operand in ipairs({{q, "query"}, {k, "key"}, {v, "value"}}) do
    if operand[1]:dim() < 2 then
      fail(what, "%s must have at least 2 dims (..., L, E), got shape %s", operand[2], tostring(operand[1]:shape()))
    end
  end
  if opts.scale ~= nil and type(opts.scale) ~= "number" then fail(what, "scale must be a number, got %s", type(opts.scale)) end
  local p = opts.dropout_p
  if p ~= nil and (type(p) ~= "number" or p < 0 or p > 1) then
    fail(what, "dropout_p must be a number in [0, 1], got %s", tostring(p))
  end
  local mask = opts.attn_mask
  if mask ~= nil then
    need_tensor(mask, what, "attn_mask")
    if opts.is_causal then fail(what, "give attn_mask or is_causal, not both") end
  end
  local d = q:size(-1)
  -- flash-style unless dropout is on, a float mask needs its gradient, or the operands'
  -- leading dims broadcast
  local flash = flash_allowed(q) and not (opts.dropout_p and opts.dropout_p > 0) and q:dim() >= 2 and q:dim() <= 4
                and k:dim() == q:dim() and v:dim() == q:dim() and same_leading_dims(q, k)
                and same_leading_dims(q, v) and not (mask ~= nil and mask.requires_grad)
  if flash then
    local additive = mask ~= nil and flash_mask(q, k, mask) or nil
    if mask == nil or additive ~= nil then
      return flash_attention(q, k, v, additive, opts.scale or 1 / math.sqrt(d), opts.is_causal)
    end
  end
  local scores = pointwise.mul(linalg.matmul(q, shape_ops.transpose(k, -2, -1)), opts.scale or 1 / math.sqrt(d))
  if mask ~= nil then
    local scores_shape = scores:shape()
    local ok, shape = pcall(raw.broadcast_shape, scores, mask, what)
    local fits = ok and #shape == #scores_shape
    for i = 1, fits and #shape or 0 do fits = fits and shape[i] == scores_shape[i] end
    if not fits then
      fail(what, "attn_mask of shape %s does not broadcast to the attention scores %s", tostring(mask:shape()),
           tostring(scores_shape))
    end
    if INTEGER[mask:dtype()] then
      scores = pointwise.add(scores, additive_mask(mask, scores._c.dtype))
    elseif mask:dtype() ~= scores:dtype() then
      fail(what, "a float attn_mask must have the query's dtype %s, got %s (an integer mask is boolean)",
           scores:dtype(), mask:dtype())
    else
      scores = pointwise.add(scores, mask)
    end
  elseif opts.is_causal then
    scores = pointwise.add(scores, causal_mask(q:size(-2), k:size(-2), scores._c.dtype, scores._c.storage.pool))
  end
  -- a query row whose keys are all masked attends to nothing: 0, as PyTorch's attention
  local weights = softmax_op(scores, -1, mask ~= nil and lib.MS_SAFE_SOFTMAX or lib.MS_SOFTMAX, "softmax")
  if opts.dropout_p and opts.dropout_p > 0 then weights = M.dropout(weights, opts.dropout_p, true) end
  return linalg.matmul(weights, v)
end

function M.scaled_dot_product_attention(q, k, v, opts)
  if profiler.active then return profiler.within("attention", attention, q, k, v, opts) end
  return attention(q, k, v, opts)
end

-- ---- causal self-attention over a packed projection ----

-- Head `which` (0 q, 1 k, 2 v) of a contiguous [B, T, 3 * H * D] projection, or (three = 1)
-- of a contiguous [B, T, H * D] tensor, as a [B, H, T, D] view (no autograd).
local function head_view(t, which, three, batch, time, heads, head_dim)
  local width = three * heads * head_dim
  return Tensor.view_raw(t, {batch, heads, time, head_dim}, {time * width, head_dim, width, 1},
                         tonumber(t._c.offset) + which * heads * head_dim, "causal_self_attention")
end

local function release_all(...)
  for i = 1, select("#", ...) do (select(i, ...)):_release() end
end

local function packed_attention_backward(node, g)
  local qkv, out = node:saved_tensor(node.qkv), node:saved_tensor(node.out)
  local b, t, h, d = node.batch, node.time, node.heads, node.head_dim
  local dqkv = empty({b, t, 3 * h * d}, qkv._c.dtype, qkv._c.storage.pool)
  local q, k, v = head_view(qkv, 0, 3, b, t, h, d), head_view(qkv, 1, 3, b, t, h, d), head_view(qkv, 2, 3, b, t, h, d)
  local dq, dk, dv = head_view(dqkv, 0, 3, b, t, h, d), head_view(dqkv, 1, 3, b, t, h, d),
                     head_view(dqkv, 2, 3, b, t, h, d)
  local dense = raw.contiguous(g)
  local g4, out4 = head_view(dense, 0, 1, b, t, h, d), head_view(out, 0, 1, b, t, h, d)
  check(lib.ms_attention_backward(dq._c, dk._c, dv._c, g4._c, q._c, k._c, v._c, nil, out4._c,
                                  node:saved_tensor(node.lse)._c, node.scale, 1), "causal_self_attention")
  release_all(q, k, v, dq, dk, dv, g4, out4)
  if dense ~= g then dense:_release() end
  return dqkv
end

local function packed_attention(qkv, heads, scale)
  local what = "causal_self_attention"
  local batch, time, width = qkv:size(0), qkv:size(1), qkv:size(2)
  local head_dim = width / (3 * heads)
  local dense = raw.contiguous(qkv)
  local out = empty({batch, time, heads * head_dim}, dense._c.dtype, dense._c.storage.pool)
  local lse = empty({batch, heads, time}, dense._c.dtype, dense._c.storage.pool)
  local q, k, v = head_view(dense, 0, 3, batch, time, heads, head_dim), head_view(dense, 1, 3, batch, time, heads, head_dim),
                  head_view(dense, 2, 3, batch, time, heads, head_dim)
  local out4 = head_view(out, 0, 1, batch, time, heads, head_dim)
  check(lib.ms_attention(out4._c, lse._c, q._c, k._c, v._c, nil, scale, 1), what)
  release_all(q, k, v, out4)
  local node = record(out, "CausalSelfAttentionBackward0", packed_attention_backward, qkv)
  if node then
    node.batch, node.time, node.heads, node.head_dim, node.scale = batch, time, heads, head_dim, scale
    node.qkv, node.out, node.lse = node:save(dense), node:save(out), node:save(lse)
  end
  if dense ~= qkv then dense:_release() end
  lse:_release()
  return out
end

-- causal_self_attention as split + scaled_dot_product_attention (dropout, or flash off). A
-- function of its own: the closure here would keep the hot path above from compiling.
local function composed_attention(qkv, heads, opts)
  local batch, time = qkv:size(0), qkv:size(1)
  local head_dim = qkv:size(2) / (3 * heads)
  local function split_heads(t)
    return shape_ops.transpose(shape_ops.reshape(t, batch, time, heads, head_dim), 1, 2)
  end
  local parts = shape_ops.split(qkv, heads * head_dim, 2)
  local y = M.scaled_dot_product_attention(split_heads(parts[1]), split_heads(parts[2]), split_heads(parts[3]),
                                           {is_causal = true, dropout_p = opts.dropout_p, scale = opts.scale})
  return shape_ops.reshape(shape_ops.transpose(y, 1, 2), batch, time, heads * head_dim)
end

-- Causal self-attention of a [B, T, 3C] projection holding q, k and v side by side (C = heads
-- x head_dim, as CausalSelfAttention's c_attn makes it): [B, T, C], the heads' outputs side by
-- side. The same numbers as splitting qkv into heads for scaled_dot_product_attention with
-- is_causal, without its views and copies: the kernel reads the heads in place, writes the
-- output in [B, T, C] order, and the backward writes dq, dk and dv into one [B, T, 3C] gradient.
-- Dropout composes the ops as scaled_dot_product_attention does.
function M.causal_self_attention(qkv, heads, opts)
  local what = "causal_self_attention"
  need_tensor(qkv, what, "qkv")
  opts = raw.options(what, opts, {dropout_p = true, scale = true})
  if type(heads) ~= "number" or heads < 1 or heads % 1 ~= 0 then
    fail(what, "heads must be a positive whole number, got %s %s", type(heads), tostring(heads))
  end
  if qkv:dim() ~= 3 or qkv:size(2) % (3 * heads) ~= 0 then
    fail(what, "qkv must be [B, T, 3 * heads * head_dim] with %d heads, got shape %s", heads, tostring(qkv:shape()))
  end
  local batch, time = qkv:size(0), qkv:size(1)
  local head_dim = qkv:size(2) / (3 * heads)
  local scale = opts.scale or 1 / math.sqrt(head_dim)
  -- no rows: nothing to attend over; an empty [B, T, C] that still takes part in autograd
  if batch * time == 0 then return shape_ops.narrow(qkv, 2, 0, heads * head_dim) end
  local dropout = opts.dropout_p and opts.dropout_p > 0
  if not dropout and flash_allowed(qkv) then
    if profiler.active then return profiler.within("attention", packed_attention, qkv, heads, scale) end
    return packed_attention(qkv, heads, scale)
  end
  return composed_attention(qkv, heads, opts)
end

return M
