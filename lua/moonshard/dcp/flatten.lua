-- Nested state dicts as flat lists of leaves with dotted keys ("model.net1.weight"), each
-- remembering the table and key it came from so a load can write values back in place.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"

local fail = C.fail

local M = {}

local function key_text(key, prefix, what)
  if type(key) == "string" then
    if key:find("\0", 1, true) then fail(what, "key '%s%s' contains a NUL byte", prefix, key) end
    return key
  end
  if type(key) == "number" and key % 1 == 0 and key == key and math.abs(key) < 2 ^ 53 then
    return string.format("%d", key)
  end
  fail(what, "key %s under '%s' is a %s; state dict keys are strings or integers",
       tostring(key), prefix, type(key))
end

local function is_container(value)
  local mt = getmetatable(value)
  return mt == nil or mt == Tensor.Size
end

-- "tensor", "dtensor", "value" (number, string, boolean), "table" or nil.
function M.classify(value)
  if Tensor.is_tensor(value) then return "tensor" end
  if DTensor.is_dtensor(value) then return "dtensor" end
  local kind = type(value)
  if kind == "number" or kind == "string" or kind == "boolean" then return "value" end
  if kind == "table" and is_container(value) then return "table" end
  return nil
end

-- Leaves of state_dict sorted by fqn: {fqn =, value =, kind =, parent =, key =}.
function M.flatten(state_dict, what)
  if type(state_dict) ~= "table" or not is_container(state_dict) then
    local got = Tensor.is_tensor(state_dict) and "a tensor" or DTensor.is_dtensor(state_dict) and "a DTensor" or
                type(state_dict) == "table" and "an object without state_dict and load_state_dict methods" or
                "a " .. type(state_dict)
    fail(what, "the state dict must be a table of tensors, values and tables (for a model: {model = " ..
         "model} or model:state_dict()) or a Stateful (state_dict and load_state_dict), got %s", got)
  end
  local leaves, by_fqn, visiting = {}, {}, {}
  local function walk(node, prefix)
    visiting[node] = true
    -- Keys in a fixed order, so a state dict with several faults always names the same one.
    local keys = {}
    for key in pairs(node) do keys[#keys + 1] = key end
    table.sort(keys, function(a, b)
      if type(a) ~= type(b) then return type(a) < type(b) end
      if type(a) == "number" or type(a) == "string" then return a < b end
      return tostring(a) < tostring(b)
    end)
    for _, key in ipairs(keys) do
      local value = node[key]
      local fqn = prefix .. key_text(key, prefix, what)
      local kind = M.classify(value)
      local mt = type(value) == "table" and getmetatable(value)
      if mt and rawget(mt, "__released") then
        fail(what, "'%s' is a tensor that was released", fqn)
      elseif kind == nil then
        fail(what, "'%s' is a %s; a checkpoint holds tensors, DTensors, numbers, strings, " ..
             "booleans and tables of them", fqn, type(value))
      elseif kind == "tensor" and Tensor.is_meta(value) then
        fail(what, "'%s' is a meta tensor (%s %s, no data); materialise it first (fsdp.FSDP with " ..
             "param_init_fn, or module:to_empty() and an initialiser)", fqn, tostring(value:shape()), value:dtype())
      elseif kind == "table" then
        if visiting[value] then fail(what, "'%s' refers back to a table that contains it", fqn) end
        walk(value, fqn .. ".")
      else
        if by_fqn[fqn] then fail(what, "two values flatten to the same key '%s'", fqn) end
        local leaf = {fqn = fqn, value = value, kind = kind, parent = node, key = key}
        by_fqn[fqn] = leaf
        leaves[#leaves + 1] = leaf
      end
    end
    visiting[node] = nil
  end
  walk(state_dict, "")
  table.sort(leaves, function(a, b) return a.fqn < b.fqn end)
  return leaves, by_fqn
end

return M
