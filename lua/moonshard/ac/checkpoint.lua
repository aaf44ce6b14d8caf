-- Activation checkpointing: run a region keeping only its inputs and recompute it when
-- backward needs what it saved. Non-reentrant packs placeholders through saved-tensor
-- hooks; reentrant runs the region without grad and reruns it inside its own backward.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local random = require "moonshard.random"
local scope = require "moonshard.scope"
local finally = require "moonshard.finally"
local selective = require "moonshard.ac.selective"
local stats = require "moonshard.ac.stats"

local fail = C.fail
local is_tensor = Tensor.is_tensor

local M = {}

local recompute_depth = 0
local recording_frame -- the non-reentrant region whose forward pass is running, if any

-- ---- graph contexts: which backward pass will carry the gradients of what runs now ----
-- A reentrant region's forward pass (without grad) and its recomputation (inside backward)
-- build what the region's own nested backward runs: the region's frame is the context. A
-- non-reentrant recomputation only makes tensors to hand to saves (false: no context).
-- Elsewhere the context is the enclosing one. Observers (FSDP) learn when a reentrant
-- region starts running (enter), which leaves the graph its recomputation built reaches
-- (reached, with a function computing them as a set) and when its nested backward is
-- over (done).
local contexts = {}
local observers = {}

-- The innermost context: a reentrant frame, false inside a non-reentrant recomputation,
-- nil outside both.
function M.graph_context() return contexts[#contexts] end

-- observer: {enter = fn(frame), reached = fn(frame, leaves_fn), done = fn(frame)}, any of
-- them optional.
function M.observe(observer)
  observers[#observers + 1] = observer
  return {remove = function()
    for i, o in ipairs(observers) do if o == observer then table.remove(observers, i) break end end
  end}
end

local function notify(event, frame, arg)
  for i = 1, #observers do
    local fn = observers[i][event]
    if fn then fn(frame, arg) end
  end
end

-- fn(...) with context pushed (observers told when it is a frame being entered).
local function in_context(context, fn, ...)
  contexts[#contexts + 1] = context
  local depth = #contexts
  if context then notify("enter", context) end
  return finally(function() for i = #contexts, depth, -1 do contexts[i] = nil end end, fn, ...)
end

-- The leaves (a set of tensors) whose gradients backward from output accumulates.
local function leaves_reached(output)
  local leaves = {}
  local root = output.grad_fn or rawget(output, "_accumulator")
  if not root then
    if output.requires_grad then leaves[output] = true end
    return leaves
  end
  local seen, stack = {[root] = true}, {root}
  while #stack > 0 do
    local node = stack[#stack]
    stack[#stack] = nil
    if node.is_accumulator then leaves[node.variable] = true end
    for i = 1, #node do
      local next_node = node[i]
      if next_node and not seen[next_node] then
        seen[next_node] = true
        stack[#stack + 1] = next_node
      end
    end
  end
  return leaves
end

local function pack_results(...) return {n = select("#", ...), ...} end

local function has_tensor(results)
  for i = 1, results.n do
    local r = results[i]
    if is_tensor(r) then return true end
    if type(r) == "table" and getmetatable(r) == nil then
      for _, v in pairs(r) do if is_tensor(v) then return true end end
    end
  end
  return false
end

-- ---- frames: what a region keeps between its forward pass and its recomputation ----

-- Inputs are kept as their own handles with their versions, so recomputation sees the
-- same values and an in-place change between forward and backward is detected.
local function new_frame(fn, args, opts)
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
  local frame = {fn = fn, inputs = inputs, packed = 0, released = 0, shapes = {},
                 save_node_seqs = {}, save_storages = {},
                 rng_state = opts.preserve_rng_state and random.get_rng_state() or nil}
  if opts.policy then frame.store = selective.new_store(opts.policy, function() return frame.packed end) end
  return frame
end

-- Free the inputs and kept op outputs once no recomputation can follow.
local function release_sources(frame)
  if frame.sources_released then return end
  frame.sources_released = true
  for i = 1, frame.inputs.n do
    local entry = frame.inputs[i]
    if entry.tensor then entry.tensor:_release() end
  end
  if frame.store then selective.release(frame.store) end
end

local function check_inputs(frame)
  if frame.sources_released then
    fail("checkpoint", "the region was already recomputed and its inputs freed; pass " ..
         "{retain_graph = true} to the first backward to backward through it again")
  end
  for i = 1, frame.inputs.n do
    local entry = frame.inputs[i]
    if entry.tensor and entry.tensor._c.storage.version ~= entry.version then
      fail("checkpoint", "input %d was modified in place after the forward pass and before " ..
           "recomputation (version %d, expected %d)", i, tonumber(entry.tensor._c.storage.version),
           tonumber(entry.version))
    end
  end
end

-- The region's arguments: the kept inputs, or (as_leaves) detached leaves of them; inputs
-- saved through the node's saved-tensor hooks come back through their unpack.
local function frame_args(frame, as_leaves, node)
  local args = {}
  for i = 1, frame.inputs.n do
    local entry = frame.inputs[i]
    if entry.saved then
      local leaf = node:saved_tensor(entry.saved):detach()
      leaf.requires_grad = entry.requires_grad
      args[i] = leaf
    elseif entry.tensor and as_leaves then
      local leaf = entry.tensor:detach()
      leaf.requires_grad = entry.tensor.requires_grad
      args[i] = leaf
    elseif entry.tensor then
      args[i] = entry.tensor
    else
      args[i] = entry.value
    end
  end
  return args
end

local function with_rng(state, fn, ...)
  if not state then return fn(...) end
  local outer = random.get_rng_state()
  random.set_rng_state(state)
  return finally(function() random.set_rng_state(outer) end, fn, ...)
end

-- Raised by a recomputation's last save: what follows in the region is not needed.
local stop_recomputation = setmetatable({}, {__tostring = function() return "checkpoint: recomputation stopped" end})

-- Run the region's function again as in the forward pass: same RNG state, kept op outputs
-- handed back by the policy's store, saves going through the given hooks (if any). Every
-- tensor it makes is freed on return except what after_run(results) returns or keeps.
-- Returns whether the region ran to its end (it may stop early) and after_run's result.
-- ---- the region's last op ----
-- Recomputation stops at the region's last save. When the saves from some op on all come
-- from that op's own node and none of them is its output (a region ending in a linear layer
-- saves the layer's input and weight), the op's result is never read: recomputation hands out
-- an uninitialised tensor of its shape instead of computing it, as PyTorch's early stop ends
-- before the last op's kernel. Only GEMMs are skipped, whose code reads nothing of the
-- product, and only in regions without a policy or nested regions, whose op counts match
-- between the forward pass and recomputation.
local SKIPPABLE = {matmul = true, linear = true}

-- Forward pass: note each op (its place, its node's sequence, its output) for the saves
-- that follow it.
local function noting_hook(frame)
  local count = 0
  return function(name, compute, ...)
    count = count + 1
    local op = {index = count, name = name, saves_before = frame.packed, node_seq = autograd.next_sequence()}
    local out = compute(...)
    if SKIPPABLE[name] and is_tensor(out) then
      op.shape, op.dtype, op.pool, op.storage = out:shape(), out._c.dtype, out._c.storage.pool, out._c.storage
    end
    frame.current_op = op
    return out
  end
end

-- The op recomputation may skip, or nil.
local function skippable_op(frame)
  local op = frame.saving_op
  if not op or not op.shape or frame.nested then return nil end
  for j = op.saves_before + 1, frame.packed do
    if frame.save_node_seqs[j] ~= op.node_seq or frame.save_storages[j] == op.storage then return nil end
  end
  op.storage = nil
  return op
end

-- Recomputation: the skipped op gets an uninitialised output; captured() counts the saves.
local function skipping_hook(op, captured)
  local count = 0
  return function(name, compute, ...)
    count = count + 1
    if count == op.index and name == op.name and captured() == op.saves_before then
      stats.add_skipped_op()
      return Tensor.empty_raw(op.shape, op.dtype, op.pool)
    end
    return compute(...)
  end
end

local function rerun(frame, args, hooks, after_run)
  local function region()
    return scope.run(function()
      return after_run(pack_results(scope.run(frame.fn, unpack(args, 1, frame.inputs.n))))
    end)
  end
  local run = region
  if hooks then
    run = function() return autograd.saved_tensors_hooks(hooks.pack, hooks.unpack, region) end
  end
  local finished
  if frame.store then
    local hook, inner
    hook, finished = selective.replaying_hook(frame.store)
    inner = run
    run = function() return autograd.with_op_hook(hook, inner) end
  elseif frame.skip and hooks and hooks.captured then
    local inner, hook = run, skipping_hook(frame.skip, hooks.captured)
    run = function() return autograd.with_op_hook(hook, inner) end
  end
  local ok, out = pcall(autograd.enable_grad, with_rng, frame.rng_state, run)
  if not ok and out ~= stop_recomputation then error(out, 0) end
  if finished then finished(ok) end
  stats.add_recomputed(1)
  return ok, out
end

-- Regions entered while grad is off save nothing, and regions entered while an enclosing
-- region is being recomputed only need to produce values: both just run.
local function discard_pack() return false end
local function discard_unpack()
  fail("checkpoint", "backward used a tensor saved while a region was being recomputed")
end

local function run_plainly(fn, args, opts)
  if recompute_depth == 0 then return fn(unpack(args, 1, args.n)) end
  local function run() return fn(unpack(args, 1, args.n)) end
  if opts.policy then
    local inner = run
    run = function() return autograd.with_op_hook(selective.computing_hook, inner) end
  end
  return autograd.saved_tensors_hooks(discard_pack, discard_unpack, run)
end

-- fn(...) with saves discarded when an enclosing region is being recomputed.
function M.unless_recomputing(wrapper, fn, ...)
  if recompute_depth > 0 then return autograd.saved_tensors_hooks(discard_pack, discard_unpack, fn, ...) end
  return wrapper(fn, ...)
end

-- ---- non-reentrant ----

-- Saves are captured in order; the last one the forward pass made ends the recomputation.
local function recompute(frame)
  check_inputs(frame)
  local captured = {}
  local hooks = {
    pack = function(t)
      local n = #captured + 1
      captured[n] = scope.keep(Tensor.alias_raw(t))
      if n == frame.packed then error(stop_recomputation, 0) end
      return n
    end,
    unpack = function() fail("checkpoint", "a tensor saved by a recomputation was used directly") end,
    captured = function() return #captured end,
  }
  recompute_depth = recompute_depth + 1
  local ok, err = pcall(in_context, false, rerun, frame, frame_args(frame, false), hooks, function() return nil end)
  recompute_depth = recompute_depth - 1
  if not ok then
    for _, t in ipairs(captured) do t:_release() end
    error(err, 0)
  end
  return captured
end

local function check_recomputed(frame, captured)
  if #captured ~= frame.packed then
    for _, t in ipairs(captured) do t:_release() end
    fail("checkpoint", "recomputation saved %d tensors, the forward pass saved %d (the region " ..
         "is not deterministic or its inputs changed)", #captured, frame.packed)
  end
  for i, t in ipairs(captured) do
    local shape = t:shape()
    if not (shape == frame.shapes[i]) then
      for _, c in ipairs(captured) do c:_release() end
      fail("checkpoint", "recomputed tensor %d has shape %s, the forward pass saved shape %s " ..
           "(the region is not deterministic or its inputs changed)", i, tostring(shape),
           tostring(frame.shapes[i]))
    end
  end
end

local function release_placeholder(placeholder)
  local frame, index = placeholder.frame, placeholder.index
  local recomputed = frame.recomputed
  if recomputed and recomputed[index] then
    recomputed[index]:_release()
    recomputed[index] = false
  end
  frame.released = frame.released + 1
  if frame.released == frame.packed then release_sources(frame) end
end

-- The tensor a placeholder stands for: recomputes the region on the first request. Each
-- recomputed tensor is handed out once; asking again (retain_graph) recomputes again.
local function unpack_placeholder(placeholder)
  local frame, index = placeholder.frame, placeholder.index
  if not (frame.recomputed and frame.recomputed[index]) then
    if frame.recomputed then
      for _, t in ipairs(frame.recomputed) do if t then t:_release() end end
    end
    frame.recomputed = nil
    local captured = recompute(frame)
    check_recomputed(frame, captured)
    frame.recomputed = captured
    if not autograd.retaining_graph() then release_sources(frame) end
  end
  local t = frame.recomputed[index]
  frame.recomputed[index] = false
  local handed_out = Tensor.alias_raw(t)
  t:_release()
  return handed_out
end

local function placeholder_pack(frame)
  return function(t, node)
    local n = frame.packed + 1
    frame.packed = n
    frame.shapes[n], frame.save_node_seqs[n], frame.save_storages[n] = t:shape(), node.seq, t._c.storage
    frame.saving_op = frame.current_op
    return {frame = frame, index = n, _release = release_placeholder}
  end
end

function M.checkpoint_non_reentrant(fn, args, opts)
  if recording_frame then recording_frame.nested = true end
  if not autograd.is_grad_enabled() or recompute_depth > 0 then return run_plainly(fn, args, opts) end
  local frame = new_frame(fn, args, opts)
  local function region() return scope.run(fn, unpack(args, 1, args.n)) end
  local run = region
  if frame.store then
    run = function() return autograd.with_op_hook(selective.recording_hook(frame.store), region) end
  else
    run = function() return autograd.with_op_hook(noting_hook(frame), region) end
  end
  local outer = recording_frame
  recording_frame = frame
  local ok, results = pcall(function()
    return pack_results(autograd.saved_tensors_hooks(placeholder_pack(frame), unpack_placeholder, run))
  end)
  recording_frame = outer
  frame.current_op = nil
  if not ok then release_sources(frame); error(results, 0) end
  if not has_tensor(results) then
    release_sources(frame)
    fail("checkpoint", "the checkpointed function returned no tensor (got %s)",
         results.n == 0 and "nothing" or type(results[1]))
  end
  if frame.packed == 0 then
    release_sources(frame)
  elseif frame.store then
    selective.drop_unneeded(frame.store, frame.save_node_seqs, frame.save_storages)
  else
    frame.skip = skippable_op(frame)
  end
  frame.save_node_seqs, frame.save_storages, frame.saving_op = nil, nil, nil
  return unpack(results, 1, results.n)
end

-- ---- reentrant ----

-- Like PyTorch's save_for_backward of the region's inputs: under saved-tensor hooks other
-- than checkpointing's own (save_on_cpu, offload_wrapper, a user's), the inputs are saved
-- on the node through them and the frame lets go of its handles, so offloading moves them.
local function save_inputs_through_hooks(frame, node)
  local hooks = autograd.current_saved_tensors_hooks()
  if not hooks or hooks.unpack == unpack_placeholder or hooks.unpack == discard_unpack then return end
  for i = 1, frame.inputs.n do
    local entry = frame.inputs[i]
    if entry.tensor then
      entry.saved = node:save(entry.tensor)
      entry.requires_grad = entry.tensor.requires_grad
      entry.tensor:_release()
      entry.tensor = nil
    end
  end
end

-- Input gradients leave the nested backward as ordinary temporaries, so the engine frees
-- them once they are accumulated.
local function reentrant_backward(node, grad)
  local frame = node.frame
  check_inputs(frame)
  local leaves = frame_args(frame, true, node)
  local _, output = in_context(frame, rerun, frame, leaves, nil, function(results) return results[1] end)
  notify("reached", frame, function() return leaves_reached(output) end)
  if output.requires_grad then autograd.backward({output}, {grad}) end
  notify("done", frame)
  local grads = {}
  for i = 1, frame.inputs.n do
    local leaf = leaves[i]
    local g = is_tensor(leaf) and rawget(leaf, "grad") or nil
    if g then
      leaf.grad = nil
      g._keep = nil
    end
    grads[i] = g
  end
  if not autograd.retaining_graph() then release_sources(frame) end
  return unpack(grads, 1, frame.inputs.n)
end

-- A reentrant region's results: exactly one tensor.
local function one_tensor(results)
  if results.n > 1 then
    fail("checkpoint", "with use_reentrant the function must return one tensor, got %d results " ..
         "(non-reentrant checkpointing takes any results)", results.n)
  end
  local output = results[1]
  if not is_tensor(output) then
    fail("checkpoint", "with use_reentrant the function must return one tensor, got %s", type(output))
  end
  return output
end

function M.checkpoint_reentrant(fn, args, opts)
  if recording_frame then recording_frame.nested = true end
  if not autograd.is_grad_enabled() or recompute_depth > 0 then
    return one_tensor(pack_results(run_plainly(fn, args, opts)))
  end
  local frame = new_frame(fn, args, opts)
  local function region() return scope.run(fn, unpack(args, 1, args.n)) end
  local run = region
  if frame.store then
    run = function() return autograd.with_op_hook(selective.recording_hook(frame.store), region) end
  end
  local ok, output = pcall(function() return one_tensor(pack_results(in_context(frame, autograd.no_grad, run))) end)
  if not ok then release_sources(frame); error(output, 0) end
  local inputs = {}
  for i = 1, args.n do inputs[i] = is_tensor(args[i]) and args[i] or false end
  local node = autograd.record_list(output, "CheckpointFunctionBackward", reentrant_backward, inputs)
  if node then
    node.frame = frame
    node.saved = {} -- marks the node freed once run, so a second backward is refused
    save_inputs_through_hooks(frame, node)
  else
    release_sources(frame)
  end
  return output
end

return M
