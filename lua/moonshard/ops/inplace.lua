-- In-place updates (fill_, zero_, copy_, add_, mul_, ...): not recorded by autograd, so
-- they refuse tensors that take part in a graph while grad mode is on.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local raw = require "moonshard.ops.raw"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local function writable(t, what)
  if not Tensor.is_tensor(t) then fail(what, "expected a tensor, got %s", type(t)) end
  if t.requires_grad and autograd.is_grad_enabled() then
    if t.grad_fn == nil then
      fail(what, "a leaf tensor that requires grad is used in an in-place operation " ..
           "(wrap it in ms.no_grad)")
    end
    fail(what, "in-place operations on tensors that are part of the autograd graph are not supported")
  end
end

local function done(t)
  t:_bump_version()
  return t
end

function M.fill_(t, value)
  writable(t, "fill_")
  if type(value) ~= "number" then fail("fill_", "value must be a number, got %s", type(value)) end
  check(lib.ms_fill(t._c, value), "fill_")
  return done(t)
end

function M.zero_(t) return M.fill_(t, 0) end

function M.copy_(t, src)
  writable(t, "copy_")
  if not Tensor.is_tensor(src) then fail("copy_", "source must be a tensor, got %s", type(src)) end
  check(lib.ms_copy(t._c, src._c), "copy_")
  return done(t)
end

local function binary_(name, op)
  return function(t, other, alpha)
    writable(t, name)
    if type(other) == "number" then
      check(lib.ms_binary_scalar(t._c, t._c, other * (alpha or 1), op, 0), name)
      return done(t)
    end
    if not Tensor.is_tensor(other) then fail(name, "expected a tensor or a number, got %s", type(other)) end
    if alpha and alpha ~= 1 then other = raw.scalar(other, alpha, raw.MUL, false, name) end
    raw.check_dtypes(t, other, name)
    check(lib.ms_binary(t._c, t._c, other._c, op), name)
    return done(t)
  end
end

M.add_ = binary_("add_", raw.ADD)
M.sub_ = binary_("sub_", raw.SUB)
M.mul_ = binary_("mul_", raw.MUL)
M.div_ = binary_("div_", raw.DIV)

function M.clamp_(t, low, high)
  writable(t, "clamp_")
  if (low ~= nil and type(low) ~= "number") or (high ~= nil and type(high) ~= "number") then
    fail("clamp_", "bounds must be numbers or nil, got %s and %s", type(low), type(high))
  end
  if low then check(lib.ms_binary_scalar(t._c, t._c, low, raw.MAXIMUM, 0), "clamp_") end
  if high then check(lib.ms_binary_scalar(t._c, t._c, high, raw.MINIMUM, 0), "clamp_") end
  return done(t)
end

return M
