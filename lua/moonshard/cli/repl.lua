-- moonshard repl [STORE]: the REPL over a checkpoint store (or none).
local args = require "moonshard.cli.args"

local M = {}

M.usage = [[
usage: moonshard repl [STORE] [--no-history]

An interactive LuaJIT prompt with moonshard loaded as `ms`: line editing and history
(GNU readline; the history lives in $MOONSHARD_HISTORY or ~/.moonshard_history), tab
completion of names, pretty-printed tensors, DTensors and tables, and helpers over the
store: ls(), steps(), show(fqn), diff(step_a, step_b), load(fqn); help() lists them.
Inside a training script, ms.repl{model = model} opens it on rank 0 over the live model;
there `%all <line>` runs a line on every rank. Ctrl-C cancels the typed or running line;
SIGTERM ends the session. Input that is not a terminal is read without readline.

  --no-history   neither read nor write a history file
  --help         this text
]]

function M.main(argv)
  local opts, positional = args.parse(argv, {["--help"] = "flag", ["--no-history"] = "flag"})
  if opts.help then io.stdout:write(M.usage) return 0 end
  if #positional > 1 then args.usage_error("expected at most one store directory") end
  local ms = require "moonshard"
  ms.repl{store = positional[1], history = opts.no_history and false or nil}
  return 0
end

return M
