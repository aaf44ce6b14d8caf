-- Runs busted under LuaJIT (Debian's busted script runs under plain Lua, which has no FFI).
-- Usage (repository root): luajit tools/busted.lua [busted options] [spec files or dirs]
package.path = "lua/?.lua;lua/?/init.lua;specs/?.lua;" .. package.path
require "busted.runner" ({standalone = false})
