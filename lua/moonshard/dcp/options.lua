-- The options of dcp.save, dcp.async_save and dcp.load, checked in one place: each call
-- names the options it takes; a known option given to the wrong call is an error too.
local C = require "moonshard.ffi"

local fail = C.fail

local M = {}

local function integer(v, min)
  return type(v) == "number" and v >= min and v % 1 == 0 and v < 2 ^ 53
end

local checks = {
  step = function(v) return integer(v, 0), "an integer in [0, 2^53)" end,
  keep_last = function(v) return integer(v, 1), "an integer in [1, 2^53)" end,
  strict = function(v) return type(v) == "boolean", "a boolean" end,
}

-- A step: an integer in [0, 2^53), the steps a Lua number holds exactly (2^53 + 1 would be
-- read as 2^53, another step).
function M.is_step(v) return integer(v, 0) end

-- v for a message: whole numbers in full ("9007199254740992", not "9.007199254741e+15").
local function shown(v)
  if type(v) == "number" and v % 1 == 0 and math.abs(v) < 1e18 then return ("%.0f"):format(v) end
  return tostring(v)
end

function M.check_step(v, what)
  if not integer(v, 0) then fail(what, "step must be an integer in [0, 2^53), got %s", shown(v)) end
  return v
end

M.SAVE = {"step", "keep_last"}
M.LOAD = {"step", "strict"}

-- opts (nil or a table) checked against the names in allowed; returns a table.
function M.check(opts, allowed, what)
  if opts == nil then return {} end
  if type(opts) ~= "table" then fail(what, "options must be a table, got %s", type(opts)) end
  local known = {}
  for _, name in ipairs(allowed) do known[name] = true end
  for name, v in pairs(opts) do
    if not known[name] then
      fail(what, "unknown option '%s' (it takes %s)", tostring(name), table.concat(allowed, ", "))
    end
    local ok, wanted = checks[name](v)
    if not ok then fail(what, "%s must be %s, got %s", name, wanted, shown(v)) end
  end
  return opts
end

return M
