-- The Tensor object: a Lua table around one ms_tensor handle, with constructors,
-- metadata, element access and printing. Differentiable operations live in moonshard.ops.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local scope = require "moonshard.scope"
local finally = require "moonshard.finally"
local handles = require "moonshard.handles"

local lib, check, fail = C.lib, C.check, C.fail
local own, flush_due = handles.own, handles.flush_due

local Tensor = {}
Tensor.__index = Tensor
Tensor.__name = "Tensor"

-- Metatable of meta tensors (shape and dtype, no storage); filled in by moonshard.meta.
local Meta = {__name = "MetaTensor"}
Tensor.Meta = Meta

-- A released tensor raises on any use instead of touching freed memory.
local Released = {__released = true}
local function used_after_release()
  error("moonshard: tensor: used after it was released (it was a temporary of a module call, " ..
        "a gradient a tensor hook received, which lives until backward returns, or freed " ..
        "explicitly; return it from forward or call ms.keep(t) to keep it)", 0)
end
Released.__index = function(_, key)
  if key == "_c" or key == "requires_grad" or key == "grad_fn" or key == "_keep" then
    return nil
  end
  used_after_release()
end
for _, event in ipairs({"__add", "__sub", "__mul", "__div", "__pow", "__unm"}) do
  Released[event] = used_after_release
end
Released.__tostring = function() return "tensor(<released>)" end

-- The dtypes and their names come from the runtime (ms_dtype, ms_dtype_name).
local dtype_ids, dtype_names = {}, {}
for id = 0, lib.MS_DTYPE_COUNT - 1 do
  local name = ffi.string(lib.ms_dtype_name(id))
  dtype_ids[name], dtype_names[id] = id, name
end
local dtype_aliases = {
  float32 = "f32", float = "f32", float64 = "f64", double = "f64", bfloat16 = "bf16",
  float16 = "f16", half = "f16", int32 = "i32", int = "i32", int64 = "i64", long = "i64",
  uint8 = "u8", bool = "u8",
}
Tensor.dtype_ids, Tensor.dtype_names = dtype_ids, dtype_names

local default_dtype = "f32"

local function dtype_id(name, what)
  local canonical = dtype_aliases[name] or name
  local id = dtype_ids[canonical]
  if not id then
    fail(what, "unknown dtype '%s' (expected f32, f64, bf16, f16, i32, i64 or u8)", tostring(name))
  end
  return id
end
Tensor.dtype_id = dtype_id

local pool_ids = {cpu = lib.MS_POOL_CPU, host = lib.MS_POOL_HOST}
local pool_id_out = ffi.new("int[1]")
local function pool_id(device, what)
  local id = pool_ids[device]
  if id then return id end
  if type(device) ~= "string" then
    fail(what, "device must be a string such as 'cpu', got %s", type(device))
  end
  check(lib.ms_pool_find(device, pool_id_out), what)
  pool_ids[device] = pool_id_out[0]
  return pool_id_out[0]
end
Tensor.pool_id = pool_id

-- ---- construction ----

local out_handle = ffi.new("ms_tensor*[1]")
local shape_buf = ffi.new("int64_t[8]")

-- Own a fresh handle: released by its scope, explicitly, or after the collector found its
-- cdata dead (moonshard.handles; _slot is its slot there). grad_fn, when given, is the autograd
-- node producing the tensor (set in the constructor: adding the fields afterwards would grow
-- the table twice).
local function wrap(handle, grad_fn)
  local t
  if grad_fn then
    t = setmetatable({_c = handle, _slot = own(handle), grad_fn = grad_fn, requires_grad = true},
                     Tensor)
  else
    t = setmetatable({_c = handle, _slot = own(handle)}, Tensor)
  end
  scope.track(t)
  return t
end
Tensor.wrap = wrap

function Tensor:_release()
  local handle = rawget(self, "_c")
  if handle ~= nil then
    self._c = nil
    handles.release(self._slot, handle)
  end
  setmetatable(self, Released)
end

-- Handles whose tensors were collected are freed before allocating, so their storage is reused.
local function new_handle(dtype, shape, ndim, pool, what)
  flush_due()
  check(lib.ms_tensor_new(out_handle, dtype, ndim, shape, pool), what)
  return out_handle[0]
end

-- Empty tensor from a Lua shape array (grad_fn as for wrap).
local function empty(shape, dtype, pool, grad_fn)
  local n = #shape
  for i = 1, n do shape_buf[i - 1] = shape[i] end
  return wrap(new_handle(dtype or lib.MS_F32, shape_buf, n, pool or lib.MS_POOL_CPU, "empty"),
              grad_fn)
