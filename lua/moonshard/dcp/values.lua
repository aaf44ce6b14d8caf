-- Non-tensor checkpoint values (numbers, strings, booleans) as the bytes the store keeps in
-- its manifest: one type tag, then the value (numbers as their 8 IEEE-754 bytes, exactly).
local ffi = require "ffi"
local C = require "moonshard.ffi"

local fail = C.fail

local M = {}

local number_bytes = ffi.new("double[1]")

function M.encode(value)
  local kind = type(value)
  if kind == "number" then
    number_bytes[0] = value
    return "n" .. ffi.string(number_bytes, 8)
  elseif kind == "string" then
    return "s" .. value
  elseif kind == "boolean" then
    return value and "b1" or "b0"
  end
  error("values.encode: " .. kind, 2)
end

-- The value stored as size bytes at data for entry fqn.
function M.decode(data, size, fqn, what)
  data = ffi.cast("const char *", data)
  local bytes = ffi.string(data, size)
  local tag = bytes:sub(1, 1)
  if tag == "n" and size == 9 then
    ffi.copy(number_bytes, data + 1, 8)
    return number_bytes[0]
  elseif tag == "s" then
    return bytes:sub(2)
  elseif tag == "b" and size == 2 then
    return bytes:sub(2) == "1"
  end
  fail(what, "'%s': the stored value is not one a checkpoint writes (%d bytes)", fqn, size)
end

-- "number", "string" or "boolean" from the first byte of a stored value.
function M.kind(data, size)
  if size < 1 then return "unknown" end
  local tag = string.char(ffi.cast("const uint8_t *", data)[0])
  return ({n = "number", s = "string", b = "boolean"})[tag] or "unknown"
end

return M
