-- moonshard run -n N script.lua [args]: the local launcher. Forks N ranks that each run the
-- script with the world group set up, as mpirun -n N luajit script.lua would.
local args = require "moonshard.cli.args"

local M = {}

M.usage = [[
usage: moonshard run -n N [--timeout SECONDS] script.lua [script arguments]

Runs script.lua on N local ranks (forked processes sharing memory for the collectives).
Inside the script ms.dist.get_rank() and get_world_size() give the rank and N, and
collectives run over the local backend; ms.dist.spawn(N, fn) in the script runs fn once in
each rank (N must equal -n), so a script written for plain luajit runs unchanged. The same
script runs under mpirun -n N luajit script.lua. Exits 0 when every rank finished, 1 when
any failed. Ctrl-C (SIGINT) or SIGTERM stops every rank within a second.

Several hosts: use mpirun, e.g. 2 hosts with 4 ranks each:
  mpirun -n 8 --host a:4,b:4 luajit script.lua

  -n N               number of ranks (1 to 64)
  --timeout SECONDS  how long a collective waits for a missing rank (default 60)
  --help             this text
]]

local Exit = {}

-- Run the script's chunk as this rank; os.exit inside it ends the rank with that status.
local function run_script(script, script_args)
  local chunk, err = loadfile(script)
  if not chunk then error(err, 0) end
  _G.arg = {[0] = script, unpack(script_args)}
  local real_exit = os.exit
  os.exit = function(code) error(setmetatable({code = code}, Exit), 0) end
  local ok, problem = xpcall(chunk, function(e)
    if getmetatable(e) == Exit then return e end
    return require("moonshard.traceback").traceback(e, 2)
  end, unpack(script_args))
  os.exit = real_exit
  if ok then return end
  if getmetatable(problem) ~= Exit then error(problem, 0) end
  local code = problem.code
  if code == nil or code == true then code = 0 elseif code == false then code = 1 end
  if code ~= 0 then error(("%s exited with status %s"):format(script, tostring(code)), 0) end
end

function M.main(argv)
  local opts, positional = args.parse(argv, {["-n"] = "int", ["--timeout"] = "number", ["--help"] = "flag"},
                                      {stop_at_positional = 1})
  if opts.help then io.stdout:write(M.usage) return 0 end
  if not opts.n then args.usage_error("-n N is required") end
  if opts.n < 1 or opts.n > 64 then args.usage_error("-n must be between 1 and 64, got %d", opts.n) end
  if opts.timeout and opts.timeout <= 0 then args.usage_error("--timeout must be positive") end
  local script = positional[1]
  if not script then args.usage_error("no script given") end
  local file = io.open(script, "r")
  if not file then error(("cannot open script '%s'"):format(script), 0) end
  file:close()
  local script_args = {unpack(positional, 2)}
  local dist = require("moonshard").dist
  dist.spawn({nprocs = opts.n, timeout = opts.timeout}, function()
    require("moonshard.spawn")._launcher = "moonshard run"
    run_script(script, script_args)
  end)
  return 0
end

return M
