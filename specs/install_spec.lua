-- `cmake --install build` into a fresh prefix whose path has a space, used as a new user would:
-- a C program built with pkg-config and one built with find_package, a Lua script and the
-- moonshard command (through a symlink, from another directory); a version mismatch; a rock.
local ms = require "moonshard"

local function q(text) return "'" .. text:gsub("'", "'\\''") .. "'" end

-- Run a shell command; returns its exit status and its output (stdout and stderr).
local function sh(command)
  local pipe = io.popen("(" .. command .. ") 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output:gsub("exit=%d+%s*$", "")
end

local function write_file(path, text)
  local file = assert(io.open(path, "wb"))
  file:write(text)
  file:close()
end

local function exists(path)
  local file = io.open(path, "rb")
  if file then file:close() end
  return file ~= nil
end

local repo = assert(io.popen("pwd")):read("*l")

-- A program against the public headers alone: a 2x3 tensor of ones times 2.5, summed by
-- ms_sum (15), and the headers' version next to the library's.
local C_PROGRAM = [[
#include <moonshard/ms.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
    int64_t shape[2] = {2, 3}, one[2] = {1, 1};
    ms_tensor *x = NULL, *total = NULL;
    if (ms_tensor_new(&x, MS_F32, 2, shape, MS_POOL_CPU) != MS_OK || ms_fill(x, 2.5) != MS_OK ||
        ms_tensor_new(&total, MS_F32, 2, one, MS_POOL_CPU) != MS_OK ||
        ms_reduce(total, x, MS_SUM, 3u) != MS_OK) {
        printf("failed: %s\n", ms_last_error());
        return 1;
    }
    printf("sum %g headers %s library %s\n", (double)*(const float *)ms_tensor_data(total),
           MS_VERSION, ms_version());
    ms_tensor_free(total);
    ms_tensor_free(x);
    return strcmp(MS_VERSION, ms_version()) != 0;
}
]]

local LUA_SCRIPT = [[
local ms = require "moonshard"
print(("version %s library %s sum %g"):format(ms.__version__, require("moonshard.ffi").library_path,
                                              (ms.ones(2, 3) * 2.5):sum():item()))
]]