end
Tensor.empty_raw = empty

-- Empty tensor with t's shape, dtype and pool (or the dtype given; grad_fn as for wrap).
local function empty_like(t, dtype, grad_fn)
  local c = t._c
  return wrap(new_handle(dtype or c.dtype, c.shape, c.ndim, c.storage.pool, "empty_like"),
              grad_fn)
end
Tensor.empty_like_raw = empty_like

-- A new handle viewing t's storage with the given geometry (Lua arrays; strides nil means
-- contiguous).
local stride_buf = ffi.new("int64_t[8]")
function Tensor.view_raw(t, shape, strides, offset, what)
  local n = #shape
  for i = 1, n do shape_buf[i - 1] = shape[i] end
  local strides_ptr = nil
  if strides then
    for i = 1, n do stride_buf[i - 1] = strides[i] end
    strides_ptr = stride_buf
  end
  check(lib.ms_tensor_view(out_handle, t._c, n, shape_buf, strides_ptr, offset), what or "view")
  return wrap(out_handle[0])
end

-- A new handle with exactly t's geometry (shares storage).
function Tensor.alias_raw(t)
  local c = t._c
  check(lib.ms_tensor_view(out_handle, c, c.ndim, c.shape, c.strides, c.offset), "alias")
  return wrap(out_handle[0])
end

-- Parse (n1, n2, ..., [opts]) or ({n1, n2}, [opts]): returns shape array, opts table.
local function parse_shape(what, ...)
  local nargs = select("#", ...)
  local first = ...
  local shape, opts
  if type(first) == "table" and getmetatable(first) ~= Tensor then
    shape = {}
    for i = 1, #first do shape[i] = first[i] end
    opts = select(2, ...)
  else
    shape = {}
    for i = 1, nargs do
      local v = select(i, ...)
      if type(v) == "number" then
        shape[#shape + 1] = v
      elseif type(v) == "table" and i == nargs then
        opts = v
      elseif v ~= nil then
        fail(what, "argument %d: expected a size or an options table, got %s", i, type(v))
      end
    end
  end
  if #shape > 8 then fail(what, "%d dimensions (at most 8)", #shape) end
  for d, size in ipairs(shape) do
    if type(size) ~= "number" or size < 0 or size % 1 ~= 0 then
      fail(what, "size %s at dim %d is not a non-negative integer", tostring(size), d - 1)
    end
  end
  if opts ~= nil and type(opts) ~= "table" then
    fail(what, "options must be a table, got %s", type(opts))
  end
  return shape, opts or {}
end
Tensor.parse_shape = parse_shape

local function apply_options(t, opts, what)
  if opts.requires_grad then
    if dtype_ids[t:dtype()] >= dtype_ids.i32 then
      fail(what, "only floating-point tensors can require gradients, not %s", t:dtype())
    end
    t.requires_grad = true
  end
  return t
end

local creation_options = {dtype = true, device = true, requires_grad = true}

-- The device factories use when no device is given (ms.device sets it for a function).
local default_device = "cpu"

local function is_meta(t) return getmetatable(t) == Meta end
Tensor.is_meta = is_meta

local function create(what, opts, shape)
  for key in pairs(opts) do
    if not creation_options[key] then
      fail(what, "unknown option '%s' (expected dtype, device or requires_grad)", tostring(key))
    end
  end
  local dtype = dtype_id(opts.dtype or default_dtype, what)
  local device = opts.device or default_device
  if device == "meta" then return require("moonshard.meta").new(shape, dtype) end
  return empty(shape, dtype, pool_id(device, what))
end
Tensor.create = create

-- ms.device(device, fn, ...): run fn with device as the factories' default ("meta": tensors
-- without storage, for deferred initialisation).
function Tensor.with_device(device, fn, ...)
  if device ~= "meta" then pool_id(device, "device") end
  if not C.is_callable(fn) then fail("device", "expected a function (or callable table) to run, got %s", type(fn)) end
  local saved = default_device
  default_device = device
  return finally(function() default_device = saved end, fn, ...)
end

function Tensor.empty(...)
  local shape, opts = parse_shape("empty", ...)
  return apply_options(create("empty", opts, shape), opts, "empty")
end

