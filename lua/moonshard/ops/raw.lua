-- Non-differentiable building blocks over the C ops: element-wise, broadcasting shapes,
-- reductions to a shape. The differentiable operations in moonshard.ops are made of these.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local lib, check, fail = C.lib, C.check, C.fail
local empty_like, empty = Tensor.empty_like_raw, Tensor.empty_raw
local bit = require "bit"

local M = {}

-- The op codes of ops.h (ms_binary_op, ms_unary_op, ms_reduce_op), by their C names.
for _, name in ipairs({"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "POW", "EQ", "NE", "LT",
                       "LE", "GT", "GE", "NEG", "EXP", "LOG", "SQRT", "RSQRT", "ABS", "TANH",
                       "SIGMOID", "RELU", "GELU", "GELU_TANH", "SIN", "COS", "SIGN", "RECIPROCAL",
                       "SQUARE", "SUM", "MEAN", "MAX", "MIN", "SUMSQ"}) do
  M[name] = lib["MS_" .. name]
end

local function same_shape(ac, bc)
  if ac.ndim ~= bc.ndim then return false end
  for d = 0, ac.ndim - 1 do
    if ac.shape[d] ~= bc.shape[d] then return false end
  end
  return true
end
M.same_shape = same_shape

-- Broadcast shape of a and b as a Lua array; raises naming both shapes.
function M.broadcast_shape(a, b, what)
  local ac, bc = a._c, b._c
  local na, nb = ac.ndim, bc.ndim
  local n = na > nb and na or nb
  local shape = {}
  for i = 0, n - 1 do
    local da, db = i - (n - na), i - (n - nb)
    local sa = da >= 0 and tonumber(ac.shape[da]) or 1
    local sb = db >= 0 and tonumber(bc.shape[db]) or 1
    if sa == sb or sb == 1 then
      shape[i + 1] = sa
    elseif sa == 1 then
      shape[i + 1] = sb
    else
      fail(what, "shapes %s and %s cannot be broadcast together", tostring(a:shape()),
           tostring(b:shape()))
    end
  end
  return shape
end

local function check_dtypes(a, b, what)
  if a._c.dtype ~= b._c.dtype then
    fail(what, "dtypes %s and %s do not match", a:dtype(), b:dtype())
  end
end
M.check_dtypes = check_dtypes

-- The element-wise ops below take an optional grad_fn: the autograd node of their result
-- (see Tensor.wrap).
function M.binary(a, b, op, what, grad_fn)
  check_dtypes(a, b, what)
  local out
  if same_shape(a._c, b._c) then
    out = empty_like(a, nil, grad_fn)
  else
    out = empty(M.broadcast_shape(a, b, what), a._c.dtype, a._c.storage.pool, grad_fn)
  end
  check(lib.ms_binary(out._c, a._c, b._c, op), what)
  return out
end

function M.scalar(a, s, op, reverse, what, grad_fn)
  local out = empty_like(a, nil, grad_fn)
  check(lib.ms_binary_scalar(out._c, a._c, s, op, reverse and 1 or 0), what)
  return out
end

function M.unary(a, op, what, grad_fn)
  local out = empty_like(a, nil, grad_fn)
  check(lib.ms_unary(out._c, a._c, op), what)
  return out
end

function M.unary_backward(x, grad, op, what)
  local out = empty_like(grad)
  check(lib.ms_unary_backward(out._c, x._c, grad._c, op), what)
  return out
end

-- Reduce over the dims in dims (0-based array), keeping them as size 1.
function M.reduce_keepdim(a, op, dims, what)
  local c = a._c
  local shape, mask = {}, 0
  for d = 0, c.ndim - 1 do shape[d + 1] = tonumber(c.shape[d]) end
  for _, d in ipairs(dims) do
    mask = bit.bor(mask, bit.lshift(1, d))
    shape[d + 1] = 1
  end
  local out = empty(shape, c.dtype, c.storage.pool)
  check(lib.ms_reduce(out._c, c, op, mask), what)
  return out
end

-- Sum grad down to shape (a Lua array or Size): the backward of broadcasting.
function M.sum_to(grad, shape)
  local gc = grad._c
  local n, target_n = gc.ndim, #shape
  local same = n == target_n
  if same then
    for d = 0, n - 1 do
      if gc.shape[d] ~= shape[d + 1] then same = false break end
    end
  end
  if same then return grad end
  local dims = {}
  local lead = n - target_n
  for d = 0, n - 1 do
    if d < lead or (shape[d - lead + 1] == 1 and gc.shape[d] ~= 1) then dims[#dims + 1] = d end
  end
  local reduced = M.reduce_keepdim(grad, M.SUM, dims, "sum_to")
  local out = Tensor.view_raw(reduced, shape, nil, 0, "sum_to")
  reduced:_release()
  return out
end

-- opts (nil or a table) with only the keys named in allowed (a set); a misspelt option
-- raises instead of being ignored. Returns opts or an empty table.
function M.options(what, opts, allowed)
  if opts == nil then return {} end
  if type(opts) ~= "table" then fail(what, "options must be a table, got %s", type(opts)) end
  for key in pairs(opts) do
    if not allowed[key] then fail(what, "unknown option '%s'", tostring(key)) end
  end
  return opts
end

function M.copy(src)
  local out = empty_like(src)
  check(lib.ms_copy(out._c, src._c), "clone")
  return out
end

function M.contiguous(t)
  if lib.ms_tensor_is_contiguous(t._c) == 1 then return t end
  return M.copy(t)
end

function M.fill(t, value, what)
  check(lib.ms_fill(t._c, value), what or "fill")
  return t
end

function M.zeros_like(t)
  local out = empty_like(t)
  check(lib.ms_fill(out._c, 0), "zeros_like")
  return out
end

-- A new uninitialised tensor of shape with like's dtype and place.
function M.empty_shape(shape, like) return empty(shape, like._c.dtype, like._c.storage.pool) end

-- Zero-filled tensor of shape (Lua array) with like's dtype and pool.
function M.zeros_like_shape(shape, like)
  local out = empty(shape, like._c.dtype, like._c.storage.pool)
  check(lib.ms_fill(out._c, 0), "zeros")
  return out
end

return M
