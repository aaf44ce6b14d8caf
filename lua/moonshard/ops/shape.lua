-- Differentiable views and shape operations: view/reshape, transpose/permute, narrow,
-- select, (un)squeeze, expand, contiguous, clone, detach, cat/stack, chunk/split, to.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local raw = require "moonshard.ops.raw"

local lib, check, fail = C.lib, C.check, C.fail
local record, record_list = autograd.record, autograd.record_list
local view_raw, normalize_dim = Tensor.view_raw, Tensor.normalize_dim

local M = {}

local function need_tensor(t, what)
  if not Tensor.is_tensor(t) then fail(what, "expected a tensor, got %s", type(t)) end
end

local function geometry(t)
  local c = t._c
  local shape, strides = {}, {}
  for d = 0, c.ndim - 1 do
    shape[d + 1] = tonumber(c.shape[d])
    strides[d + 1] = tonumber(c.strides[d])
  end
  return shape, strides, tonumber(c.offset)
end
M.geometry = geometry

-- Resolve a requested shape (numbers or one table, one entry may be -1) for numel elements.
local function resolve_shape(what, numel, ...)
  local first = ...
  local requested = type(first) == "table" and first or {...}
  local shape = {}
  local infer, known = nil, 1
  for i, s in ipairs(requested) do
    if s == -1 then
      if infer then fail(what, "only one dimension can be -1") end
      infer = i
    elseif type(s) ~= "number" or s < 0 or s % 1 ~= 0 then
      fail(what, "invalid size %s at dim %d", tostring(s), i - 1)
    else
      known = known * s
    end
    shape[i] = s
  end
  if infer then
    if known == 0 or numel % known ~= 0 then
      fail(what, "shape %s is invalid for input of size %d", "[" .. table.concat(requested, ", ") .. "]", numel)
    end
    shape[infer] = numel / known
  elseif known ~= numel then
    fail(what, "shape %s is invalid for input of size %d", "[" .. table.concat(requested, ", ") .. "]", numel)
  end
  return shape
end

