-- The C boundary: declares the runtime's API once per LuaJIT state (busted reloads
-- modules, ffi.cdef must not run twice), loads libmoonshard and turns statuses into errors.
local ffi = require "ffi"

local M = {}

if not pcall(ffi.typeof, "struct ms_tensor") then
  ffi.cdef(require "moonshard.cdef")
end

local function this_dir()
  local source = debug.getinfo(1, "S").source
  return source:sub(1, 1) == "@" and source:sub(2):match("^(.*)/[^/]*$") or "."
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function load_library()
  local explicit = os.getenv("MOONSHARD_LIB")
  if explicit and explicit ~= "" then return ffi.load(explicit) end
  local beside = this_dir() .. "/../../build/libmoonshard.so"
  if file_exists(beside) then return ffi.load(beside) end
  return ffi.load("moonshard")
end

-- One library handle per process, kept outside package.loaded so reloading this module
-- reuses it.
local registry = debug.getregistry()
registry.moonshard_lib = registry.moonshard_lib or load_library()
M.lib = registry.moonshard_lib
local lib = M.lib

-- Raise "moonshard: <what>: <detail>" for a failed status; return nothing on success. The
-- runtime's detail starts with its own function's name, dropped when what already ends with
-- it ("dist.all_reduce" and "all_reduce: ..."), so no error names its function twice.
function M.check(status, what)
  if status ~= 0 then
    local detail = ffi.string(lib.ms_last_error())
    if detail == "" then detail = ffi.string(lib.ms_strerror(status)) end
    local head, rest = detail:match("^([%w_]+): (.*)$")
    if head and (what == head or what:sub(-#head - 1) == "." .. head) then detail = rest end
    error("moonshard: " .. what .. ": " .. detail, 0)
  end
end

-- Raise a moonshard error for bad input detected in Lua.
function M.fail(what, message, ...)
  error("moonshard: " .. what .. ": " .. string.format(message, ...), 0)
end

return M
