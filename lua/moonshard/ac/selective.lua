-- Selective checkpointing: a policy decides, op by op, whether a checkpointed region keeps
-- the op's output from the forward pass ("save") or computes it again ("recompute").
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
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

-- saves_so_far() tells how many tensors the region has saved (for drop_unneeded).
function M.new_store(policy, saves_so_far)
  if not C.is_callable(policy) then
    fail("checkpoint", "policy must be callable as policy(op_name) -> 'save' | 'recompute', got %s", type(policy))
  end
  return {policy = policy, saves_so_far = saves_so_far, entries = {}}
end

-- Forward pass: compute every op, keep the outputs the policy saves.
function M.recording_hook(store)
  return function(op_name, compute, ...)
    local node_seq, saves_before = autograd.next_sequence(), store.saves_so_far()
    local out = compute(...)
    if keeps(store.policy, op_name) then
      store.entries[#store.entries + 1] = {
        output = scope.keep(Tensor.alias_raw(out)), version = out._c.storage.version, name = op_name,
        node_seq = node_seq, saves_before = saves_before,
      }
    end
    return out
  end
end

-- Recomputation stops at the region's last save, so a kept output is never read when every
-- save after its op came from the op's own node and none of them is the output itself:
-- free it now and let recomputation hand out an uninitialised tensor of its shape instead.
function M.drop_unneeded(store, save_node_seqs, save_storages)
  for k = #store.entries, 1, -1 do
    local entry = store.entries[k]
    local storage = entry.output._c.storage
    for j = entry.saves_before + 1, #save_node_seqs do
      if save_node_seqs[j] ~= entry.node_seq or save_storages[j] == storage then return end
    end
    local out = entry.output
    entry.shape, entry.dtype, entry.pool = out:shape(), out._c.dtype, out._c.storage.pool
    out:_release()
    entry.output = nil
  end
end

-- Recomputation: hand out the kept outputs in forward order instead of computing them.
-- finished(completed) checks that a recomputation that ran to the end used all of them.
function M.replaying_hook(store)
  local replayed = 0
  local hook = function(op_name, compute, ...)
    if not keeps(store.policy, op_name) then return compute(...) end
    replayed = replayed + 1
    local entry = store.entries[replayed]
    if entry == nil or entry.name ~= op_name then
      fail("checkpoint", "recomputation ran op '%s' where the forward pass kept %s (the region " ..
           "is not deterministic)", op_name, entry and "'" .. entry.name .. "'" or "nothing")
    end
    stats.add_reused_output()
    if entry.output == nil then return Tensor.empty_raw(entry.shape, entry.dtype, entry.pool) end
    if entry.output._c.storage.version ~= entry.version then
      fail("checkpoint", "the output of op '%s' kept by the policy was modified in place after " ..
           "the forward pass; recompute that op or avoid the in-place change", op_name)
    end
    return Tensor.alias_raw(entry.output)
  end
  local function finished(completed)
    if completed and replayed ~= #store.entries then
      fail("checkpoint", "recomputation used %d of the %d op outputs the forward pass kept (the " ..
           "region is not deterministic)", replayed, #store.entries)
    end
  end
  return hook, finished
end

-- Regions nested inside a recomputation compute their own ops, so an enclosing region's
-- replay does not see them.
function M.computing_hook(_, compute, ...) return compute(...) end

function M.release(store)
  for _, entry in ipairs(store.entries) do
    if entry.output then entry.output:_release() end
  end
  store.entries = {}
end

return M