function Tensor.full_with(what, value, shape, opts)
  local t = create(what, opts, shape)
  if not is_meta(t) then check(lib.ms_fill(t._c, value), what) end
  return apply_options(t, opts, what)
end

function Tensor.zeros(...)
  local shape, opts = parse_shape("zeros", ...)
  return Tensor.full_with("zeros", 0, shape, opts)
end

function Tensor.ones(...)
  local shape, opts = parse_shape("ones", ...)
  return Tensor.full_with("ones", 1, shape, opts)
end

function Tensor.full(shape, value, opts)
  if type(value) ~= "number" then fail("full", "fill value must be a number, got %s", type(value)) end
  local parsed = parse_shape("full", shape)
  return Tensor.full_with("full", value, parsed, opts or {})
end

-- ms.arange(stop) / arange(start, stop[, step][, opts]) like torch.arange.
function Tensor.arange(a, b, c, d)
  local opts = {}
  local args = {}
  for _, v in ipairs({a, b, c, d}) do
    if type(v) == "table" then opts = v else args[#args + 1] = v end
  end
  local start, stop, step = 0, args[1], 1
  if #args >= 2 then start, stop, step = args[1], args[2], args[3] or 1 end
  if type(stop) ~= "number" or type(start) ~= "number" or type(step) ~= "number" then
    fail("arange", "start, stop and step must be numbers")
  end
  if step == 0 then fail("arange", "step must not be zero") end
  local n = math.max(0, math.ceil((stop - start) / step))
  local t = create("arange", opts, {n})
  if not is_meta(t) then check(lib.ms_arange(t._c, start, step), "arange") end
  return apply_options(t, opts, "arange")
end

-- ms.tensor{{1, 2}, {3, 4}}: nested Lua arrays of numbers (or booleans).
function Tensor.from_table(data, opts)
  opts = opts or {}
  local scalar = type(data) == "number"
  if scalar then data = {data} end
  if type(data) ~= "table" then fail("tensor", "expected a number or a nested table, got %s", type(data)) end
  local shape = {}
  local level = data
  while type(level) == "table" do
    shape[#shape + 1] = #level
    level = level[1]
  end
  if scalar then shape = {} end
  local numel = 1
  for _, s in ipairs(shape) do numel = numel * s end
  local staging = empty(shape, lib.MS_F64, lib.MS_POOL_CPU)
  local values = ffi.cast("double*", lib.ms_tensor_data(staging._c))
  local index = 0
  local function fill(node, dim)
    if dim > #shape then
      if type(node) == "boolean" then node = node and 1 or 0 end
      if type(node) ~= "number" then fail("tensor", "element %d is %s, not a number", index, type(node)) end
      values[index] = node
      index = index + 1
      return
    end
    if type(node) ~= "table" or #node ~= shape[dim] then
      fail("tensor", "ragged nested table: dim %d should have %d entries", dim - 1, shape[dim])
    end
    for i = 1, shape[dim] do fill(node[i], dim + 1) end
  end
  if scalar then values[0] = data[1]; index = 1 else fill(data, 1) end
  local t = create("tensor", opts, shape)
  if not is_meta(t) then check(lib.ms_copy(t._c, staging._c), "tensor") end
  staging:_release()
  return apply_options(t, opts, "tensor")
end

-- ---- metadata ----

local Size = {}
Size.__index = Size
Size.__eq = function(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end
Size.__tostring = function(s) return "[" .. table.concat(s, ", ") .. "]" end
Tensor.Size = Size

function Tensor:shape()
  local c = self._c
  local s = {}
  for d = 0, c.ndim - 1 do s[d + 1] = tonumber(c.shape[d]) end
  return setmetatable(s, Size)
end

local function normalize_dim(self, dim, what, extra)
  local ndim = self._c.ndim + (extra or 0)
  if type(dim) ~= "number" or dim % 1 ~= 0 then
    fail(what, "dim must be an integer, got %s", tostring(dim))
  end
  local d = dim < 0 and dim + ndim or dim
  if d < 0 or d >= math.max(ndim, 1) then
    fail(what, "dim %d out of range for a tensor of %d dimensions", dim, self._c.ndim)
  end
  return d
end
Tensor.normalize_dim = normalize_dim

function Tensor:size(dim)
  if dim == nil then return self:shape() end
  return tonumber(self._c.shape[normalize_dim(self, dim, "size")])
end

function Tensor:stride(dim)
  local c = self._c
  if dim == nil then
    local s = {}
    for d = 0, c.ndim - 1 do s[d + 1] = tonumber(c.strides[d]) end
    return s
  end
  return tonumber(c.strides[normalize_dim(self, dim, "stride")])
end

function Tensor:dim() return self._c.ndim end
function Tensor:numel() return tonumber(self._c.numel) end
function Tensor:dtype() return dtype_names[self._c.dtype] end
function Tensor:device() return ffi.string(lib.ms_pool_name(self._c.storage.pool)) end
function Tensor:is_contiguous() return lib.ms_tensor_is_contiguous(self._c) == 1 end
function Tensor:nbytes() return tonumber(lib.ms_tensor_nbytes(self._c)) end
function Tensor:is_leaf() return self.grad_fn == nil end
function Tensor:data_ptr() return lib.ms_tensor_data(self._c) end
function Tensor:_version() return tonumber(self._c.storage.version) end
function Tensor:_bump_version()
  local s = self._c.storage
  s.version = s.version + 1
end

-- True for tensors with storage and for meta tensors (which raise when an op reads them).
function Tensor.is_tensor(v)
  local mt = getmetatable(v)
  return type(v) == "table" and (mt == Tensor or mt == Meta)
end

-- ---- element access ----

-- Contiguous f64 (or i64) copy of t's values as a flat Lua array, staged in the cpu pool
-- (so device tensors are copied to the host before they are read).
local function flat_values(t)
  local c = t._c
  local integer = c.dtype == lib.MS_I64
  local staging = wrap(new_handle(integer and lib.MS_I64 or lib.MS_F64, c.shape, c.ndim,
                                  lib.MS_POOL_CPU, "table"))
  check(lib.ms_copy(staging._c, c), "table")
  local ptr = ffi.cast(integer and "int64_t*" or "double*", lib.ms_tensor_data(staging._c))
  local n = tonumber(c.numel)
  local out = {}
  for i = 0, n - 1 do out[i + 1] = tonumber(ptr[i]) end
  staging:_release()
  return out
end
Tensor.flat_values = flat_values

function Tensor:table()
  local values = flat_values(self)
  local shape = self:shape()
  if #shape == 0 then return values[1] end
  local index = 0
  local function build(dim)
    local out = {}
    for i = 1, shape[dim] do
      if dim == #shape then
        index = index + 1
        out[i] = values[index]
      else
        out[i] = build(dim + 1)
      end
    end
    return out
  end
  return build(1)
end

function Tensor:item()
  if self._c.numel ~= 1 then
    fail("item", "tensor has %d elements; item() needs exactly one", tonumber(self._c.numel))
  end
  return flat_values(self)[1]
end

local function format_number(v, integer)
  if integer then return string.format("%d", v) end
  if v ~= v then return "nan" end
  if v == math.huge then return "inf" elseif v == -math.huge then return "-inf" end
  return string.format("%.4f", v)
end

function Tensor:__tostring()
  local shape = self:shape()
  local integer = self._c.dtype >= lib.MS_I32
  local values = self:numel() <= 1000 and flat_values(self) or nil
  local body
  if not values then
    body = "..."
  elseif #shape == 0 then
    body = format_number(values[1], integer)
  else
    local index = 0
    local function render(dim)
      local parts = {}
      for _ = 1, shape[dim] do
        if dim == #shape then
          index = index + 1
          parts[#parts + 1] = format_number(values[index], integer)
        else
          parts[#parts + 1] = render(dim + 1)
        end
      end
      return "[" .. table.concat(parts, ", ") .. "]"
    end
    body = render(1)
  end
  local extras = {"shape=" .. tostring(shape), "dtype=" .. self:dtype()}
  if self:device() ~= "cpu" then extras[#extras + 1] = "device=" .. self:device() end
  if self.grad_fn then
    extras[#extras + 1] = "grad_fn=" .. self.grad_fn.name
  elseif self.requires_grad then
    extras[#extras + 1] = "requires_grad=true"
  end
  return "tensor(" .. body .. ", " .. table.concat(extras, ", ") .. ")"
end

function Tensor.set_default_dtype(name)
  dtype_id(name, "set_default_dtype")
  local canonical = dtype_aliases[name] or name
  if not (canonical == "f32" or canonical == "f64" or canonical == "bf16" or canonical == "f16") then
    fail("set_default_dtype", "the default dtype must be a floating dtype (f32, f64, bf16 or f16), got %s", name)
  end
  default_dtype = canonical
end
function Tensor.get_default_dtype() return default_dtype end

return Tensor
