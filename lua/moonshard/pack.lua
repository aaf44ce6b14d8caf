-- Values that travel between ranks: nil, numbers, strings, booleans, tables of them and
-- tensors, serialised by LuaJIT's string.buffer (tensors as tagged tables: dtype, shape, bytes).
local ffi = require "ffi"
local buffer = require "string.buffer"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

-- A tensor in transit: {dtype, shape, data} with this metatable, which string.buffer keeps.
local TENSOR = {}
local OPTIONS = {metatable = {TENSOR}}

-- A contiguous handle with t's values (t itself when it already is).
local function contiguous(t)
  if t:is_contiguous() then return t, false end
  local copy = Tensor.empty_raw(t:shape(), t._c.dtype, t._c.storage.pool)
  check(lib.ms_copy(copy._c, t._c), "pack")
  return copy, true
end

local function tensor_in_transit(t)
  local dense, copied = contiguous(t)
  local nbytes = tonumber(lib.ms_tensor_nbytes(dense._c))
  local data = nbytes > 0 and ffi.string(lib.ms_tensor_data(dense._c), nbytes) or ""
  if copied then dense:_release() end
  return setmetatable({dtype = t._c.dtype, shape = t:shape(), data = data}, TENSOR)
end

-- A copy of value (tables without their metatables) with each tensor replaced by its
-- tensor in transit; anything that cannot travel is named by its path ("the result.inner.fn
-- is a function").
local function outbound(value, path, open)
  local kind = type(value)
  if kind ~= "table" and kind ~= "cdata" and kind ~= "userdata" then
    if kind == "function" or kind == "thread" then
      fail("pack", "%s is a %s (only nil, numbers, strings, booleans, tables and tensors " ..
           "travel between ranks)", path, kind)
    end
    return value
  end
  if Tensor.is_tensor(value) then return tensor_in_transit(value) end
  local mt = getmetatable(value)
  if kind == "table" and mt and rawget(mt, "__released") then fail("pack", "%s is a released tensor", path) end
  if kind ~= "table" then
    fail("pack", "%s is a %s (only nil, numbers, strings, booleans, tables and tensors " ..
         "travel between ranks)", path, kind)
  end
  if open[value] then fail("pack", "%s refers to itself (cycles cannot travel)", path) end
  open[value] = true
  local copy = {}
  for k, v in pairs(value) do
    local key_kind = type(k)
    if key_kind ~= "string" and key_kind ~= "number" and key_kind ~= "boolean" then
      fail("pack", "%s has a %s key (keys must be strings, numbers or booleans)", path, key_kind)
    end
    copy[k] = outbound(v, path .. "." .. tostring(k), open)
  end
  open[value] = nil
  return copy
end

-- The decoded value with each tensor in transit turned back into a tensor.
local function inbound(value)
  if type(value) ~= "table" then return value end
  if getmetatable(value) == TENSOR then
    local t = Tensor.empty_raw(value.shape, value.dtype, lib.MS_POOL_CPU)
    local nbytes = tonumber(lib.ms_tensor_nbytes(t._c))
    if nbytes ~= #value.data then
      fail("unpack", "tensor data of %d bytes does not match its shape", #value.data)
    end
    if nbytes > 0 then ffi.copy(lib.ms_tensor_data(t._c), value.data, nbytes) end
    return t
  end
  for k, v in pairs(value) do value[k] = inbound(v) end
  return value
end

-- The bytes of value; path names it in error messages ("result").
function M.encode(value, path)
  return buffer.new(OPTIONS):encode(outbound(value, path or "value", {})):tostring()
end

-- The value packed in nbytes at ptr (a const char* or a Lua string).
function M.decode(ptr, nbytes)
  local reader = buffer.new(OPTIONS):set(ptr, nbytes or #ptr)
  local ok, value = pcall(reader.decode, reader)
  if not ok then fail("unpack", "%s", tostring(value)) end
  if #reader > 0 then fail("unpack", "trailing bytes after the value") end
  return inbound(value)
end

return M
