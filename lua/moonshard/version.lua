-- The version of these Lua modules; the library they load must be the same one
-- (runtime/version.h's MS_VERSION), which lua/moonshard/ffi.lua checks.
return "0.1.0"
