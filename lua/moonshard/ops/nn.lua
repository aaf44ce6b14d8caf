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
                                node.log), node.name)
  return dx
end

local function softmax_op(x, dim, log, what)
  need_tensor(x, what, "input")
  if dim == nil then fail(what, "dim is required") end
  dim = Tensor.normalize_dim(x, dim, what)
  local out = empty_like(x)
  check(lib.ms_softmax(out._c, x._c, dim, log), what)
  local node = record(out, what == "softmax" and "SoftmaxBackward0" or "LogSoftmaxBackward0", softmax_backward, x)
  if node then
    node.dim, node.log = dim, log
    node.y = node:save(out)
  end
  return out
end

function M.softmax(x, dim) return softmax_op(x, dim, 0, "softmax") end
function M.log_softmax(x, dim) return softmax_op(x, dim, 1, "log_softmax") end

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

function M.layer_norm(x, normalized_shape, weight, bias, eps)
  need_tensor(x, "layer_norm", "input")
  if type(normalized_shape) == "number" then normalized_shape = {normalized_shape} end
  if type(normalized_shape) ~= "table" then fail("layer_norm", "normalized_shape must be a number or a table") end
  local n = #normalized_shape
  local shape = x:shape()
  if n == 0 or n > #shape then fail("layer_norm", "normalized_shape has %d dims, input %d", n, #shape) end
  local row = 1
  for i = 1, n do
    if shape[#shape - n + i] ~= normalized_shape[i] then
      fail("layer_norm", "input shape %s does not end with normalized_shape [%s]", tostring(shape),
           table.concat(normalized_shape, ", "))
    end
    row = row * normalized_shape[i]
  end
  if eps ~= nil and (type(eps) ~= "number" or eps < 0) then
    fail("layer_norm", "eps must be a non-negative number, got %s", tostring(eps))
  end
  local rows = row > 0 and x:numel() / row or 0
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

function M.nll_loss(logp, target, opts)
  opts = raw.options("nll_loss", opts, loss_options)
  need_tensor(logp, "nll_loss", "input")
  need_tensor(target, "nll_loss", "target")
  local reduction = reductions[opts.reduction or "mean"]
  if not reduction then fail("nll_loss", "reduction must be 'none', 'mean' or 'sum', got '%s'", tostring(opts.reduction)) end
  if logp:dim() ~= 2 or target:dim() ~= 1 or target:size(0) ~= logp:size(0) then
    fail("nll_loss", "expected input [N, C] and target [N], got %s and %s (flatten with view(-1, C))",
         tostring(logp:shape()), tostring(target:shape()))
  end
  local ignore_index = opts.ignore_index or -100
  local out = empty(reduction == 0 and {logp:size(0)} or {}, logp._c.dtype, logp._c.storage.pool)
  check(lib.ms_nll_loss(out._c, logp._c, target._c, ignore_index, reduction), "nll_loss")
  local node = record(out, "NllLossBackward0", nll_backward, logp)
  if node then
    node.input_shape, node.ignore_index, node.reduction = logp:shape(), ignore_index, reduction
    node.target = node:save(target)
  end
  return out
end

function M.cross_entropy(logits, target, opts)
  raw.options("cross_entropy", opts, loss_options)
  need_tensor(logits, "cross_entropy", "input")
  if logits:dim() ~= 2 then
    fail("cross_entropy", "expected input [N, C], got %s (flatten with view(-1, C))", tostring(logits:shape()))
  end
  local log_probs = M.log_softmax(logits, 1)
  local loss = M.nll_loss(log_probs, target, opts)
  log_probs:_release() -- backward holds its own handle; this one would wait for the collector
  return loss
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

local function causal_mask(t, dtype, pool)
  local key = t .. ":" .. dtype .. ":" .. pool
  local mask = causal_masks[key]
  if mask and rawget(mask, "_c") then return mask end
  mask = scope.keep(empty({t, t}, dtype, pool))
  local staging = empty({t, t}, lib.MS_F64, lib.MS_POOL_CPU)
  local values = require("ffi").cast("double*", lib.ms_tensor_data(staging._c))
  for i = 0, t - 1 do
    for j = 0, t - 1 do values[i * t + j] = j > i and -math.huge or 0 end
  end
  check(lib.ms_copy(mask._c, staging._c), "attention mask")
  staging:_release()
  causal_masks[key] = mask
  return mask
end

-- softmax(q k^T / sqrt(d) [+ causal mask]) v over [..., T, d] tensors.
function M.scaled_dot_product_attention(q, k, v, opts)
  opts = raw.options("scaled_dot_product_attention", opts, {is_causal = true, dropout_p = true, scale = true})
  need_tensor(q, "scaled_dot_product_attention", "query")
  need_tensor(k, "scaled_dot_product_attention", "key")
  need_tensor(v, "scaled_dot_product_attention", "value")
  local d = q:size(-1)
  local scores = pointwise.mul(linalg.matmul(q, shape_ops.transpose(k, -2, -1)), opts.scale or 1 / math.sqrt(d))
  if opts.is_causal then
    local t = q:size(-2)
    scores = pointwise.add(scores, causal_mask(t, scores._c.dtype, scores._c.storage.pool))
  end
  local weights = M.softmax(scores, -1)
  if opts.dropout_p and opts.dropout_p > 0 then weights = M.dropout(weights, opts.dropout_p, true) end
  return linalg.matmul(weights, v)
end

return M
