-- Values that travel between ranks: nil, numbers, strings, booleans, tables of them and
-- tensors, packed into one byte string and rebuilt on the other side (dist.spawn results).
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local TAG_NIL, TAG_FALSE, TAG_TRUE, TAG_NUMBER, TAG_STRING, TAG_TABLE, TAG_TENSOR =
  0, 1, 2, 3, 4, 5, 6

local scalar = ffi.new("union { double d; int64_t i; int32_t i32[2]; uint8_t b[8]; }")

local function bytes_of_double(v)
  scalar.d = v
  return ffi.string(scalar.b, 8)
end

local function bytes_of_int(v)
  scalar.i = v
  return ffi.string(scalar.b, 8)
end

-- A contiguous handle with t's values (t itself when it already is).
local function contiguous(t)
  if t:is_contiguous() then return t, false end
  local copy = Tensor.empty_raw(t:shape(), t._c.dtype, t._c.storage.pool)
  check(lib.ms_copy(copy._c, t._c), "pack")
  return copy, true
end

local function encode_tensor(out, t)
  local c = t._c
  out[#out + 1] = string.char(TAG_TENSOR, c.dtype, c.ndim)
  for d = 0, c.ndim - 1 do out[#out + 1] = bytes_of_int(c.shape[d]) end
  local dense, copied = contiguous(t)
  local nbytes = tonumber(lib.ms_tensor_nbytes(dense._c))
  out[#out + 1] = bytes_of_int(nbytes)
  if nbytes > 0 then out[#out + 1] = ffi.string(lib.ms_tensor_data(dense._c), nbytes) end
  if copied then dense:_release() end
end

local encode

local function encode_table(out, value, path, open)
  if open[value] then fail("pack", "%s refers to itself (cycles cannot travel)", path) end
  open[value] = true
  local count = 0
  for _ in pairs(value) do count = count + 1 end
  out[#out + 1] = string.char(TAG_TABLE) .. bytes_of_int(count)
  for k, v in pairs(value) do
    local kind = type(k)
    if kind ~= "string" and kind ~= "number" and kind ~= "boolean" then
      fail("pack", "%s has a %s key (keys must be strings, numbers or booleans)", path, kind)
    end
    encode(out, k, path, open)
    encode(out, v, path .. "." .. tostring(k), open)
  end
  open[value] = nil
end

encode = function(out, value, path, open)
  local kind = type(value)
  if value == nil then
    out[#out + 1] = string.char(TAG_NIL)
  elseif kind == "boolean" then
    out[#out + 1] = string.char(value and TAG_TRUE or TAG_FALSE)
  elseif kind == "number" then
    out[#out + 1] = string.char(TAG_NUMBER) .. bytes_of_double(value)
  elseif kind == "string" then
    out[#out + 1] = string.char(TAG_STRING) .. bytes_of_int(#value)
    out[#out + 1] = value
  elseif Tensor.is_tensor(value) then
    encode_tensor(out, value)
  elseif kind == "table" and getmetatable(value) and rawget(getmetatable(value), "__released") then
    fail("pack", "%s is a released tensor", path)
  elseif kind == "table" then
    encode_table(out, value, path, open)
  else
    fail("pack", "%s is a %s (only nil, numbers, strings, booleans, tables and tensors " ..
         "travel between ranks)", path, kind)
  end
end

-- The bytes of value; path names it in error messages ("result").
function M.encode(value, path)
  local out = {}
  encode(out, value, path or "value", {})
  return table.concat(out)
end

-- Reads values back from nbytes at ptr (a const char*).
local function reader(ptr, nbytes)
  local bytes = ffi.cast("const uint8_t *", ptr)
  local pos = 0
  local r = {}
  local function need(n)
    if pos + n > nbytes then fail("unpack", "truncated data (%d bytes)", nbytes) end
  end
  function r.byte()
    need(1)
    pos = pos + 1
    return bytes[pos - 1]
  end
  function r.int()
    need(8)
    ffi.copy(scalar.b, bytes + pos, 8)
    pos = pos + 8
    return tonumber(scalar.i)
  end
  function r.double()
    need(8)
    ffi.copy(scalar.b, bytes + pos, 8)
    pos = pos + 8
    return scalar.d
  end
  function r.string(n)
    need(n)
    pos = pos + n
    return ffi.string(bytes + pos - n, n)
  end
  function r.into(dst, n)
    need(n)
    ffi.copy(dst, bytes + pos, n)
    pos = pos + n
  end
  function r.done() return pos == nbytes end
  return r
end

local function decode(r)
  local tag = r.byte()
  if tag == TAG_NIL then return nil end
  if tag == TAG_FALSE then return false end
  if tag == TAG_TRUE then return true end
  if tag == TAG_NUMBER then return r.double() end
  if tag == TAG_STRING then return r.string(r.int()) end
  if tag == TAG_TABLE then
    local t = {}
    for _ = 1, r.int() do
      local k = decode(r)
      t[k] = decode(r)
    end
    return t
  end
  if tag == TAG_TENSOR then
    local dtype, ndim = r.byte(), r.byte()
    local shape = {}
    for d = 1, ndim do shape[d] = r.int() end
    local t = Tensor.empty_raw(shape, dtype, lib.MS_POOL_CPU)
    local nbytes = r.int()
    if nbytes ~= tonumber(lib.ms_tensor_nbytes(t._c)) then
      fail("unpack", "tensor data of %d bytes does not match its shape", nbytes)
    end
    if nbytes > 0 then r.into(lib.ms_tensor_data(t._c), nbytes) end
    return t
  end
  fail("unpack", "unknown tag %d", tag)
end

-- The value packed in nbytes at ptr (a const char* or a Lua string).
function M.decode(ptr, nbytes)
  local r = reader(ptr, nbytes or #ptr)
  local value = decode(r)
  if not r.done() then fail("unpack", "trailing bytes after the value") end
  return value
end

return M
