-- The C boundary: declares the runtime's API once per LuaJIT state (busted reloads
-- modules, ffi.cdef must not run twice), loads libmoonshard and turns statuses into errors.
local ffi = require "ffi"

local M = {}

if not pcall(ffi.typeof, "struct ms_tensor") then
  ffi.cdef(require("moonshard.cdef").declarations)
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

local VERSION = require "moonshard.version"

-- The library's file: $MOONSHARD_LIB; a source checkout's build/; an installation's own
-- (moonshard/installed.lua, written by cmake --install); a LuaRocks tree's (package.cpath);
-- else the system's (ldconfig).
local function library_path()
  local explicit = os.getenv("MOONSHARD_LIB")
  if explicit and explicit ~= "" then return explicit end
  local dir = this_dir()
  local beside = dir .. "/../../build/libmoonshard.so"
  if file_exists(beside) then return beside end
  if file_exists(dir .. "/installed.lua") then
    return dir .. "/" .. dofile(dir .. "/installed.lua").library
  end
  return package.searchpath("libmoonshard", package.cpath) or "moonshard"
end

-- OpenBLAS's idle threads spin (sched_yield) for 2^28 cycles after each call unless
-- OPENBLAS_THREAD_TIMEOUT says otherwise; it is read when OpenBLAS loads, with this library.
-- The spinning thread competes with the CPU worker pool and the other local ranks for the
-- cores, so idle BLAS threads sleep at once unless the user chose a timeout (bench/README.md).
-- (Declared under a name of its own, so a program's own declaration of setenv never clashes.)
if not pcall(function() return ffi.C.moonshard_setenv end) then
  ffi.cdef('int moonshard_setenv(const char *name, const char *value, int overwrite) __asm__("setenv");')
end

-- Load the library and check it is the version of these modules.
local function load_library(path)
  ffi.C.moonshard_setenv("OPENBLAS_THREAD_TIMEOUT", "4", 0)
  local ok, lib = pcall(ffi.load, path)
  if not ok then
    error(("moonshard: cannot load the library %s: %s (build it with bash tools/setup.sh, " ..
           "install it with cmake --install, or set MOONSHARD_LIB)"):format(path, tostring(lib)), 0)
  end
  local has_version, version = pcall(function() return ffi.string(lib.ms_version()) end)
  version = has_version and version or "older than 0.1.0 (no ms_version)"
  if version ~= VERSION then
    error(("moonshard: the library %s is version %s but the Lua modules in %s are version %s; " ..
           "install both from one build, or point MOONSHARD_LIB at the matching library")
          :format(path, version, this_dir(), VERSION), 0)
  end
  -- the same version can still be another build of the declarations (a tree pulled but not
  -- rebuilt): calling it through these would pass arguments it reads otherwise
  local abi = require("moonshard.cdef").abi
  local has_abi, built = pcall(function() return ffi.string(lib.ms_abi()) end)
  built = has_abi and built or "none (no ms_abi)"
  if built ~= abi then
    error(("moonshard: the library %s was built from other declarations (ABI %s) than the Lua " ..
           "modules in %s (ABI %s); rebuild it (bash tools/setup.sh), install both from one build, " ..
           "or point MOONSHARD_LIB at the matching library"):format(path, built, this_dir(), abi), 0)
  end
  return lib
end

-- One library handle per process (and the file it came from), kept outside package.loaded
-- so reloading this module reuses it.
local registry = debug.getregistry()
if not registry.moonshard_lib then
  registry.moonshard_lib_path = library_path()
  registry.moonshard_lib = load_library(registry.moonshard_lib_path)
end
M.lib = registry.moonshard_lib
M.library_path = registry.moonshard_lib_path
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

-- True for a function or anything whose metatable has __call (a Module class, say).
function M.is_callable(value)
  if type(value) == "function" then return true end
  local mt = getmetatable(value)
  return type(mt) == "table" and mt.__call ~= nil
end

-- Raise a moonshard error for bad input detected in Lua.
function M.fail(what, message, ...)
  error("moonshard: " .. what .. ": " .. string.format(message, ...), 0)
end

return M
