-- LuaRocks package of moonshard: `luarocks make` (from the repository root) builds the C
-- runtime through CMake and installs the Lua modules, the library and the moonshard command.
rockspec_format = "3.0"
package = "moonshard"
version = "0.1.0-1"
source = {
  url = "git+file://.",
  tag = "v0.1.0",
}
description = {
  summary = "Fully sharded data-parallel training in a small C runtime driven by LuaJIT",
  detailed = [[
PyTorch FSDP, activation checkpointing and distributed checkpointing (LMDB store) with
PyTorch's names, on a C11 runtime (CPU, optionally CUDA) and local or OpenMPI collectives.]],
}
dependencies = {
  "lua == 5.1", -- LuaJIT (the modules use its FFI)
  "argparse",
  "dkjson",
}
external_dependencies = {
  LMDB = {header = "lmdb.h"},
  DNNL = {header = "oneapi/dnnl/dnnl.h"},
  OPENBLAS = {library = "openblas"},
  XXHASH = {header = "xxhash.h"},
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    MS_LUAROCKS_LUADIR = "$(LUADIR)",
    MS_LUAROCKS_LIBDIR = "$(LIBDIR)",
  },
  copy_directories = {"docs"},
}
