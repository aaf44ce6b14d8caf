-- Selective checkpointing: a policy decides, op by op, whether a checkpointed region keeps
-- the op's output from the forward pass ("save") or computes it again ("recompute").
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local scope = require "moonshard.scope"
local stats = require "moonshard.ac.stats"

local fail = C.fail

local M = {}

-- The ops a policy is asked about (the others are always recomputed).
M.OPS = {"linear", "matmul"}

local matrix_products = {linear = true, matmul = true}

-- Keep the outputs of matrix products, recompute everything else.
function M.default_policy(op_name)
  return matrix_products[op_name] and "save" or "recompute"
end

local function keeps(policy, op_name)
  local choice = policy(op_name)
  if choice == "save" then return true end
  if choice == "recompute" then return false end
  fail("checkpoint", "the policy returned %s for op '%s' (expected 'save' or 'recompute')",
       tostring(choice), op_name)
end

function M.new_store(policy)
  if type(policy) ~= "function" then
    fail("checkpoint", "policy must be a function(op_name) -> 'save' | 'recompute', got %s", type(policy))
  end
  return {policy = policy, outputs = {}, versions = {}, names = {}}
end

-- Forward pass: compute every op, keep the outputs the policy saves.
function M.recording_hook(store)
  return function(op_name, compute, ...)
    local out = compute(...)
    if keeps(store.policy, op_name) then
      local n = #store.outputs + 1
      store.outputs[n] = scope.keep(Tensor.alias_raw(out))
      store.versions[n], store.names[n] = out._c.storage.version, op_name
    end
    return out
  end
end

-- Recomputation: hand out the kept outputs in forward order instead of computing them.
function M.replaying_hook(store)
  local replayed = 0
  local hook = function(op_name, compute, ...)
    if not keeps(store.policy, op_name) then return compute(...) end
    replayed = replayed + 1
    local kept = store.outputs[replayed]
    if kept == nil or store.names[replayed] ~= op_name then
      fail("checkpoint", "recomputation ran op '%s' where the forward pass kept %s (the region " ..
           "is not deterministic)", op_name, store.names[replayed] and "'" .. store.names[replayed] .. "'" or "nothing")
    end
    if kept._c.storage.version ~= store.versions[replayed] then
      fail("checkpoint", "the output of op '%s' kept by the policy was modified in place after " ..
           "the forward pass; recompute that op or avoid the in-place change", op_name)
    end
    stats.add_reused_output()
    return Tensor.alias_raw(kept)
  end
  local function finished()
    if replayed ~= #store.outputs then
      fail("checkpoint", "recomputation used %d of the %d op outputs the forward pass kept (the " ..
           "region is not deterministic)", replayed, #store.outputs)
    end
  end
  return hook, finished
end

-- Regions nested inside a recomputation compute their own ops, so an enclosing region's
-- replay does not see them.
function M.computing_hook(_, compute, ...) return compute(...) end

function M.release(store)
  for _, t in ipairs(store.outputs) do t:_release() end
  store.outputs, store.versions, store.names = {}, {}, {}
end

return M