describe("an installation #noasan", function()
  local base, prefix

  setup(function()
    base = os.tmpname()
    os.remove(base)
    prefix = base .. "/moon shard"
    local status, output = sh("mkdir -p " .. q(prefix) .. " && cmake --install build --prefix " .. q(prefix))
    assert.equal(0, status, output)
  end)

  teardown(function() sh("rm -rf " .. q(base)) end)

  it("lays out a versioned library with an RPATH, headers, modules, pkg-config and CMake files", function()
    for _, file in ipairs({"lib/libmoonshard.so", "lib/libmoonshard.so.0.1", "include/moonshard/ms.h",
                           "include/moonshard/store/store.h", "share/lua/5.1/moonshard/init.lua",
                           "share/lua/5.1/moonshard/installed.lua", "lib/pkgconfig/moonshard.pc",
                           "lib/cmake/moonshard/moonshardConfig.cmake", "bin/moonshard"}) do
      assert.is_true(exists(prefix .. "/" .. file), file)
    end
    local _, dynamic = sh("readelf -d " .. q(prefix .. "/lib/libmoonshard.so"))
    assert.truthy(dynamic:find("Library soname: [libmoonshard.so.0.1]", 1, true), dynamic)
    assert.truthy(dynamic:find("$ORIGIN", 1, true), dynamic)
  end)

  it("builds and runs a C program with pkg-config --cflags --libs moonshard", function()
    local source, program = base .. "/prog.c", base .. "/prog"
    write_file(source, C_PROGRAM)
    -- pkg-config escapes the space in the prefix; eval reads the escapes back
    local status, output = sh("export PKG_CONFIG_PATH=" .. q(prefix .. "/lib/pkgconfig") ..
      " && eval cc -std=c11 -Wall -Werror " .. q(q(source)) .. " -o " .. q(q(program)) ..
      " \"$(pkg-config --cflags --libs moonshard)\"")
    assert.equal(0, status, output)
    status, output = sh("cd / && env -u LD_LIBRARY_PATH " .. q(program))
    assert.equal(0, status, output)
    assert.equal(("sum 15 headers %s library %s\n"):format(ms.__version__, ms.__version__), output)
    local _, version = sh("PKG_CONFIG_PATH=" .. q(prefix .. "/lib/pkgconfig") .. " pkg-config --modversion moonshard")
    assert.equal(ms.__version__ .. "\n", version)
  end)

  it("builds a C program with the README's pkg-config command, the prefix's space included", function()
    local readme = assert(io.open(repo .. "/README.md")):read("*a")
    local command = readme:match("\n([^\n#]-pkg%-config %-%-cflags %-%-libs moonshard[^\n#]-)%s*#")
    assert.truthy(command, "README.md has no pkg-config command line")
    local dir = base .. "/readme"
    sh("mkdir -p " .. q(dir))
    write_file(dir .. "/prog.c", C_PROGRAM)
    local status, output = sh("cd " .. q(dir) .. " && export PKG_CONFIG_PATH=" .. q(prefix .. "/lib/pkgconfig") ..
                              " && " .. command .. " && cd / && " .. q(dir .. "/a.out"))
    assert.equal(0, status, command .. "\n" .. output)
    assert.equal(("sum 15 headers %s library %s\n"):format(ms.__version__, ms.__version__), output)
  end)

  it("builds and runs a C program with find_package(moonshard)", function()
    local project = base .. "/consumer"
    sh("mkdir -p " .. q(project))
    write_file(project .. "/prog.c", C_PROGRAM)
    write_file(project .. "/CMakeLists.txt", [[
cmake_minimum_required(VERSION 3.20)
project(consumer C)
find_package(moonshard 0.1 REQUIRED)
add_executable(prog prog.c)
target_link_libraries(prog PRIVATE moonshard::moonshard)
]])
    local status, output = sh("cd " .. q(project) .. " && cmake -S . -B out -DCMAKE_PREFIX_PATH=" .. q(prefix) ..
                              " >/dev/null && cmake --build out >/dev/null && cd / && " .. q(project .. "/out/prog"))
    assert.equal(0, status, output)
    assert.equal(("sum 15 headers %s library %s\n"):format(ms.__version__, ms.__version__), output)
  end)

  it("runs a Lua script on the installed modules and library from any directory", function()
    local script = base .. "/script.lua"
    write_file(script, LUA_SCRIPT)
    local lua_dir = prefix .. "/share/lua/5.1"
    local status, output = sh("cd / && env -u MOONSHARD_LIB LUA_PATH=" .. q(lua_dir .. "/?.lua;" .. lua_dir ..
                              "/?/init.lua;;") .. " luajit " .. q(script))
    assert.equal(0, status, output)
    local library = output:match("library (.-) sum 15\n$")
    assert.truthy(library, output)
    assert.equal(prefix .. "/share/lua/5.1/moonshard/../../../../lib/libmoonshard.so.0.1", library)
  end)

  it("runs the moonshard command through a symlink from another directory", function()
    local link_dir = base .. "/elsewhere"
    local script = base .. "/ranks.lua"
    write_file(script, [[
local ms = require "moonshard"
local t = ms.tensor({ms.dist.get_rank() + 1})
ms.dist.all_reduce(t, "sum")
print(("rank %d sum %d"):format(ms.dist.get_rank(), t:item()))
]])
    sh("mkdir -p " .. q(link_dir) .. " && ln -s " .. q(prefix .. "/bin/moonshard") .. " " .. q(link_dir .. "/ms"))
    local status, output = sh("cd / && env -u MOONSHARD_LIB -u LUA_PATH " .. q(link_dir .. "/ms") .. " --version")
    assert.equal(0, status, output)
    assert.truthy(output:find("moonshard " .. ms.__version__ .. " (library " .. ms.__version__ .. " at " ..
                              prefix .. "/share/lua/5.1/moonshard/", 1, true), output)
    status, output = sh("cd / && env -u MOONSHARD_LIB -u LUA_PATH " .. q(link_dir .. "/ms") .. " run -n 2 " .. q(script))
    assert.equal(0, status, output)
    assert.truthy(output:find("rank 1 sum 3", 1, true), output)
  end)

  it("names both versions when the modules and the library differ", function()
    local copy = base .. "/other"
    local status, output = sh("cp -a " .. q(prefix) .. " " .. q(copy) .. " && printf 'return \"0.0.9\"\\n' > " ..
                              q(copy .. "/share/lua/5.1/moonshard/version.lua"))
    assert.equal(0, status, output)
    status, output = sh("cd / && env -u MOONSHARD_LIB -u LUA_PATH " .. q(copy .. "/bin/moonshard") .. " --version")
    assert.equal(1, status, output)
    assert.truthy(output:find("is version " .. ms.__version__ .. " but the Lua modules in " .. copy ..
                              "/share/lua/5.1/moonshard are version 0.0.9", 1, true), output)
  end)

  it("names both ABIs when the library was built from other declarations of the same version", function()
    local copy = base .. "/rebuilt"
    local cdef = copy .. "/share/lua/5.1/moonshard/cdef.lua"
    -- the modules of a tree whose headers changed since the library was built
    local status, output = sh("cp -a " .. q(prefix) .. " " .. q(copy) .. " && sed -i 's/abi = \"fnv1a64:[0-9a-f]*\"/abi = \"fnv1a64:0123456789abcdef\"/' " .. q(cdef))
    assert.equal(0, status, output)
    status, output = sh("cd / && env -u MOONSHARD_LIB -u LUA_PATH " .. q(copy .. "/bin/moonshard") .. " --version")
    assert.equal(1, status, output)
    assert.truthy(output:find("was built from other declarations (ABI " .. require("moonshard.cdef").abi ..
                              ") than the Lua modules in " .. copy .. "/share/lua/5.1/moonshard (ABI fnv1a64:0123456789abcdef)",
                              1, true), output)
  end)
end)

