-- Running one REPL line: interpreted (so its loops notice a hook), with SIGINT and SIGTERM
-- polled every few thousand instructions, and its results formatted without ever raising.
local lib = require("moonshard.ffi").lib
local pretty = require "moonshard.repl.pretty"

local M = {}

local HOOK_INSTRUCTIONS = 1000
local SIGNAL_NAMES = {[2] = "SIGINT", [15] = "SIGTERM"}

-- This file's chunk name: the hook stops the line's code (and what it calls), never the lines
-- of M.call around it, where an error would escape the pcall and end the session (a signal
-- arriving as the line returns is then left pending, and the prompt takes it).
local HERE = debug.getinfo(1, "S").source

local function poll_interrupt()
  if debug.getinfo(2, "S").source == HERE then return end
  local sig = lib.ms_interrupt_pending()
  if sig ~= 0 then
    lib.ms_interrupt_take()
    error("interrupted by " .. (SIGNAL_NAMES[sig] or "a signal"), 2)
  end
end

-- Any error value as text (its __tostring may raise too).
function M.error_text(err)
  local ok, text = pcall(tostring, err)
  if not ok then text = "(an error whose __tostring raised: " .. tostring(text) .. ")" end
  return (text:gsub("^moonshard: ", ""))
end

-- Compile a statement or an expression; "incomplete" when more lines are needed.
function M.compile(source)
  local fn = load("return " .. source, "=repl")
  if fn then return fn end
  local err
  fn, err = load(source, "=repl")
  if fn then return fn end
  if err:match("<eof>'?$") then return nil, "incomplete" end
  return nil, err
end

-- Run fn (compiled from a line) in env. Collectives it starts run to their end, so the
-- ranks of a live session stay in step (ms_interrupt_*, ms.h); an interrupt stops the line
-- at its next hook, module call or collective. Returns true and the results as a packed
-- array, or false and the error text.
function M.call(fn, env)
  setfenv(fn, env)
  jit.off(fn, true)
  local waits = lib.ms_interrupt_set_waits(0)
  debug.sethook(poll_interrupt, "", HOOK_INSTRUCTIONS)
  local results = {n = 0}
  local packed = function(...) results = {n = select("#", ...), ...} end
  local ok, err = pcall(function() packed(fn()) end)
  debug.sethook()
  lib.ms_interrupt_set_waits(waits)
  if not ok then return false, M.error_text(err) end
  return true, results
end

-- The results of a line as the REPL prints them, one per line; a value that cannot be
-- printed (a raising __tostring) prints as an error instead of ending the session.
function M.format(results)
  local texts = {}
  for i = 1, results.n do
    local ok, text = pcall(pretty.format, results[i])
    texts[i] = ok and text or ("error: cannot print the value: " .. M.error_text(text))
  end
  return table.concat(texts, "\n")
end

-- The text a line leaves: its results, or "error: ..." (empty for a statement).
function M.run_source(source, env)
  local fn, err = M.compile(source)
  if not fn then return "syntax error: " .. err end
  local ok, results = M.call(fn, env)
  if not ok then return "error: " .. results end
  return M.format(results)
end

return M
