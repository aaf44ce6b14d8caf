-- Argument parsing for the moonshard command: options declared per command, positional
-- arguments in order, and a usage error that names what was wrong.
local M = {}

-- A usage error: the command prints it with its usage text and exits with status 2.
local UsageError = {}
UsageError.__index = UsageError
UsageError.__tostring = function(e) return e.message end

function M.usage_error(fmt, ...)
  error(setmetatable({message = fmt:format(...)}, UsageError), 0)
end

function M.is_usage_error(e) return getmetatable(e) == UsageError end

-- parse(argv, options, {stop_at_positional = n}): options maps "--name" or "-n" to
-- "flag" | "string" | "int" | "number"; returns (values keyed by the name without dashes,
-- positional array). With stop_at_positional = n, everything after the n-th positional
-- argument is positional (a script's own arguments).
function M.parse(argv, options, config)
  local values, positional = {}, {}
  local stop_at = config and config.stop_at_positional
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if stop_at and #positional >= stop_at then
      positional[#positional + 1] = a
    elseif a == "--" then
      for j = i + 1, #argv do positional[#positional + 1] = argv[j] end
      break
    elseif a:sub(1, 1) == "-" and #a > 1 and not tonumber(a) then
      local name, inline = a:match("^(%-%-?[%w][%w%-]*)=(.*)$")
      name = name or a
      local kind = options[name]
      if not kind then M.usage_error("unknown option '%s'", a) end
      local key = (name:gsub("^%-+", ""):gsub("-", "_"))
      if kind == "flag" then
        if inline then M.usage_error("%s takes no value", name) end
        values[key] = true
      else
        local value = inline
        if value == nil then
          i = i + 1
          value = argv[i]
        end
        if value == nil then M.usage_error("%s needs a value", name) end
        if kind == "int" or kind == "number" then
          local n = tonumber(value)
          if not n or (kind == "int" and n % 1 ~= 0) then
            M.usage_error("%s needs %s, got '%s'", name, kind == "int" and "an integer" or "a number", value)
          end
          value = n
        end
        values[key] = value
      end
    else
      positional[#positional + 1] = a
    end
    i = i + 1
  end
  return values, positional
end

return M
