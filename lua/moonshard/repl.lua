-- ms.repl{model =, store =, history =}: an interactive LuaJIT prompt with moonshard loaded,
-- line editing and history (GNU readline), tab completion, pretty printing and helpers
-- over a checkpoint store and a live model. Every rank calls it; rank 0 reads the input
-- and the others serve the gathers it asks for until the session ends.
local ms = require "moonshard"
local pretty = require "moonshard.repl.pretty"
local readline = require "moonshard.repl.readline"
local complete = require "moonshard.repl.complete"
local helpers = require "moonshard.repl.helpers"
local live_model = require "moonshard.repl.live"

local M = {}

local function history_path(opts)
  if opts.history ~= nil then return opts.history or nil end
  local from_env = os.getenv("MOONSHARD_HISTORY")
  if from_env then return from_env ~= "" and from_env or nil end
  local home = os.getenv("HOME")
  return home and (home .. "/.moonshard_history") or nil
end

local function banner(store, live)
  local parts = {"moonshard REPL (LuaJIT" .. (readline.available and ", readline" or "") .. ")"}
  if store then
    local steps = store:steps()
    parts[#parts + 1] = ("store %s: %d step%s%s"):format(store.dir, #steps, #steps == 1 and "" or "s",
      #steps > 0 and (" (%d..%d)"):format(steps[1], steps[#steps]) or "")
  end
  if live then
    local world = ms.dist.is_initialized() and ms.dist.get_world_size() or 1
    parts[#parts + 1] = ("live model: %d parameters on %d rank%s"):format(#live.names, world, world == 1 and "" or "s")
  end
  parts[#parts + 1] = "help() lists the helpers; Ctrl-D leaves"
  return table.concat(parts, "\n") .. "\n"
end

local function print_results(results, n)
  local texts = {}
  for i = 1, n do texts[i] = pretty.format(results[i]) end
  if n > 0 then io.stdout:write(table.concat(texts, "\n"), "\n") end
end

-- Compile a statement or an expression; "incomplete" when more lines are needed.
local function compile(source)
  local fn = load("return " .. source, "=repl")
  if fn then return fn end
  local err
  fn, err = load(source, "=repl")
  if fn then return fn end
  if err:match("<eof>'?$") then return nil, "incomplete" end
  return nil, err
end

local function message_of(err)
  return (tostring(err):gsub("^moonshard: ", ""))
end

local function loop(env, reader)
  local pending = nil
  while not env._quit do
    local line = reader.read(pending and ">> " or "moonshard> ")
    if line == nil then io.stdout:write("\n") break end
    if not pending and line:sub(1, 1) == "=" then line = "return " .. line:sub(2) end
    local source = pending and (pending .. "\n" .. line) or line
    local fn, err = compile(source)
    if err == "incomplete" then
      pending = source
    else
      pending = nil
      if not fn then
        io.stdout:write("syntax error: ", err, "\n")
      elseif source:match("%S") then
        setfenv(fn, env)
        local results = {pcall(fn)}
        if results[1] then
          print_results({unpack(results, 2, table.maxn(results))}, table.maxn(results) - 1)
        else
          io.stdout:write("error: ", message_of(results[2]), "\n")
        end
      end
    end
    io.stdout:flush()
  end
end

local function session(opts, live)
  local store = opts.store and ms.dcp.open(opts.store)
  local context = {store = store, live = live}
  local h = helpers.build(context)
  local env = setmetatable({ms = ms, model = opts.model, store = store}, {__index = _G})
  for name, fn in pairs(h) do if name:sub(1, 1) ~= "_" then env[name] = fn end end
  env.quit = function() env._quit = true end
  env.exit = env.quit
  local reader = readline.open{history = history_path(opts), complete = function(word)
    return complete.candidates(env, word, h._names())
  end}
  io.stdout:write(banner(store, live))
  local ok, err = pcall(loop, env, reader)
  reader.close()
  if store then store:close() end
  if not ok then error(err, 0) end
end

-- ms.repl{model = model, store = dir, history = path | false}
function M.open(opts)
  opts = opts or {}
  local live = opts.model and live_model.new(opts.model)
  if live then live:begin_session() end
  if live and ms.dist.is_initialized() and ms.dist.get_rank() ~= 0 then
    local ok, err = pcall(live.serve, live)
    live:end_session()
    if not ok then error(err, 0) end
    return
  end
  local ok, err = pcall(session, opts, live)
  if live then live:end_session() end
  if not ok then error(err, 0) end
end

return setmetatable(M, {__call = function(_, opts) return M.open(opts) end})
