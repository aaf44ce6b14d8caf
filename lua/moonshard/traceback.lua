-- Tracebacks of errors raised inside module calls: a call's scope re-raises the error after
-- unwinding, so the traceback at the raising line is kept here for whoever reports it.
local M = {}

local MAX_FRAMES = 200
local last = {error = nil, text = nil} -- the latest error seen inside a module call

-- debug.traceback's text without its elision of middle frames (deep models need them all).
local function full(message, level)
  local lines = {message, "stack traceback:"}
  for l = level + 1, level + MAX_FRAMES do
    local info = debug.getinfo(l, "Sln")
    if not info then break end
    local where = info.short_src .. ":" .. (info.currentline > 0 and (info.currentline .. ":") or "")
    local what = info.name and ("in function '" .. info.name .. "'")
                 or info.what == "main" and "in main chunk"
                 or ("in function <" .. info.short_src .. ":" .. info.linedefined .. ">")
    lines[#lines + 1] = "\t" .. where .. " " .. what
  end
  return table.concat(lines, "\n")
end

-- Message handler of a module call: the first call an error passes through keeps its
-- traceback; the error itself goes on unchanged.
function M.remember(err)
  if err ~= last.error then
    last.error = err
    last.text = type(err) == "string" and full(err, 2) or nil
  end
  return err
end

-- Forget the latest error (a call from outside every module starts afresh).
function M.forget() last.error, last.text = nil, nil end

-- Whether the error at hand is re-raised by a module call's scope (or a scope around it):
-- the first Lua frame past the handler's (level counts it and any wrapping handlers).
local function reraised(level)
  for l = level + 2, level + 4 do
    local info = debug.getinfo(l, "S")
    if not info then return false end
    if info.what ~= "C" then
      return info.source:find("moonshard/nn/module.lua", 1, true) ~= nil or
             info.source:find("moonshard/scope.lua", 1, true) ~= nil
    end
  end
  return false
end

-- ms.traceback(err): a message handler for xpcall, like debug.traceback, that gives an
-- error raised inside a module call its traceback down to the raising line. level: how many
-- handler functions wrap this call (1 when it is the handler itself).
function M.traceback(err, level)
  level = level or 1
  if err ~= nil and err == last.error and last.text and reraised(level) then
    local text = last.text
    M.forget()
    return text
  end
  if type(err) ~= "string" and err ~= nil then return err end
  return full(tostring(err), level + 1)
end

return M
