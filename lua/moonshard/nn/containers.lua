-- Sequential and ModuleList: children named "0", "1", ... in order; Lua access is
-- 1-based (seq[1] is child "0") and seq:len() gives the count.
local C = require "moonshard.ffi"
local Module = require "moonshard.nn.module"
local layers = require "moonshard.nn.layers"
local nn_ops = require "moonshard.ops.nn"

local fail = C.fail

local M = {}

local function add_all(container, modules, what)
  for i, m in ipairs(modules) do
    if not Module.is_module(m) then fail(what, "element %d is not a module", i) end
    container:add_module(tostring(container:len()), m)
  end
end

-- The iterator of class:ipairs: child i + 1 after child i.
local function next_module(container, i)
  local m = container[i + 1]
  if m then return i + 1, m end
end

local function list_methods(class)
  class.__numbered_children = true
  function class:len() return #self._module_order end
  function class:get(i)
    local m = type(i) == "number" and self[i] or nil
    if not m then fail(class.__name, "index %s out of range (1..%d)", tostring(i), self:len()) end
    return m
  end
  function class:append(m)
    add_all(self, {m}, class.__name)
    return self
  end
  -- for i, m in seq:ipairs() do ... end (a stateless iterator: no closure per loop)
  function class:ipairs() return next_module, self, 0 end
end

M.Sequential = Module:extend("Sequential")
list_methods(M.Sequential)
-- Sequential(m1, m2, ...) or Sequential({m1, m2, ...})
function M.Sequential:__init(...)
  local first = ...
  local modules = (select("#", ...) == 1 and type(first) == "table" and not Module.is_module(first)) and first or {...}
  add_all(self, modules, "Sequential")
end

-- An adjacent Linear (with a bias) and GELU run as one nn.F.linear_gelu: the bias add and the
-- GELU in one pass each way, the same numbers as the two calls up to float rounding.
local function fuses(linear, gelu)
  return gelu ~= nil and Module.is_module(linear) and linear:_plain_call(layers.Linear)
         and Module.is_module(gelu) and gelu:_plain_call(layers.GELU) and linear.bias ~= nil
end

function M.Sequential:forward(x, ...)
  local i, m = 1, self[1]
  while m do
    local next_m = self[i + 1]
    if fuses(m, next_m) then
      x = nn_ops.linear_gelu(x, m.weight, m.bias, {approximate = next_m.approximate})
      i = i + 2
    else
      if select("#", ...) == 0 then x = m(x) else x = m(x, ...) end
      i = i + 1
    end
    m = self[i]
  end
  return x
end

M.ModuleList = Module:extend("ModuleList")
list_methods(M.ModuleList)
function M.ModuleList:__init(modules) add_all(self, modules or {}, "ModuleList") end
function M.ModuleList:forward()
  fail("ModuleList", "a ModuleList has no forward; iterate over it with :ipairs()")
end

M.ModuleDict = Module:extend("ModuleDict")
function M.ModuleDict:__init(modules)
  local names = {}
  for name in pairs(modules or {}) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do self:add_module(name, modules[name]) end
end

return M
