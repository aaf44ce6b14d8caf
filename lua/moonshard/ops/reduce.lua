-- Differentiable reductions: sum, mean, max and min over all elements or some dims.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local raw = require "moonshard.ops.raw"

local bit = require "bit"
local scope = require "moonshard.scope"

local lib, check, fail = C.lib, C.check, C.fail
local record = autograd.record

local M = {}

-- dims argument: nil (all), a number, or an array; returns a sorted 0-based array.
local function resolve_dims(t, dim, what)
  local dims = {}
  if dim == nil then
    for d = 0, t:dim() - 1 do dims[#dims + 1] = d end
    return dims
  end
  local list = type(dim) == "table" and dim or {dim}
  local seen = {}
  for _, d in ipairs(list) do
    d = Tensor.normalize_dim(t, d, what)
    if seen[d] then fail(what, "dim %d repeated", d) end
    seen[d] = true
    dims[#dims + 1] = d
  end
  table.sort(dims)
  return dims
end

-- Drop the reduced dims from a keepdim result unless keepdim.
local function finish(reduced, dims, keepdim)
  if keepdim then return reduced end
  local shape, drop = reduced:shape(), {}
  for _, d in ipairs(dims) do drop[d + 1] = true end
  local kept = {}
  for d = 1, #shape do if not drop[d] then kept[#kept + 1] = shape[d] end end
  local out = Tensor.view_raw(reduced, kept, nil, 0, "reduce")
  reduced:_release()
  return out
end

-- Broadcast g (reduced shape, with or without the reduced dims) back to the input shape.
local function spread(node, g)
  local dense = raw.contiguous(g)
  local g_keep = Tensor.view_raw(dense, node.keep_shape, nil, tonumber(dense._c.offset), "reduce")
  local out = Tensor.empty_raw(node.input_shape, g._c.dtype, g._c.storage.pool)
  check(lib.ms_copy(out._c, g_keep._c), "reduce backward")
  return out
end

local function sum_backward(node, g) return spread(node, g) end

local function mean_backward(node, g)
  local out = spread(node, g)
  check(lib.ms_binary_scalar(out._c, out._c, node.count, raw.DIV, 0), "mean backward")
  return out
end

local function reduce_op(t, dim, keepdim, op, what, backward)
  if not Tensor.is_tensor(t) then fail(what, "expected a tensor, got %s", type(t)) end
  local dims = resolve_dims(t, dim, what)
  local reduced = raw.reduce_keepdim(t, op, dims, what)
  local keep_shape = reduced:shape()
  local out = finish(reduced, dims, keepdim)
  local node = record(out, what:gsub("^%l", string.upper) .. "Backward0", backward, t)
  if node then
    node.input_shape, node.keep_shape = t:shape(), keep_shape
    node.count = t:numel() / math.max(1, out:numel())
  end
  return out
end

function M.sum(t, dim, keepdim) return reduce_op(t, dim, keepdim, raw.SUM, "sum", sum_backward) end
function M.mean(t, dim, keepdim)
  if not Tensor.is_tensor(t) then fail("mean", "expected a tensor, got %s", type(t)) end
  return reduce_op(t, dim, keepdim, raw.MEAN, "mean", mean_backward) -- of nothing: NaN, as PyTorch
end

-- One-hot mask (input dtype) of the positions named by indices along dim.
local function index_mask(node, indices)
  local shape = node.input_shape
  local positions_shape = {}
  for d = 1, #shape do positions_shape[d] = (d == node.dim + 1) and shape[d] or 1 end
  local positions = Tensor.empty_raw(positions_shape, lib.MS_I64, indices._c.storage.pool)
  check(lib.ms_arange(positions._c, 0, 1), "max backward")
  local hits = Tensor.empty_raw(shape, lib.MS_I64, indices._c.storage.pool)
  check(lib.ms_binary(hits._c, Tensor.view_raw(indices, node.keep_shape, nil, tonumber(indices._c.offset))._c,
                      positions._c, raw.EQ), "max backward")
  local mask = Tensor.empty_raw(shape, node.dtype, indices._c.storage.pool)
  check(lib.ms_copy(mask._c, hits._c), "max backward")
  return mask
end

local function extremum_dim_backward(node, g)
  local mask = index_mask(node, node.indices)
  local dense = raw.contiguous(g)
  local g_keep = Tensor.view_raw(dense, node.keep_shape, nil, tonumber(dense._c.offset))
  return raw.binary(mask, g_keep, raw.MUL, node.name)
end

-- max(t) / min(t) without a dim: the gradient spread evenly over every element equal to the
-- result (NaN counting as equal to a NaN result), as PyTorch's.
local function extremum_all_backward(node, g)
  local source, value = node:saved_tensor(node.source), node:saved_tensor(node.value)
  local ties = raw.binary(source, value, raw.EQ, node.name)
  local nan_source = raw.binary(source, source, raw.NE, node.name)
  local nan_value = raw.binary(value, value, raw.NE, node.name)
  ties = raw.binary(ties, raw.binary(nan_source, nan_value, raw.MUL, node.name), raw.ADD, node.name)
  local count = raw.reduce_keepdim(ties, raw.SUM, {0}, node.name)
  local dense = raw.contiguous(g)
  local share = raw.binary(dense, count, raw.DIV, node.name)
  return raw.binary(ties, share, raw.MUL, node.name)
end

local function extremum(t, dim, keepdim, op, what)
  if not Tensor.is_tensor(t) then fail(what, "expected a tensor, got %s", type(t)) end
  if t:numel() == 0 then fail(what, "%s of an empty tensor", what) end
  local source, d = t, dim
  if dim == nil then
    source, d = t:reshape(-1), 0
  else
    d = Tensor.normalize_dim(t, dim, what)
  end
  local sc = source._c
  local keep_shape = source:shape()
  keep_shape[d + 1] = 1
  local values = Tensor.empty_raw(keep_shape, sc.dtype, sc.storage.pool)
  local indices = Tensor.empty_raw(keep_shape, lib.MS_I64, sc.storage.pool)
  local searched = source
  if op == raw.MIN then searched = raw.unary(source, raw.NEG, what) end
  check(lib.ms_max_dim(values._c, indices._c, searched._c, d), what)
  if op == raw.MIN then values = raw.unary(values, raw.NEG, what) end
  local saved_indices = scope.keep(Tensor.alias_raw(indices))
  local out_values, out_indices
  if dim == nil then
    out_values = finish(values, {0}, false)
    indices:_release()
  else
    out_values, out_indices = finish(values, {d}, keepdim), finish(indices, {d}, keepdim)
  end
  local node = record(out_values, what:gsub("^%l", string.upper) .. "Backward0",
                     dim == nil and extremum_all_backward or extremum_dim_backward, source)
  if node and dim == nil then
    node.source, node.value = node:save(source), node:save(out_values)
  elseif node then
    node.input_shape, node.keep_shape, node.dim, node.dtype = source:shape(), keep_shape, d, sc.dtype
    node.indices = saved_indices
  end
  return out_values, out_indices
end

-- max(t): the largest element; max(t, dim[, keepdim]): values and i64 indices.
function M.max(t, dim, keepdim) return extremum(t, dim, keepdim, raw.MAX, "max") end
function M.min(t, dim, keepdim) return extremum(t, dim, keepdim, raw.MIN, "min") end

function M.argmax(t, dim, keepdim)
  local _, indices = extremum(t, dim or nil, keepdim, raw.MAX, "argmax")
  return indices
end

-- Sum of squares over every element, as a Lua number (gradient norms, clipping).
function M.sum_of_squares(t)
  if not Tensor.is_tensor(t) then fail("sum_of_squares", "expected a tensor, got %s", type(t)) end
  local ones, mask = {}, 0
  for d = 1, t:dim() do
    ones[d] = 1
    mask = bit.bor(mask, bit.lshift(1, d - 1))
  end
  local reduced = Tensor.empty_raw(ones, t._c.dtype, t._c.storage.pool)
  check(lib.ms_reduce(reduced._c, t._c, raw.SUMSQ, mask), "sum_of_squares")
  local value = reduced:item()
  reduced:_release()
  return value
end

return M
