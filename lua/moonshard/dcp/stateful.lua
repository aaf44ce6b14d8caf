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

-- Put each Stateful's state_dict() where the object was (recursively: a state dict may hold
-- Stateful objects too); returns the swaps made, innermost first.
local function swap_in(node, prefix, swaps, what, visiting)
  visiting[node] = true
  local keys = {}
  for key in pairs(node) do keys[#keys + 1] = key end
  for _, key in ipairs(keys) do
    local value = node[key]
    local fqn = key_path(prefix, key)
    if is_stateful(value) then
      local sd = value:state_dict()
      if type(sd) ~= "table" or getmetatable(sd) ~= nil then
        fail(what, "'%s' is a Stateful whose state_dict() returned %s, not a table", fqn,
             type(sd) == "table" and "an object" or "a " .. type(sd))
      end
      node[key] = sd
      swap_in(sd, fqn .. ".", swaps, what, visiting)
      swaps[#swaps + 1] = {parent = node, key = key, object = value, state = sd}
    elseif type(value) == "table" and getmetatable(value) == nil and
           C.is_callable(value.state_dict) ~= C.is_callable(value.load_state_dict) then
      fail(what, "'%s' has a callable %s but no %s; a Stateful needs both", fqn,
           C.is_callable(value.state_dict) and "state_dict" or "load_state_dict",
           C.is_callable(value.state_dict) and "load_state_dict" or "state_dict")
    elseif type(value) == "table" and getmetatable(value) == nil and not visiting[value] then
      swap_in(value, fqn .. ".", swaps, what, visiting)
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
-- caller's tree is unchanged afterwards. Returns the leaves and the swaps (for restore).
function M.flatten(state_dict, what)
  if type(state_dict) ~= "table" or getmetatable(state_dict) ~= nil then
    return flatten.flatten(state_dict, what)
  end
  local swaps = {}
  local ok, err = pcall(swap_in, state_dict, "", swaps, what, {})
  local leaves
  if ok then ok, err = pcall(function() leaves = flatten.flatten(state_dict, what) end) end
  swap_out(swaps)
  if not ok then error(err, 0) end
  return leaves, swaps
end

-- After a load filled the state dicts: hand each one back to its object, innermost first.
function M.restore(swaps)
  for _, s in ipairs(swaps or {}) do s.object:load_state_dict(s.state) end
end

return M
