-- The options of dcp.save, dcp.async_save and dcp.load, checked in one place: each call
-- names the options it takes; a known option given to the wrong call is an error too.
local C = require "moonshard.ffi"

local fail = C.fail

local M = {}

local function integer(v, min)
  return type(v) == "number" and v >= min and v % 1 == 0 and v < 2 ^ 53
end

local checks = {
  step = function(v) return integer(v, 0), "a non-negative integer" end,
  keep_last = function(v) return integer(v, 1), "a positive integer" end,
  strict = function(v) return type(v) == "boolean", "a boolean" end,
}

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
    if not ok then fail(what, "%s must be %s, got %s", name, wanted, tostring(v)) end
  end
  return opts
end

return M