describe("the rockspec #noasan", function()
  it("luarocks make builds the library through CMake and installs the modules", function()
    if sh("command -v luarocks") ~= 0 then
      pending("luarocks is not installed (tools/setup.sh installs it)")
      return
    end
    local tree = os.tmpname()
    os.remove(tree)
    -- The shipped rockspec built CUDA-less and unoptimised (nvcc and -O3 are 6/7 of a cold
    -- build's CPU time): the same CMake build and install, from the repository root as
    -- `luarocks make` builds, on both cores.
    local name = "moonshard-" .. ms.__version__ .. "-1.rockspec"
    local rockspec, changed = assert(io.open(repo .. "/" .. name)):read("*a"):gsub(
      '(\n%s*)CMAKE_BUILD_TYPE = "Release",', '%1CMAKE_BUILD_TYPE = "Debug",%1MS_WITH_CUDA = "OFF",')
    assert.equal(1, changed, "the rockspec's build.variables has no CMAKE_BUILD_TYPE = \"Release\" line")
    sh("mkdir -p " .. q(tree))
    write_file(tree .. "/" .. name, rockspec)
    local status, output = sh("CMAKE_BUILD_PARALLEL_LEVEL=2 luarocks --lua-version=5.1 --tree=" .. q(tree) ..
                              " make --deps-mode=none " .. q(tree .. "/" .. name))
    assert.equal(0, status, output)
    assert.truthy(output:find("devices cpu (MS_WITH_MPI=", 1, true), output) -- CMake's summary: CUDA-less
    local script = tree .. "/script.lua"
    write_file(script, LUA_SCRIPT)
    status, output = sh("cd / && eval \"$(luarocks --lua-version=5.1 --tree=" .. q(tree) .. " path)\" && " ..
                        "env -u MOONSHARD_LIB luajit " .. q(script))
    sh("rm -rf " .. q(tree))
    assert.equal(0, status, output)
    assert.truthy(output:find("version " .. ms.__version__ .. " library " .. tree ..
                              "/lib/lua/5.1/libmoonshard.so sum 15", 1, true), output)
  end)
end)

describe("the version", function()
  it("is one number in runtime/version.h, the Lua modules, CMake's project and the rockspec", function()
    local header = assert(io.open(repo .. "/runtime/version.h")):read("*a")
    assert.equal(ms.__version__, header:match('#define MS_VERSION "([^"]+)"'))
    assert.is_true(exists(repo .. "/moonshard-" .. ms.__version__ .. "-1.rockspec"))
    local _, config = sh("grep -h 'CMAKE_PROJECT_VERSION:' build/CMakeCache.txt")
    assert.equal("CMAKE_PROJECT_VERSION:STATIC=" .. ms.__version__ .. "\n", config)
  end)
end)
