-- moonshard's command line: finds the subcommand, runs it, and turns its errors into a
-- message on stderr and an exit status (2 for bad usage, 1 for a failure).
local args = require "moonshard.cli.args"

local M = {}

local COMMANDS = {
  {"run", "run a Lua script on N local ranks"},
  {"ckpt", "inspect, verify, compare, export and import checkpoint stores"},
  {"repl", "interactive LuaJIT with moonshard loaded, over a store or a live model"},
  {"plot", "draw the loss curve of a metrics file (JSON lines) as a PNG"},
}

local USAGE = [[
usage: moonshard <command> [arguments]

commands:
%s
Run 'moonshard <command> --help' for a command's arguments, 'moonshard --version' for the
versions of the modules and of the library they load.
]]

local function usage()
  local lines = {}
  for _, c in ipairs(COMMANDS) do lines[#lines + 1] = ("  %-6s %s\n"):format(c[1], c[2]) end
  return USAGE:format(table.concat(lines))
end

local function known(name)
  for _, c in ipairs(COMMANDS) do if c[1] == name then return true end end
  return false
end

-- The message of an error without moonshard's "moonshard: " prefix.
local function message_of(err)
  return (tostring(err):gsub("^moonshard: ", ""))
end

-- Run one command module: command.main(argv) returns an exit status (nil means 0).
function M.run_command(name, module_name, argv)
  local command = require(module_name)
  local ok, status = pcall(command.main, argv)
  if ok then return status or 0 end
  if args.is_usage_error(status) then
    io.stderr:write(("moonshard %s: %s\n\n%s"):format(name, status.message, command.usage))
    return 2
  end
  -- control bytes other than newlines and tabs (a key's terminal escapes) are shown escaped
  local message = message_of(status):gsub("[%z\1-\8\11-\31\127]", function(c) return ("\\%d"):format(c:byte()) end)
  io.stderr:write(("moonshard %s: %s\n"):format(name, message))
  return 1
end

-- "moonshard 0.1.0 (library 0.1.0 at PATH; backends local mpi; devices cpu)"
local function version()
  local ok, C = pcall(require, "moonshard.ffi")
  if not ok then
    io.stderr:write(message_of(C), "\n")
    return 1
  end
  local ffi = require "ffi"
  local backends, devices = ffi.string(C.lib.ms_build_config()):match("^(.-); (.*)$")
  io.stdout:write(("moonshard %s (library %s at %s; backends %s; devices %s)\n"):format(
    require "moonshard.version", ffi.string(C.lib.ms_version()), C.library_path, backends, devices))
  return 0
end

function M.main(argv)
  local name = argv[1]
  if name == "--version" then return version() end
  if name == nil or name == "--help" or name == "-h" or name == "help" then
    io.stdout:write(usage())
    return name == nil and 2 or 0
  end
  if not known(name) then
    io.stderr:write(("moonshard: unknown command '%s'\n\n%s"):format(name, usage()))
    return 2
  end
  local rest = {}
  for i = 2, #argv do rest[#rest + 1] = argv[i] end
  return M.run_command(name, "moonshard.cli." .. name, rest)
end

return M
