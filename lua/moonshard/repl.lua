-- ms.repl{model =, store =, history =}: an interactive LuaJIT prompt with moonshard loaded,
-- line editing and history (GNU readline), tab completion, pretty printing and helpers
-- over a checkpoint store and a live model. Every rank calls it; rank 0 reads the input
-- and the others serve its requests (gathers, lines run on every rank) until it ends.
-- Ctrl-C cancels the typed or running line and keeps the session; SIGTERM ends it.
local ms = require "moonshard"
local lib = require("moonshard.ffi").lib
local readline = require "moonshard.repl.readline"
local complete = require "moonshard.repl.complete"
local helpers = require "moonshard.repl.helpers"
local live_model = require "moonshard.repl.live"
local run = require "moonshard.repl.run"

local M = {}

-- A line starting with this runs on every rank of a live session.
local ALL_RANKS = "%all"

local function history_path(opts)
  if opts.history ~= nil then return opts.history or nil end
  local from_env = os.getenv("MOONSHARD_HISTORY")
  if from_env then return from_env ~= "" and from_env or nil end
  local home = os.getenv("HOME")
  return home and (home .. "/.moonshard_history") or nil
end

local function banner(store, live)
  local parts = {"moonshard REPL (LuaJIT" .. (readline.interactive() and ", readline" or "") .. ")"}
  if store then
    local steps = store:steps()
    parts[#parts + 1] = ("store %s: %d step%s%s"):format(store.dir, #steps, #steps == 1 and "" or "s",
      #steps > 0 and (" (%d..%d)"):format(steps[1], steps[#steps]) or "")
  end
  if live then
    local world = ms.dist.is_initialized() and ms.dist.get_world_size() or 1
    parts[#parts + 1] = ("live model: %d parameters on %d rank%s"):format(#live.names, world, world == 1 and "" or "s")
    if live.distributed then
      parts[#parts + 1] = ALL_RANKS .. " <line> runs a line on every rank (forwards, collectives)"
    end
  end
  parts[#parts + 1] = "help() lists the helpers; Ctrl-C cancels a line; Ctrl-D leaves"
  return table.concat(parts, "\n") .. "\n"
end

local function say(text)
  if text ~= "" then io.stdout:write(text, "\n") end
end

-- "[rank 0] 3" per rank (a multi-line text below its rank).
local function per_rank(texts)
  local lines = {}
  for r, text in ipairs(texts) do
    if text ~= "" then
      lines[#lines + 1] = ("[rank %d]%s%s"):format(r - 1, text:find("\n", 1, true) and "\n" or " ", text)
    end
  end
  return table.concat(lines, "\n")
end

local function ended_by_sigterm(text) return text:find("interrupted by SIGTERM", 1, true) ~= nil end

-- Run one complete line; returns the text it leaves.
local function execute(env, live, source, everywhere)
  if everywhere then
    if not (live and live.distributed) then
      return run.run_source(source, env)
    end
    local texts = live:run_everywhere(source, function(s) return run.run_source(s, env) end)
    return per_rank(texts)
  end
  local previous = ms.dist._set_alone(live and live.distributed and live_model.ALONE or nil)
  local text = run.run_source(source, env)
  ms.dist._set_alone(previous)
  if text:find(live_model.ALONE, 1, true) then text = text:match("^[^\n]*") end
  return text
end

local function loop(env, reader, live)
  local pending, everywhere = nil, false
  while not env._quit do
    local line, signal = reader.read(pending and ">> " or "moonshard> ")
    if signal == "SIGTERM" then error("moonshard: repl: ended by SIGTERM", 0) end
    if signal then
      pending, everywhere = nil, false
    elseif line == nil then
      io.stdout:write("\n")
      break
    else
      if not pending and line:sub(1, #ALL_RANKS) == ALL_RANKS and line:sub(#ALL_RANKS + 1, #ALL_RANKS + 1):match("^%s?$") then
        everywhere, line = true, line:sub(#ALL_RANKS + 2)
      end
      if not pending and line:sub(1, 1) == "=" then line = "return " .. line:sub(2) end
      local source = pending and (pending .. "\n" .. line) or line
      local _, err = run.compile(source)
      if err == "incomplete" then
        pending = source
      else
        pending = nil
        if source:match("%S") then
          local text = execute(env, live, source, everywhere)
          if reader.editing and text:find("interrupted by SIGINT", 1, true) then io.stdout:write("\n") end
          say(text)
          if ended_by_sigterm(text) then error("moonshard: repl: ended by SIGTERM", 0) end
        end
        everywhere = false
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
  local ok, err = pcall(loop, env, reader, live)
  reader.close()
  if store then store:close() end
  if not ok then error(err, 0) end
end

-- The environment lines run in on the serving ranks (%all): the helpers too, over the live
-- model and the store (opened here as well when it can be); quit() and exit() do nothing
-- there, since the session ends when rank 0 ends it. Returns the environment and the store.
local function serving_env(opts, live)
  local store
  if opts.store then
    local opened, s = pcall(ms.dcp.open, opts.store)
    store = opened and s or nil
  end
  local env = setmetatable({ms = ms, model = opts.model, store = store}, {__index = _G})
  for name, fn in pairs(helpers.build({store = store, live = live})) do
    if name:sub(1, 1) ~= "_" then env[name] = fn end
  end
  env.quit = function() end
  env.exit = env.quit
  return env, store
end

-- ms.repl{model = model, store = dir, history = path | false}
function M.open(opts)
  opts = opts or {}
  lib.ms_interrupt_install()
  local waits = lib.ms_interrupt_set_waits(0) -- keep the ranks in step through interrupts
  local live = opts.model and live_model.new(opts.model)
  if live then live:begin_session() end
  local ok, err
  if live and live.distributed and ms.dist.get_rank() ~= 0 then
    local env, store = serving_env(opts, live)
    ok, err = pcall(live.serve, live, function(source) return run.run_source(source, env) end)
    if store then store:close() end
  else
    local console = live and live.distributed and lib.ms_local_hold_console(1) == 0
    ok, err = pcall(session, opts, live)
    if console then lib.ms_local_hold_console(0) end
  end
  if live then
    local ended, problem = pcall(live.end_session, live)
    if ok and not ended then ok, err = false, problem end
  end
  lib.ms_interrupt_set_waits(waits)
  if not ok then error(err, 0) end
end

return setmetatable(M, {__call = function(_, opts) return M.open(opts) end})
