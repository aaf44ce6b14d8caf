-- Activation checkpointing: run a region keeping only its inputs and recompute it when
-- backward needs what it saved. Non-reentrant packs placeholders through saved-tensor
-- hooks; reentrant runs the region without grad and reruns it inside its own backward.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local random = require "moonshard.random"
local scope = require "moonshard.scope"
local stats = require "moonshard.ac.stats"

local fail = C.fail
local is_tensor = Tensor.is_tensor

local M = {}

local function pack_results(...) return {n = select("#", ...), ...} end

local function first_tensor(results)
  for i = 1, results.n do if is_tensor(results[i]) then return true end end
  for i = 1, results.n do
    if type(results[i]) == "table" then
      for _, v in pairs(results[i]) do if is_tensor(v) then return true end end
    end
  end
  return false
end

-- Inputs are kept as their own handles with their versions, so recomputation sees the
-- same values and an in-place change between forward and backward is detected.
local function capture_inputs(args)
  local inputs = {n = args.n}
  for i = 1, args.n do
    local a = args[i]
    if is_tensor(a) then
      local kept = scope.keep(Tensor.alias_raw(a))
      kept.requires_grad = a.requires_grad
      inputs[i] = {tensor = kept, version = a._c.storage.version}
    else
      inputs[i] = {value = a}
    end
  end
  return inputs
end

local function check_versions(inputs)
  for i = 1, inputs.n do
    local entry = inputs[i]
    if entry.tensor and entry.tensor._c.storage.version ~= entry.version then
      fail("checkpoint", "input %d was modified in place after the forward pass and before " ..
           "recomputation (version %d, expected %d)", i, tonumber(entry.tensor._c.storage.version),
           tonumber(entry.version))
    end
  end
end

local function with_rng(state, fn, ...)
  if not state then return fn(...) end
  local outer = random.get_rng_state()
  random.set_rng_state(state)
  local results = pack_results(pcall(fn, ...))
  random.set_rng_state(outer)
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, results.n)
end

-- ---- non-reentrant ----

local function recompute(frame)
  check_versions(frame.inputs)
  local captured = {}
  local function pack(t)
    local kept = scope.keep(Tensor.alias_raw(t))
    captured[#captured + 1] = kept
    return #captured
  end
  local function unpack_captured(index) return captured[index] end
  local args = {}
  for i = 1, frame.inputs.n do
    local entry = frame.inputs[i]
    if entry.tensor then
      -- the kept handle carries the input's requires_grad, so ops save what they saved before
      args[i] = entry.tensor
    else
      args[i] = entry.value
    end
  end
  autograd.enable_grad(function()
    autograd.saved_tensors_hooks(pack, unpack_captured, function()
      with_rng(frame.rng_state, function()
        scope.run(frame.fn, unpack(args, 1, frame.inputs.n))
      end)
    end)
  end)
  if #captured ~= frame.packed then
    fail("checkpoint", "recomputation saved %d tensors, the forward pass saved %d (the region " ..
         "is not deterministic or its inputs changed)", #captured, frame.packed)
  end
  frame.recomputed = captured
  stats.add_recomputed(1)
end

function M.checkpoint_non_reentrant(fn, args, preserve_rng)
  local frame = {fn = fn, inputs = capture_inputs(args), packed = 0,
                 rng_state = preserve_rng and random.get_rng_state() or nil}
  local function pack(t)
    frame.packed = frame.packed + 1
    return frame.packed
  end
  -- Each recomputed tensor is handed out once and released with the node that used it;
  -- asking again (retain_graph) recomputes the region again.
  local function unpack_saved(index)
    if not frame.recomputed or not frame.recomputed[index] then recompute(frame) end
    local t = frame.recomputed[index]
    frame.recomputed[index] = false
    local handed_out = Tensor.alias_raw(t)
    t:_release()
    return handed_out
  end
  local results = pack_results(autograd.saved_tensors_hooks(pack, unpack_saved, function()
    return scope.run(fn, unpack(args, 1, args.n))
  end))
  if not first_tensor(results) then
    fail("checkpoint", "the checkpointed function returned no tensor")
  end
  return unpack(results, 1, results.n)
end

-- ---- reentrant ----

local function reentrant_backward(node, grad)
  local frame = node.frame
  check_versions(frame.inputs)
  local args, leaves = {}, {}
  for i = 1, frame.inputs.n do
    local entry = frame.inputs[i]
    if entry.tensor then
      local leaf = entry.tensor:detach()
      leaf.requires_grad = entry.tensor.requires_grad
      args[i], leaves[i] = leaf, leaf
    else
      args[i] = entry.value
    end
  end
  local output = autograd.enable_grad(function()
    return with_rng(frame.rng_state, function()
      return scope.run(frame.fn, unpack(args, 1, frame.inputs.n))
    end)
  end)
  stats.add_recomputed(1)
  if output.requires_grad then autograd.backward({output}, {grad}) end
  local grads = {}
  for i = 1, frame.inputs.n do
    local leaf = leaves[i]
    grads[i] = leaf and rawget(leaf, "grad") or nil
  end
  return unpack(grads, 1, frame.inputs.n)
end

function M.checkpoint_reentrant(fn, args, preserve_rng)
  local frame = {fn = fn, inputs = capture_inputs(args), rng_state = preserve_rng and random.get_rng_state() or nil}
  local output = autograd.no_grad(function() return scope.run(fn, unpack(args, 1, args.n)) end)
  if not is_tensor(output) then
    fail("checkpoint", "with use_reentrant the function must return one tensor, got %s", type(output))
  end
  local inputs = {}
  for i = 1, args.n do inputs[i] = is_tensor(args[i]) and args[i] or false end
  local node = autograd.record_list(output, "CheckpointFunctionBackward", reentrant_backward, inputs)
  if node then
    node.frame = frame
    node.saved = {} -- marks the node freed once run, so a second backward is refused
  end
  return output
end

return M
