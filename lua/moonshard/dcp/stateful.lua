-- Stateful values in a dcp state dict (schedulers, samplers, user objects: anything with
-- state_dict() and load_state_dict()): saved as what state_dict() returns, loaded in place.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local flatten = require "moonshard.dcp.flatten"

local fail = C.fail

local M = {}

-- Stateful: any table (with a metatable or not) whose state_dict and load_state_dict are callable.
local function is_stateful(value)
  if type(value) ~= "table" then return false end
  local mt = getmetatable(value)
  if type(mt) == "table" and rawget(mt, "__released") then return false end
  if Tensor.is_tensor(value) or DTensor.is_dtensor(value) or mt == Tensor.Size then return false end
  return C.is_callable(value.state_dict) and C.is_callable(value.load_state_dict)
end

local function key_path(prefix, key) return prefix .. tostring(key) end

-- object:state_dict(), which must be a plain table; fqn names the object ("" at the top).
local function state_of(object, fqn, what)
  local sd = object:state_dict()
  if type(sd) ~= "table" or getmetatable(sd) ~= nil then
    fail(what, "%s a Stateful whose state_dict() returned %s, not a table",
         fqn == "" and "the state dict is" or ("'" .. fqn .. "' is"),
         type(sd) == "table" and "an object" or "a " .. type(sd))
  end
  return sd
end

-- Put each Stateful's state_dict() where the object was (recursively: a state dict may hold
-- Stateful objects too); returns the swaps made, innermost first. expanding maps each
-- Stateful whose state dict is being walked to its fqn, so one that holds itself (directly
-- or through others) is named instead of expanding forever.
local function swap_in(node, prefix, swaps, what, visiting, expanding)
  visiting[node] = true
  local keys = {}
  for key in pairs(node) do keys[#keys + 1] = key end
  table.sort(keys, function(a, b)
    if type(a) ~= type(b) then return type(a) < type(b) end
    if type(a) == "number" or type(a) == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  for _, key in ipairs(keys) do
    local value = node[key]
    local fqn = key_path(prefix, key)
    if is_stateful(value) then
      if expanding[value] then
        fail(what, "a cycle of Stateful objects: '%s' is %s again (a state_dict() holds the object it " ..
             "came from)", fqn, expanding[value] == "" and "the state dict itself" or ("'" .. expanding[value] .. "'"))
      end
      local sd = state_of(value, fqn, what)
      node[key] = sd
      expanding[value] = fqn
      swap_in(sd, fqn .. ".", swaps, what, visiting, expanding)
      expanding[value] = nil
      swaps[#swaps + 1] = {parent = node, key = key, object = value, state = sd}
    elseif type(value) == "table" and getmetatable(value) == nil and
           C.is_callable(value.state_dict) ~= C.is_callable(value.load_state_dict) then
      fail(what, "'%s' has a callable %s but no %s; a Stateful needs both", fqn,
           C.is_callable(value.state_dict) and "state_dict" or "load_state_dict",
           C.is_callable(value.state_dict) and "load_state_dict" or "state_dict")
    elseif type(value) == "table" and getmetatable(value) == nil and not visiting[value] then
      swap_in(value, fqn .. ".", swaps, what, visiting, expanding)
    end
  end
  visiting[node] = nil
end

-- Put the objects back, outermost first, so each state dict holds what state_dict() returned.
local function swap_out(swaps)
  for i = #swaps, 1, -1 do
    local s = swaps[i]
    s.parent[s.key] = s.object
  end
end

-- flatten.flatten over state_dict with every Stateful read through state_dict(); the
-- caller's tree is unchanged afterwards. Returns the leaves and the swaps (for restore). A
-- Stateful may be the state dict itself (dcp.save(model, dir), dcp.load(model, dir)): its
-- state_dict() is then the tree, keyed as it is ("weight", not "model.weight"), and a load
-- hands it back through load_state_dict.
function M.flatten(state_dict, what)
  local top
  if is_stateful(state_dict) then
    top = state_dict
    state_dict = state_of(top, "", what)
  elseif type(state_dict) ~= "table" or getmetatable(state_dict) ~= nil then
    return flatten.flatten(state_dict, what)
  end
  local swaps = {}
  local ok, err = pcall(swap_in, state_dict, "", swaps, what, {}, top and {[top] = ""} or {})
  local leaves
  if ok then ok, err = pcall(function() leaves = flatten.flatten(state_dict, what) end) end
  swap_out(swaps)
  if not ok then error(err, 0) end
  if top then swaps[#swaps + 1] = {object = top, state = state_dict} end
  return leaves, swaps
end

-- After a load filled the state dicts: hand each one back to its object, innermost first.
function M.restore(swaps)
  for _, s in ipairs(swaps or {}) do s.object:load_state_dict(s.state) end
end

return M
