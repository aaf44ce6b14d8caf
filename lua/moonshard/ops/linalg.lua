-- Differentiable matrix products over BLAS (ms_matmul): matmul (1-D to N-D with batch
-- broadcasting), bmm, and the fused linear layer y = x W^T + b.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local raw = require "moonshard.ops.raw"
local shape_ops = require "moonshard.ops.shape"

local lib, check, fail = C.lib, C.check, C.fail
local record = autograd.record
local empty = Tensor.empty_raw

local M = {}

-- out = op(a) @ op(b) into a new tensor of out_shape.
local function gemm(a, b, trans_a, trans_b, out_shape, what)
  local out = empty(out_shape, a._c.dtype, a._c.storage.pool)
  check(lib.ms_matmul(out._c, a._c, b._c, trans_a, trans_b, 1, 0), what)
  return out
end

-- Core product of [M, K] x [K, N] or [B, M, K] x [B, K, N].
local function mm_backward(node, g)
  local ga, gb
  if node[1] then ga = gemm(g, node:saved_tensor(node.b), 0, 1, node.a_shape, "matmul backward") end
  if node[2] then gb = gemm(node:saved_tensor(node.a), g, 1, 0, node.b_shape, "matmul backward") end
  return ga, gb
end

local function mm_core(a, b)
  local ac, bc = a._c, b._c
  local n = ac.ndim
  local out_shape = {}
  for d = 0, n - 2 do out_shape[d + 1] = tonumber(ac.shape[d]) end
  out_shape[n] = tonumber(bc.shape[n - 1])
  local out = autograd.run_op("matmul", gemm, a, b, 0, 0, out_shape, "matmul")
  local node = record(out, "MmBackward0", mm_backward, a, b)
  if node then
    node.a_shape, node.b_shape = a:shape(), b:shape()
    if node[2] then node.a = node:save(a) end
    if node[1] then node.b = node:save(b) end
  end
  return out
end

-- Intermediate views made inside matmul are released as soon as they are consumed, so
-- their storage returns to the pool now rather than when the collector finds them
-- (autograd keeps its own handles to what it saves).
local function reshape_released(t, shape)
  local out = shape_ops.reshape(t, shape)
  t:_release()
  return out
end

local function size_error(a, b)
  fail("matmul", "shapes %s and %s cannot be multiplied", tostring(a:shape()), tostring(b:shape()))
end

