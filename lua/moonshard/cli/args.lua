-- Argument parsing for the moonshard command and the examples, through lua-argparse: options
-- declared per command, positional arguments in order, and a usage error naming what was wrong.
local argparse = require "argparse"

local M = {}

-- A usage error: the command prints it with its usage text and exits with status 2.
local UsageError = {}
UsageError.__index = UsageError
UsageError.__tostring = function(e) return e.message end

function M.usage_error(fmt, ...)
  error(setmetatable({message = fmt:format(...)}, UsageError), 0)
end

function M.is_usage_error(e) return getmetatable(e) == UsageError end

-- Converters with the messages the commands have always given. An integer must be one a Lua
-- number holds exactly (below 2^53 in magnitude): "9007199254740993" would become ...992.
local function converter(name, kind)
  return function(text)
    local n = tonumber(text)
    if n and (kind == "number" or (n % 1 == 0 and math.abs(n) < 2 ^ 53)) then return n end
    if n and n == n and n % 1 == 0 then
      return nil, ("%s needs an integer below 2^53, got '%s'"):format(name, text)
    end
    return nil, ("%s needs %s, got '%s'"):format(name, kind == "int" and "an integer" or "a number", text)
  end
end

-- A step number given as a positional argument: an integer in [0, 2^53), or nil.
function M.step(text)
  local n = tonumber(text)
  if n and n >= 0 and n % 1 == 0 and n < 2 ^ 53 then return n end
  return nil
end

local function key_of(name) return (name:gsub("^%-+", ""):gsub("-", "_")) end

-- The argparse parser for a table of options: "--name" or "-n" mapped to a kind ("flag" |
-- "string" | "int" | "number"); the positional arguments gathered in order.
local function parser_for(name, options)
  local parser = argparse(name):add_help(false)
  for flag, kind in pairs(options) do
    local option = kind == "flag" and parser:flag(flag) or parser:option(flag)
    option:target(key_of(flag))
    if kind == "int" or kind == "number" then option:convert(converter(flag, kind)) end
  end
  parser:argument("positional"):args("*")
  return parser
end

-- Numbers that start with '-' are values, not options: "--lr -1" reads as "--lr=-1".
local function join_negative_values(argv, options)
  local out, i = {}, 1
  while i <= #argv do
    local a, kind = argv[i], options[argv[i]]
    local nxt = argv[i + 1]
    if kind and kind ~= "flag" and nxt and nxt:sub(1, 1) == "-" and tonumber(nxt) then
      out[#out + 1] = a:sub(2, 2) == "-" and (a .. "=" .. nxt) or (a .. nxt)
      i = i + 2
    else
      out[#out + 1] = a
      i = i + 1
    end
  end
  return out
end

-- Everything from the n-th positional argument on is positional (a script's own
-- arguments): a "--" goes before it.
local function stop_after_positional(argv, options, n)
  local seen, i = 0, 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then return argv end
    local name = a:match("^(%-%-?[%w][%w%-]*)=") or a
    local kind = options[name]
    if a:sub(1, 1) == "-" and #a > 1 and not tonumber(a) then
      if kind and kind ~= "flag" and not a:find("=", 1, true) and #name == #a then i = i + 1 end
    else
      seen = seen + 1
      if seen == n then
        local out = {unpack(argv, 1, i - 1)}
        out[#out + 1] = "--"
        for j = i, #argv do out[#out + 1] = argv[j] end
        return out
      end
    end
    i = i + 1
  end
  return argv
end

-- parse(argv, options, {stop_at_positional = n}): returns (values keyed by the name without
-- dashes, "-" read as "_", positional array); raises a usage error for bad arguments.
function M.parse(argv, options, config)
  local parser = parser_for("moonshard", options)
  argv = join_negative_values(argv, options)
  if config and config.stop_at_positional then
    argv = stop_after_positional(argv, options, config.stop_at_positional)
  end
  local ok, result = parser:pparse(argv)
  if not ok then M.usage_error("%s", result) end
  local positional = result.positional
  result.positional = nil
  return result, positional
end

return M