-- The strides that show t's elements in row-major order as `shape`, or nil when no view
-- can (PyTorch's rule): t's dims are taken in runs laid out contiguously one after another,
-- and each run must split into whole dims of the new shape.
local function view_strides(t, shape)
  local c = t._c
  local n = #shape
  local strides = {}
  if c.numel == 0 or c.ndim == 0 then
    local stride = 1
    for d = n, 1, -1 do strides[d] = stride; stride = stride * math.max(shape[d], 1) end
    return strides
  end
  local view_d = n
  local base = tonumber(c.strides[c.ndim - 1])
  local run_numel, view_numel = 1, 1
  for d = c.ndim - 1, 0, -1 do
    run_numel = run_numel * tonumber(c.shape[d])
    local run_ends = d == 0 or (c.shape[d - 1] ~= 1 and tonumber(c.strides[d - 1]) ~= run_numel * base)
    if run_ends then
      while view_d >= 1 and (view_numel < run_numel or shape[view_d] == 1) do
        strides[view_d] = view_numel * base
        view_numel = view_numel * shape[view_d]
        view_d = view_d - 1
      end
      if view_numel ~= run_numel then return nil end
      if d > 0 then
        base = tonumber(c.strides[d - 1])
        run_numel, view_numel = 1, 1
      end
    end
  end
  if view_d ~= 0 then return nil end
  return strides
end

-- t as `shape` without autograd: a view where one exists, else a contiguous copy.
local function reshape_raw(t, shape)
  local strides = view_strides(t, shape)
  if not strides then
    t = raw.contiguous(t)
    strides = view_strides(t, shape)
  end
  return view_raw(t, shape, strides, tonumber(t._c.offset), "view")
end

local function reshape_backward(node, g) return reshape_raw(g, node.input_shape) end

-- torch's view: a tensor sharing t's storage, for any t whose layout allows it.
function M.view(t, ...)
  need_tensor(t, "view")
  local shape = resolve_shape("view", t:numel(), ...)
  local strides = view_strides(t, shape)
  if not strides then
    fail("view", "a tensor of shape %s and strides %s cannot be viewed as %s; use reshape (which copies) instead",
         tostring(t:shape()), "[" .. table.concat(t:stride(), ", ") .. "]", "[" .. table.concat(shape, ", ") .. "]")
  end
  local out = view_raw(t, shape, strides, tonumber(t._c.offset), "view")
  local node = record(out, "ViewBackward0", reshape_backward, t)
  if node then node.input_shape = t:shape() end
  return out
end

-- torch's reshape: a view when t's layout allows one, else a copy.
function M.reshape(t, ...)
  need_tensor(t, "reshape")
  local shape = resolve_shape("reshape", t:numel(), ...)
  if view_strides(t, shape) then return M.view(t, shape) end
  return M.view(M.contiguous(t), shape)
end

function M.flatten(t, start_dim, end_dim)
  need_tensor(t, "flatten")
  local ndim = t:dim()
  if ndim == 0 then return M.reshape(t, 1) end
  start_dim = normalize_dim(t, start_dim or 0, "flatten")
  end_dim = normalize_dim(t, end_dim or -1, "flatten")
  if start_dim > end_dim then fail("flatten", "start_dim %d comes after end_dim %d", start_dim, end_dim) end
  local shape, new = t:shape(), {}
  for d = 1, start_dim do new[#new + 1] = shape[d] end
  local merged = 1
  for d = start_dim + 1, end_dim + 1 do merged = merged * shape[d] end
  new[#new + 1] = merged
  for d = end_dim + 2, ndim do new[#new + 1] = shape[d] end
  return M.reshape(t, new)
end

local function permute_backward(node, g)
  return M.permute(g, node.inverse)
end

function M.permute(t, ...)
  need_tensor(t, "permute")
  local dims = type((...)) == "table" and (...) or {...}
  local ndim = t:dim()
  if #dims ~= ndim then fail("permute", "%d dims given for a tensor of %d dimensions", #dims, ndim) end
  local shape, strides, offset = geometry(t)
  local new_shape, new_strides, inverse, used = {}, {}, {}, {}
  for i, d in ipairs(dims) do
    d = normalize_dim(t, d, "permute")
    if used[d] then fail("permute", "dim %d repeated", d) end
    used[d] = true
    new_shape[i], new_strides[i] = shape[d + 1], strides[d + 1]
    inverse[d + 1] = i - 1
  end
  local out = view_raw(t, new_shape, new_strides, offset, "permute")
  local node = record(out, "PermuteBackward0", permute_backward, t)
  if node then node.inverse = inverse end
  return out
end

function M.transpose(t, d0, d1)
  need_tensor(t, "transpose")
  local ndim = t:dim()
  d0, d1 = normalize_dim(t, d0, "transpose"), normalize_dim(t, d1, "transpose")
  local dims = {}
  for d = 0, ndim - 1 do dims[d + 1] = d end
  dims[d0 + 1], dims[d1 + 1] = d1, d0
  return M.permute(t, dims)
end

function M.t(t)
  need_tensor(t, "t")
  if t:dim() > 2 then fail("t", "expects a tensor with <= 2 dimensions, got %d", t:dim()) end
  if t:dim() < 2 then return t end
  return M.transpose(t, 0, 1)
end

local function narrow_backward(node, g)
  local grad = raw.zeros_like_shape(node.input_shape, g)
  local _, strides = geometry(grad)
  local region_shape = g:shape()
  local region = view_raw(grad, region_shape, strides, node.start * strides[node.dim + 1], "narrow")
  check(lib.ms_copy(region._c, g._c), "narrow")
  region:_release()
  return grad
end

function M.narrow(t, dim, start, length)
  need_tensor(t, "narrow")
  dim = normalize_dim(t, dim, "narrow")
  local size = t:size(dim)
  if type(start) ~= "number" or type(length) ~= "number" or start % 1 ~= 0 or length % 1 ~= 0 then
    fail("narrow", "start and length must be whole numbers, got %s and %s", tostring(start), tostring(length))
  end
  if start < 0 then start = start + size end
  if start < 0 or length < 0 or start + length > size then
    fail("narrow", "range [%d, %d) is outside dim %d of size %d", start, start + length, dim, size)
  end
  local shape, strides, offset = geometry(t)
  shape[dim + 1] = length
  local out = view_raw(t, shape, strides, offset + start * strides[dim + 1], "narrow")
  local node = record(out, "NarrowBackward0", narrow_backward, t)
  if node then node.input_shape, node.dim, node.start = t:shape(), dim, start end
  return out
end

function M.select(t, dim, index)
  need_tensor(t, "select")
  dim = normalize_dim(t, dim, "select")
  local size = t:size(dim)
  if type(index) ~= "number" or index % 1 ~= 0 or index < -size or index >= size then
    fail("select", "index %s is out of range for dim %d of size %d", tostring(index), dim, size)
  end
  if index < 0 then index = index + size end
  return M.squeeze(M.narrow(t, dim, index, 1), dim)
end

function M.unsqueeze(t, dim)
  need_tensor(t, "unsqueeze")
  dim = normalize_dim(t, dim, "unsqueeze", 1)
  local shape = t:shape()
  table.insert(shape, dim + 1, 1)
  return M.reshape(t, shape)
end

local function squeeze_backward(node, g)
  return M.reshape(g, node.input_shape)
end

function M.squeeze(t, dim)
  need_tensor(t, "squeeze")
  local shape, new = t:shape(), {}
  if dim ~= nil then dim = normalize_dim(t, dim, "squeeze") end
  for d = 1, #shape do
    if not (shape[d] == 1 and (dim == nil or dim == d - 1)) then new[#new + 1] = shape[d] end
  end
  local shape_in, strides, offset = geometry(t)
  local new_strides = {}
  for d = 1, #shape_in do
    if not (shape_in[d] == 1 and (dim == nil or dim == d - 1)) then new_strides[#new_strides + 1] = strides[d] end
  end
  local out = view_raw(t, new, new_strides, offset, "squeeze")
  local node = record(out, "SqueezeBackward0", squeeze_backward, t)
  if node then node.input_shape = t:shape() end
  return out
end

local function expand_backward(node, g) return raw.sum_to(g, node.input_shape) end

function M.expand(t, ...)
  need_tensor(t, "expand")
  local target = type((...)) == "table" and (...) or {...}
  local shape, strides, offset = geometry(t)
  local n, lead = #target, #target - #shape
  if lead < 0 then fail("expand", "cannot expand %d dims to %d", #shape, n) end
  local new_shape, new_strides = {}, {}
  for i = 1, n do
    local want = target[i]
    if type(want) ~= "number" or want % 1 ~= 0 or want < -1 then
      fail("expand", "sizes must be whole numbers >= 0 (or -1 to keep a dim), got %s", tostring(want))
    end
    if i <= lead then
      if want == -1 then fail("expand", "-1 not allowed for new leading dims") end
      new_shape[i], new_strides[i] = want, 0
    else
      local have = shape[i - lead]
      if want == -1 or want == have then
        new_shape[i], new_strides[i] = have, strides[i - lead]
      elseif have == 1 then
        new_shape[i], new_strides[i] = want, 0
      else
        fail("expand", "size %d at dim %d cannot expand to %d", have, i - lead - 1, want)
      end
    end
  end
  local out = view_raw(t, new_shape, new_strides, offset, "expand")
  local node = record(out, "ExpandBackward0", expand_backward, t)
  if node then node.input_shape = t:shape() end
  return out
end

function M.expand_as(t, other)
  need_tensor(other, "expand_as")
  return M.expand(t, other:shape())
end

local function identity_backward(_, g) return g end

function M.contiguous(t)
  need_tensor(t, "contiguous")
  if t:is_contiguous() then return t end
  local out = raw.copy(t)
  record(out, "ContiguousBackward0", identity_backward, t)
  return out
end

function M.clone(t)
  need_tensor(t, "clone")
  local out = raw.copy(t)
  record(out, "CloneBackward0", identity_backward, t)
  return out
end

-- A new tensor sharing t's storage, outside the graph.
function M.detach(t)
  need_tensor(t, "detach")
  return Tensor.alias_raw(t)
end

local function to_backward(node, g)
  local out = Tensor.empty_raw(g:shape(), node.source_dtype, node.source_pool)
  check(lib.ms_copy(out._c, g._c), "to")
  return out
end

-- t:to("f64"), t:to("host"), t:to({dtype = "f64", device = "cpu"}).
function M.to(t, target, opts)
  need_tensor(t, "to")
  local dtype, device = t._c.dtype, t._c.storage.pool
  if target ~= nil and type(target) ~= "string" and type(target) ~= "table" then
    fail("to", "expected a dtype or device name or an options table, got %s", type(target))
  end
  local spec = raw.options("to", type(target) == "table" and target or opts, {dtype = true, device = true, copy = true})
  if type(target) == "string" then
    local ok_dtype, id = pcall(Tensor.dtype_id, target, "to")
    if ok_dtype then dtype = id else device = Tensor.pool_id(target, "to") end
  end
  if spec.dtype then dtype = Tensor.dtype_id(spec.dtype, "to") end
  if spec.device then device = Tensor.pool_id(spec.device, "to") end
  if dtype == t._c.dtype and device == t._c.storage.pool and not spec.copy then return t end
  local out = Tensor.empty_raw(t:shape(), dtype, device)
  check(lib.ms_copy(out._c, t._c), "to")
  if dtype <= 3 and t._c.dtype <= 3 then -- gradients flow between floating dtypes only
    local node = record(out, "ToBackward0", to_backward, t)
    if node then node.source_dtype, node.source_pool = t._c.dtype, t._c.storage.pool end
  end
  return out
end

local function cat_backward(node, g)
  local grads, start = {}, 0
  for i, size in ipairs(node.sizes) do
    grads[i] = raw.contiguous(M.narrow(g, node.dim, start, size))
    start = start + size
  end
  return unpack(grads, 1, #node.sizes)
end

function M.cat(tensors, dim)
  dim = dim or 0
  if type(tensors) ~= "table" or #tensors == 0 then fail("cat", "expected a non-empty array of tensors") end
  local first = tensors[1]
  if not Tensor.is_tensor(first) then fail("cat", "element 1 is not a tensor") end
  for i, t in ipairs(tensors) do
    if Tensor.is_tensor(t) and t:dim() == 0 then
      fail("cat", "element %d is a zero-dimensional tensor, which cannot be concatenated (stack them)", i)
    end
  end
  local d = normalize_dim(first, dim, "cat")
  local shape = first:shape()
  local total, sizes = 0, {}
  for i, t in ipairs(tensors) do
    if not Tensor.is_tensor(t) then fail("cat", "element %d is not a tensor", i) end
    local s = t:shape()
    if #s ~= #shape then fail("cat", "tensor %d has %d dims, expected %d", i, #s, #shape) end
    for k = 1, #s do
      if k ~= d + 1 and s[k] ~= shape[k] then
        fail("cat", "sizes of tensors must match except in dim %d: %s vs %s", d, tostring(s), tostring(shape))
      end
    end
    raw.check_dtypes(first, t, "cat")
    sizes[i] = s[d + 1]
    total = total + s[d + 1]
  end
  shape[d + 1] = total
  local out = Tensor.empty_raw(shape, first._c.dtype, first._c.storage.pool)
  local _, strides = geometry(out)
  local start = 0
  for i, t in ipairs(tensors) do
    local region_shape = t:shape()
    local region = view_raw(out, region_shape, strides, start * strides[d + 1], "cat")
    check(lib.ms_copy(region._c, t._c), "cat")
    region:_release()
    start = start + sizes[i]
  end
  local node = record_list(out, "CatBackward0", cat_backward, tensors)
  if node then node.sizes, node.dim = sizes, d end
  return out
end

function M.stack(tensors, dim)
  dim = dim or 0
  if type(tensors) ~= "table" or #tensors == 0 then fail("stack", "expected a non-empty array of tensors") end
  for i, t in ipairs(tensors) do
    if not Tensor.is_tensor(t) then fail("stack", "element %d is not a tensor", i) end
  end
  local expanded = {}
  for i, t in ipairs(tensors) do expanded[i] = M.unsqueeze(t, dim) end
  return M.cat(expanded, dim)
end

-- split's backward: one gradient of t's shape, each piece's region written once (its
-- gradient, or zeros where none came), as PyTorch's SplitBackward concatenates.
local function split_backward(node, grads)
  local like
  for _, g in pairs(grads) do like = g break end
  local grad = raw.empty_shape(node.input_shape, like)
  local _, strides = geometry(grad)
  local dim = node.dim
  for i, length in ipairs(node.lengths) do
    local shape = grad:shape()
    shape[dim + 1] = length
    local region = view_raw(grad, shape, strides, node.starts[i] * strides[dim + 1], "split")
    if grads[i] then
      check(lib.ms_copy(region._c, grads[i]._c), "split")
    else
      check(lib.ms_fill(region._c, 0), "split")
    end
    region:_release()
  end
  return grad
end

-- Pieces of `lengths` along dim, views of t with one backward node for all of them.
local function split_lengths(t, dim, lengths)
  local shape, strides, offset = geometry(t)
  local parts, starts, start = {}, {}, 0
  for i, length in ipairs(lengths) do
    shape[dim + 1] = length
    parts[i] = view_raw(t, shape, strides, offset + start * strides[dim + 1], "split")
    starts[i] = start
    start = start + length
  end
  local node = autograd.record_outputs(parts, "SplitBackward0", split_backward, {t})
  if node then node.input_shape, node.dim, node.lengths, node.starts = t:shape(), dim, lengths, starts end
  return parts
end

function M.split(t, split_size, dim)
  need_tensor(t, "split")
  dim = normalize_dim(t, dim or 0, "split")
  local size = t:size(dim)
  local lengths = {}
  if type(split_size) == "table" then
    local total = 0
    for i, length in ipairs(split_size) do
      if type(length) ~= "number" or length < 0 or length % 1 ~= 0 then
        fail("split", "split sizes must be whole numbers >= 0, got %s", tostring(length))
      end
      lengths[i], total = length, total + length
    end
    if total ~= size then fail("split", "sizes add up to %d, dim %d has %d", total, dim, size) end
    return split_lengths(t, dim, lengths)
  end
  if type(split_size) ~= "number" or split_size <= 0 or split_size % 1 ~= 0 then
    fail("split", "split_size must be a positive whole number, got %s", tostring(split_size))
  end
  if size == 0 then return split_lengths(t, dim, {0}) end -- one empty piece, as PyTorch
  local start = 0
  while start < size do
    lengths[#lengths + 1] = math.min(split_size, size - start)
    start = start + lengths[#lengths]
  end
  return split_lengths(t, dim, lengths)
end

function M.chunk(t, chunks, dim)
  need_tensor(t, "chunk")
  if type(chunks) ~= "number" or chunks < 1 or chunks % 1 ~= 0 then
    fail("chunk", "chunks must be a positive integer, got %s", tostring(chunks))
  end
  dim = normalize_dim(t, dim or 0, "chunk")
  return M.split(t, math.max(1, math.ceil(t:size(dim) / chunks)), dim)
end

return M