-- torch.matmul semantics.
function M.matmul(a, b)
  if not Tensor.is_tensor(a) or not Tensor.is_tensor(b) then
    fail("matmul", "expected two tensors, got %s and %s", type(a), type(b))
  end
  raw.check_dtypes(a, b, "matmul")
  local ac, bc = a._c, b._c
  local na, nb = ac.ndim, bc.ndim
  if na == 0 or nb == 0 then fail("matmul", "both arguments need at least 1 dimension") end
  if ac.shape[na - 1] ~= bc.shape[nb == 1 and 0 or nb - 2] then size_error(a, b) end
  if nb == 2 and na == 2 then return mm_core(a, b) end
  local sa, sb = a:shape(), b:shape()
  if na == 1 and nb == 1 then
    return shape_ops.reshape(mm_core(shape_ops.reshape(a, 1, sa[1]), shape_ops.reshape(b, sb[1], 1)), {})
  end
  if nb == 1 then
    local out = M.matmul(a, shape_ops.reshape(b, sb[1], 1))
    return shape_ops.squeeze(out, -1)
  end
  if na == 1 then
    local out = M.matmul(shape_ops.reshape(a, 1, sa[1]), b)
    return shape_ops.squeeze(out, -2)
  end
  if nb == 2 then
    -- [..., M, K] x [K, N]: one GEMM over the flattened leading dims
    local rows = a:numel() / sa[na]
    local flat_a = shape_ops.reshape(a, rows, sa[na])
    local out = mm_core(flat_a, b)
    flat_a:_release()
    local out_shape = {}
    for d = 1, na - 1 do out_shape[d] = sa[d] end
    out_shape[na] = sb[2]
    return reshape_released(out, out_shape)
  end
  -- batched: broadcast the batch dims; BLAS reads every matrix through its strides (a
  -- transposed or sliced view included), so no operand is copied
  local batch_a, batch_b = {}, {}
  for d = 1, na - 2 do batch_a[d] = sa[d] end
  for d = 1, nb - 2 do batch_b[d] = sb[d] end
  local nbatch = math.max(#batch_a, #batch_b)
  local batch = {}
  for i = 1, nbatch do
    local x = batch_a[i - (nbatch - #batch_a)] or 1
    local y = batch_b[i - (nbatch - #batch_b)] or 1
    if x ~= y and x ~= 1 and y ~= 1 then size_error(a, b) end
    batch[i] = math.max(x, y)
  end
  -- t with batch dims `batch`, and whether that made a new view
  local function batched(t, own_batch, rows, cols)
    local same = #own_batch == nbatch
    for i = 1, #own_batch do same = same and own_batch[i] == batch[i] end
    if same then return t, false end
    local full = {}
    for i, s in ipairs(batch) do full[i] = s end
    full[#full + 1], full[#full + 2] = rows, cols
    return shape_ops.expand(t, full), true
  end
  local batch_a_full, new_a = batched(a, batch_a, sa[na - 1], sa[na])
  local batch_b_full, new_b = batched(b, batch_b, sb[nb - 1], sb[nb])
  local out = mm_core(batch_a_full, batch_b_full)
  if new_a then batch_a_full:_release() end
  if new_b then batch_b_full:_release() end
  return out
end

function M.mm(a, b)
  if not Tensor.is_tensor(a) or not Tensor.is_tensor(b) then fail("mm", "expected two tensors") end
  if a:dim() ~= 2 or b:dim() ~= 2 then fail("mm", "expects 2-D tensors, got %dD and %dD", a:dim(), b:dim()) end
  return M.matmul(a, b)
end

function M.bmm(a, b)
  if not Tensor.is_tensor(a) or not Tensor.is_tensor(b) then fail("bmm", "expected two tensors") end
  if a:dim() ~= 3 or b:dim() ~= 3 then fail("bmm", "expects 3-D tensors, got %dD and %dD", a:dim(), b:dim()) end
  if a:size(0) ~= b:size(0) then fail("bmm", "batch sizes %d and %d differ", a:size(0), b:size(0)) end
  return M.matmul(a, b)
end

-- ---- linear: y = x W^T + b over the flattened leading dims of x ----

-- x's rows as a linear layer sees them: the product of its leading dims (numel / in_features
-- would be 0 / 0 for in_features 0).
function M.leading_rows(x)
  local rows = 1
  for d = 0, x:dim() - 2 do rows = rows * x:size(d) end
  return rows
end

local function linear_backward(node, g)
  local rows, out_features, in_features = node.rows, node.out_features, node.in_features
  local g2 = raw.contiguous(g)
  g2 = Tensor.view_raw(g2, {rows, out_features}, nil, tonumber(g2._c.offset), "linear backward")
  local gx, gw, gb
  if node[1] then
    gx = gemm(g2, node:saved_tensor(node.weight), 0, 0, {rows, in_features}, "linear backward")
    gx = Tensor.view_raw(gx, node.x_shape, nil, 0, "linear backward")
  end
  if node[2] then
    local x = node:saved_tensor(node.x)
    local x2 = Tensor.view_raw(x, {rows, in_features}, nil, tonumber(x._c.offset), "linear backward")
    gw = gemm(g2, x2, 1, 0, {out_features, in_features}, "linear backward")
  end
  if node[3] then
    gb = raw.reduce_keepdim(g2, raw.SUM, {0}, "linear backward")
    gb = Tensor.view_raw(gb, {out_features}, nil, 0, "linear backward")
  end
  return gx, gw, gb
end

-- x2 [rows, in] times weight^T, plus bias: a new [rows, out_features] tensor.
local function linear_product(x2, weight, bias, rows, out_features)
  local out = empty({rows, out_features}, x2._c.dtype, x2._c.storage.pool)
  check(lib.ms_linear(out._c, x2._c, weight._c, bias ~= nil and bias._c or nil), "linear")
  return out
end

function M.linear(x, weight, bias)
  if not Tensor.is_tensor(x) or not Tensor.is_tensor(weight) then
    fail("linear", "input and weight must be tensors")
  end
  if weight:dim() ~= 2 then fail("linear", "weight must be 2-D, got shape %s", tostring(weight:shape())) end
  local in_features, out_features = weight:size(1), weight:size(0)
  if x:dim() == 0 or x:size(-1) ~= in_features then
    fail("linear", "input of shape %s does not match weight of shape %s (expected last dim %d)",
         tostring(x:shape()), tostring(weight:shape()), in_features)
  end
  raw.check_dtypes(x, weight, "linear")
  if bias ~= nil then
    if not Tensor.is_tensor(bias) or bias:dim() ~= 1 or bias:size(0) ~= out_features then
      fail("linear", "bias must be a 1-D tensor of %d elements", out_features)
    end
    raw.check_dtypes(x, bias, "linear")
  end
  local dense = raw.contiguous(x)
  local rows = M.leading_rows(dense)
  local x2 = Tensor.view_raw(dense, {rows, in_features}, nil, tonumber(dense._c.offset), "linear")
  local out_shape = x:shape()
  out_shape[#out_shape] = out_features
  local out = autograd.run_op("linear", linear_product, x2, weight, bias, rows, out_features)
  x2:_release()
  local result = Tensor.view_raw(out, out_shape, nil, 0, "linear")
  out:_release()
  local node = record(result, "LinearBackward0", linear_backward, x, weight, bias)
  if node then
    node.rows, node.in_features, node.out_features = rows, in_features, out_features
    node.x_shape = x:shape()
    if node[2] then node.x = node:save(dense) end
    if node[1] then node.weight = node:save(weight) end
  end
  if dense ~= x then dense:_release() end
  return result
end

return M
