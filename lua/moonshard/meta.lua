-- Meta tensors (device "meta"): a shape and a dtype with no storage, for building models
-- larger than one rank; an op reading one raises naming the op and the tensor.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local fail = C.fail

local Meta = Tensor.Meta
local M = {}

local methods = {}

-- A meta tensor of shape (a Lua array) and dtype (an id).
function M.new(shape, dtype)
  local copy = {}
  for i, s in ipairs(shape) do copy[i] = s end
  return setmetatable({_meta_shape = copy, _meta_dtype = dtype}, Meta)
end

local function describe(t)
  local name = rawget(t, "_meta_name")
  return ("%s%s %s"):format(name and "'" .. name .. "' " or "", tostring(methods.shape(t)), methods.dtype(t))
end

local function no_data(op, t)
  fail(op, "tensor %s is on the meta device and has no data (materialise it first: fsdp.FSDP with " ..
       "param_init_fn, or module:to_empty() and an initialiser)", describe(t))
end

-- The public op that tried to read the tensor's data (linear rather than the dtype check
-- inside it): the innermost function of the calling stack that moonshard's op modules export.
local op_names
local function caller_name()
  if not op_names then
    op_names = {}
    for _, path in ipairs({"moonshard.ops.inplace", "moonshard.ops.reduce", "moonshard.ops.shape",
                           "moonshard.ops.pointwise", "moonshard.ops.nn", "moonshard.ops.linalg", "moonshard.dist"}) do
      for name, fn in pairs(require(path)) do
        if type(fn) == "function" then op_names[fn] = name end
      end
    end
  end
  for level = 3, 40 do
    local info = debug.getinfo(level, "f")
    if not info then break end
    if op_names[info.func] then return op_names[info.func] end
  end
  return "tensor op"
end

function methods.shape(t) return setmetatable({unpack(t._meta_shape)}, Tensor.Size) end
function methods.size(t, dim)
  if dim == nil then return methods.shape(t) end
  local n = #t._meta_shape
  local d = dim < 0 and dim + n or dim
  if d < 0 or d >= n then fail("size", "dim %d out of range for a tensor of %d dimensions", dim, n) end
  return t._meta_shape[d + 1]
end
function methods.dim(t) return #t._meta_shape end
function methods.numel(t)
  local n = 1
  for _, s in ipairs(t._meta_shape) do n = n * s end
  return n
end
function methods.dtype(t) return Tensor.dtype_names[t._meta_dtype] end
function methods.device() return "meta" end
function methods.is_meta() return true end
function methods.is_leaf(t) return rawget(t, "grad_fn") == nil end
function methods.is_contiguous() return true end
function methods.detach(t) return M.new(t._meta_shape, t._meta_dtype) end
-- In-place fills of a meta tensor do nothing (as on PyTorch's meta device).
function methods.fill_(t) return t end
function methods.zero_(t) return t end
function methods.requires_grad_(t, flag)
  t.requires_grad = flag ~= false or nil
  return t
end

Meta.__index = function(t, key)
  local method = methods[key]
  if method then return method end
  if key == "_c" then no_data(caller_name(), t) end
  if type(Tensor[key]) == "function" then
    return function() no_data(key, t) end
  end
  return nil
end

for event, op in pairs({__add = "add", __sub = "sub", __mul = "mul", __div = "div", __pow = "pow",
                        __unm = "neg", __concat = "concat"}) do
  Meta[event] = function(a, b)
    no_data(op, getmetatable(a) == Meta and a or b)
  end
end

Meta.__tostring = function(t)
  return ("tensor(..., shape=%s, dtype=%s, device=meta%s)"):format(tostring(methods.shape(t)), methods.dtype(t),
                                                                 t.requires_grad and ", requires_grad=true" or "")
end

return M
