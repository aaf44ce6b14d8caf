-- Define-by-run reverse-mode autograd: graph nodes, saved tensors (with pack/unpack
-- hooks), tensor and post-accumulate-grad hooks, queued callbacks, and the engine.
-- Engine state lives in a per-call task, so backward may run inside a node's backward.
local C = require "moonshard.ffi"
local scope = require "moonshard.scope"
local finally = require "moonshard.finally"
local Tensor = require "moonshard.tensor"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local grad_enabled = true
local sequence = 0
local saved_hooks = {}    -- stack of {pack = fn, unpack = fn}
local op_hooks = {}       -- stack of fn(op_name, compute, ...) around policy-visible ops
local tasks = {}          -- stack of running backward tasks


-- ---- grad mode ----

function M.is_grad_enabled() return grad_enabled end

local function with_grad_mode(mode, fn, ...)
  if not C.is_callable(fn) then fail(mode and "enable_grad" or "no_grad", "expected a function, got %s", type(fn)) end
  local previous = grad_enabled
  grad_enabled = mode
  return finally(function() grad_enabled = previous end, fn, ...)
end

function M.no_grad(fn, ...) return with_grad_mode(false, fn, ...) end
function M.enable_grad(fn, ...) return with_grad_mode(true, fn, ...) end
function M.set_grad_enabled(mode) grad_enabled = mode and true or false end

-- ---- nodes ----

-- A node's edges (the nodes its inputs' gradients flow to, false for an input that needs
-- none) are its array part: node[i] for input i. Keeping them in the node saves a table per op.
local Node = {}
Node.__index = Node
M.Node = Node

-- A leaf's gradient sink. It runs as soon as its gradient is ready (highest priority), so
-- post-accumulate hooks (FSDP's reduce-scatter) fire early and memory falls during backward.
local function accumulator(t)
  local node = rawget(t, "_accumulator")
  if not node then
    node = setmetatable({name = "AccumulateGrad", variable = t, seq = math.huge,
                         is_accumulator = true}, Node)
    t._accumulator = node
  end
  return node
end

local function edge_of(t)
  if type(t) ~= "table" or not t.requires_grad then return false end
  return t.grad_fn or accumulator(t)
end

-- A node for an output computed from the given inputs when any of them requires grad, else
-- nil. backward(node, grad_out) returns one gradient per input (nil for none). The output
-- made with it must get it as grad_fn (Tensor.wrap does when given it).
local function new_node(name, backward, a, b, c, d)
  if not grad_enabled then return nil end
  if not ((type(a) == "table" and a.requires_grad) or (type(b) == "table" and b.requires_grad)
          or (type(c) == "table" and c.requires_grad) or (type(d) == "table" and d.requires_grad)) then
    return nil
  end
  sequence = sequence + 1
  return setmetatable({edge_of(a), edge_of(b), edge_of(c), edge_of(d),
                       name = name, backward = backward, seq = sequence}, Node)
end
M.new_node = new_node

-- Record a node producing out (already made) from the given inputs when any of them requires
-- grad. Returns the node (for saving tensors) or nil when no graph is recorded.
function M.record(out, name, backward, a, b, c, d)
  local node = new_node(name, backward, a, b, c, d)
  if node then
    out.grad_fn = node
    out.requires_grad = true
  end
  return node
end

-- Same, for any number of inputs given as an array.
function M.record_list(out, name, backward, inputs)
  if not grad_enabled then return nil end
  local any = false
  for i = 1, #inputs do
    if type(inputs[i]) == "table" and inputs[i].requires_grad then any = true break end
  end
  if not any then return nil end
  sequence = sequence + 1
  local node = setmetatable({name = name, backward = backward, seq = sequence}, Node)
  for i = 1, #inputs do node[i] = edge_of(inputs[i]) end
  out.grad_fn = node
  out.requires_grad = true
  return node
end

-- ---- ops with several outputs ----
-- The engine's nodes have one output each. An op with several outputs records one node for
-- itself (edges to its inputs) and, per output, a relay node whose backward hands the
-- incoming gradient to the op's node and passes a one-element token on to it. The op's node
-- has the lower sequence number, so it runs after every relay that got a gradient; its
-- backward(node, grads) sees grads[i] for output i (nil where none came in this backward:
-- what relays handed over in an earlier one that failed before the op's node ran is
-- dropped), returns its inputs' gradients (never one of grads itself: an alias of it if
-- need be), and the grads are released after it.

-- Gradients handed over in an earlier backward that failed before the op's node ran.
local function drop_handed(op)
  for _, g in pairs(op.output_grads) do g:_release() end
  op.output_grads = {}
end

local function relay_backward(node, g)
  local op, task = node.op, tasks[#tasks]
  if op.handed_in ~= task then
    drop_handed(op)
    op.handed_in = task
  end
  local grads, slot = op.output_grads, node.slot
  if grads[slot] then grads[slot]:_release() end
  grads[slot] = scope.keep(Tensor.alias_raw(g))
  local token = Tensor.empty_raw({}, g._c.dtype, g._c.storage.pool)
  check(lib.ms_fill(token._c, 0), node.name)
  return token
end

local function outputs_backward(node)
  local grads = node.output_grads
  node.output_grads, node.handed_in = {}, nil
  local results = {node.outputs_backward(node, grads)}
  for _, g in pairs(grads) do g:_release() end
  return unpack(results, 1, #node)
end

-- Records the op's node over inputs (an array) and a relay named relay_names[i] (default
-- name) for each outputs[i] that is not false; returns the op's node, or nil when no input
-- requires grad.
function M.record_outputs(outputs, name, backward, inputs, relay_names)
  local node = M.record_list({}, name, outputs_backward, inputs)
  if not node then return nil end
  node.outputs_backward, node.output_grads = backward, {}
  local handle = {requires_grad = true, grad_fn = node}
  for i = 1, #outputs do
    if outputs[i] then
      local relay = M.record(outputs[i], relay_names and relay_names[i] or name, relay_backward, handle)
      relay.op, relay.slot = node, i
    end
  end
  return node
end

-- The sequence number the next recorded node will get.
function M.next_sequence() return sequence + 1 end

-- Keep t for backward. Without hooks the node owns its own handle to t's storage, so the
-- storage lives exactly until the node has run; with saved-tensor hooks, pack(t, node) decides.
function Node:save(t)
  local saved = {version = t._c.storage.version, source = t}
  local hooks = saved_hooks[#saved_hooks]
  if hooks then
    local packed = hooks.pack(t, self)
    if Tensor.is_tensor(packed) then
      packed = scope.keep(Tensor.alias_raw(packed))
      saved.owned = packed
    end
    saved.packed, saved.unpack = packed, hooks.unpack
  else
    saved.owned = scope.keep(Tensor.alias_raw(t))
  end
  saved.source = nil
  local list = self.saved
  if not list then list = {}; self.saved = list end
  list[#list + 1] = saved
  return saved
end

-- The tensor kept by save, checking that it was not modified in place since.
function Node:saved_tensor(saved)
  if self.freed then
    fail("backward", "trying to backward through the graph a second time (or to use saved " ..
         "tensors after they were freed); pass {retain_graph = true} to the first backward")
  end
  if saved.unpack then
    local t = saved.unpack(saved.packed)
    if not Tensor.is_tensor(t) then
      fail("backward", "%s: the unpack hook returned %s instead of a tensor", self.name, type(t))
    end
    return t
  end
  local t = saved.owned
  if t._c.storage.version ~= saved.version then
    fail("backward", "a tensor saved by %s was modified in place after it was saved " ..
         "(version %d, expected %d)", self.name, tonumber(t._c.storage.version),
         tonumber(saved.version))
  end
  return t
end

function Node:release_saved()
  local list = self.saved
  if not list then return end
  for i = 1, #list do
    local saved = list[i]
    local packed = saved.packed
    if type(packed) == "table" and not rawequal(packed, saved.owned) and packed._release then
      packed:_release()
    end
    if saved.owned then saved.owned:_release() end
    saved.owned, saved.packed = nil, nil
  end
  self.saved = nil
  self.freed = true
end

function Node:register_prehook(fn)
  local hooks = self.pre_hooks or {}
  self.pre_hooks = hooks
  hooks[#hooks + 1] = fn
  return {remove = function() for i, h in ipairs(hooks) do if h == fn then table.remove(hooks, i) break end end end}
end

-- ---- hooks on tensors ----

-- fn(grad) runs when t's gradient is computed; a non-nil return replaces the gradient.
function M.register_hook(t, fn)
  if not t.requires_grad then
    fail("register_hook", "cannot register a hook on a tensor that does not require grad")
  end
  local node = t.grad_fn or accumulator(t)
  return node:register_prehook(fn)
end

-- fn(t) runs after t.grad has been accumulated (t must be a leaf).
function M.register_post_accumulate_grad_hook(t, fn)
  if t.grad_fn then
    fail("register_post_accumulate_grad_hook", "the tensor is not a leaf")
  end
  if not t.requires_grad then
    fail("register_post_accumulate_grad_hook", "the tensor does not require grad")
  end
  local node = accumulator(t)
  local hooks = node.post_hooks or {}
  node.post_hooks = hooks
  hooks[#hooks + 1] = fn
  return {remove = function() for i, h in ipairs(hooks) do if h == fn then table.remove(hooks, i) break end end end}
end

-- Run fn(...) with saved-tensor hooks: every tensor saved for backward inside goes through
-- pack(t) and comes back through unpack(packed) when backward needs it.
function M.saved_tensors_hooks(pack, unpack, fn, ...)
  if type(pack) ~= "function" or type(unpack) ~= "function" then
    fail("saved_tensors_hooks", "pack and unpack must be functions")
  end
  saved_hooks[#saved_hooks + 1] = {pack = pack, unpack = unpack}
  local depth = #saved_hooks
  return finally(function() for i = #saved_hooks, depth, -1 do saved_hooks[i] = nil end end, fn, ...)
end

-- The innermost active saved-tensor hooks ({pack =, unpack =}), or nil.
function M.current_saved_tensors_hooks() return saved_hooks[#saved_hooks] end

-- ---- op hooks ----

-- Ops whose outputs a selective-checkpoint policy may keep (the matrix products) compute
-- through run_op: compute(...) returns the op's output before autograd records it. The
-- innermost hook may return a stored output instead of computing.
function M.run_op(name, compute, ...)
  local hook = op_hooks[#op_hooks]
  if hook == nil then return compute(...) end
  return hook(name, compute, ...)
end

-- Run fn(...) with hook(op_name, compute, ...) seeing every run_op inside.
function M.with_op_hook(hook, fn, ...)
  op_hooks[#op_hooks + 1] = hook
  local depth = #op_hooks
  return finally(function() for i = #op_hooks, depth, -1 do op_hooks[i] = nil end end, fn, ...)
end

-- ---- engine ----

-- Queue fn to run once when the innermost running backward pass ends.
function M.queue_callback(fn)
  local task = tasks[#tasks]
  if not task then fail("queue_callback", "no backward pass is running") end
  task.callbacks[#task.callbacks + 1] = fn
end

function M.in_backward() return #tasks > 0 end
-- Whether the innermost running backward keeps the graph for another pass.
function M.retaining_graph()
  local task = tasks[#tasks]
  return task ~= nil and task.retain_graph and true or false
end
function M.backward_depth() return #tasks end

local function heap_push(heap, node)
  local i = #heap + 1
  heap[i] = node
  while i > 1 do
    local parent = math.floor(i / 2)
    if heap[parent].seq >= heap[i].seq then break end
    heap[parent], heap[i] = heap[i], heap[parent]
    i = parent
  end
end

local function heap_pop(heap)
  local top, n = heap[1], #heap
  heap[1] = heap[n]
  heap[n] = nil
  n = n - 1
  local i = 1
  while true do
    local l, r, largest = 2 * i, 2 * i + 1, i
    if l <= n and heap[l].seq > heap[largest].seq then largest = l end
    if r <= n and heap[r].seq > heap[largest].seq then largest = r end
    if largest == i then break end
    heap[i], heap[largest] = heap[largest], heap[i]
    i = largest
  end
  return top
end

local function count_dependencies(roots)
  local deps, stack, seen = {}, {}, {}
  for _, node in ipairs(roots) do
    if not seen[node] then seen[node] = true; stack[#stack + 1] = node end
  end
  while #stack > 0 do
    local node = stack[#stack]
    stack[#stack] = nil
    for i = 1, #node do
      local next_node = node[i]
      if next_node then
        deps[next_node] = (deps[next_node] or 0) + 1
        if not seen[next_node] then
          seen[next_node] = true
          stack[#stack + 1] = next_node
        end
      end
    end
  end
  return deps
end

local function add_grads(a, b)
  local out = Tensor.empty_like_raw(a)
  check(lib.ms_binary(out._c, a._c, b._c, lib.MS_ADD), "backward")
  return out
end

-- Gradient buffers are reference counted inside one task, so a gradient tensor the engine
-- made is released as soon as no buffer holds it.
local function buffer_put(task, node, grad)
  local buffers, refs = task.buffers, task.refs
  local held = buffers[node]
  if held == nil then
    buffers[node] = grad
    refs[grad] = (refs[grad] or 0) + 1
    return
  end
  local sum = add_grads(held, grad)
  buffers[node] = sum
  refs[sum] = 1
  task.drop(held)
  task.consider(grad)
end

local function accumulate_grad(task, node, grad)
  local t = node.variable
  local existing = rawget(t, "grad")
  if existing == nil then
    if task.refs[grad] == 0 and not task.foreign[grad] and grad._c.storage.refcount == 1 then
      task.foreign[grad] = true
      grad.requires_grad, grad.grad_fn = nil, nil
      t.grad = scope.keep(grad)
    else
      local copy = Tensor.empty_like_raw(grad)
      check(lib.ms_copy(copy._c, grad._c), "backward")
      t.grad = scope.keep(copy)
    end
  else
    check(lib.ms_binary(existing._c, existing._c, grad._c, lib.MS_ADD),
          "backward: accumulating grad")
    existing:_bump_version()
  end
  local hooks = node.post_hooks
  if hooks then
    for i = 1, #hooks do hooks[i](t) end
  end
end

local function run_node(task, node, grad)
  local hooks = node.pre_hooks
  if hooks and grad ~= nil then
    task.foreign[grad] = true
    for i = 1, #hooks do
      local replaced = hooks[i](grad)
      if replaced ~= nil then
        if not Tensor.is_tensor(replaced) then
          fail("backward", "a tensor hook returned %s; it may return a gradient (a tensor) or nothing", type(replaced))
        end
        if not (replaced:shape() == grad:shape()) or replaced._c.dtype ~= grad._c.dtype then
          fail("backward", "a tensor hook replaced a gradient of shape %s and dtype %s with one of shape %s and dtype %s",
               tostring(grad:shape()), grad:dtype(), tostring(replaced:shape()), replaced:dtype())
        end
        grad = replaced
        task.foreign[grad] = true
      end
    end
  end
  if node.is_accumulator then
    if grad ~= nil and task.accumulate then accumulate_grad(task, node, grad) end
    return nil
  end
  if grad == nil or (task.needed and not task.needed[node]) then return nil end
  if node.freed then
    fail("backward", "trying to backward through the graph a second time (or to use saved " ..
         "tensors after they were freed); pass {retain_graph = true} to the first backward")
  end
  local grads
  if #node <= 4 then -- fixed results: LuaJIT compiles no {...} of a call's results
    local a, b, c, d = scope.run(node.backward, node, grad)
    grads = {a, b, c, d}
  else
    grads = {scope.run(node.backward, node, grad)}
  end
  if not task.retain_graph then node:release_saved() end
  return grads
end

local function execute(task, root_nodes, root_grads)
  local deps = count_dependencies(root_nodes)
  local ready = {}
  for i, node in ipairs(root_nodes) do
    task.foreign[root_grads[i]] = true
    buffer_put(task, node, root_grads[i])
  end
  for _, node in ipairs(root_nodes) do
    if not deps[node] and not node.queued then node.queued = true; heap_push(ready, node) end
  end
  while #ready > 0 do
    local node = heap_pop(ready)
    node.queued = nil
    local grad = task.buffers[node]
    task.buffers[node] = nil
    if grad ~= nil then task.refs[grad] = task.refs[grad] - 1 end
    local grads = run_node(task, node, grad)
    for i = 1, #node do
      local next_node = node[i]
      if next_node then
        local g = grads and grads[i]
        if g ~= nil then buffer_put(task, next_node, g) end
        local remaining = deps[next_node] - 1
        deps[next_node] = remaining
        if remaining == 0 then heap_push(ready, next_node) end
      end
    end
    if grads then
      for i = 1, #node do if grads[i] ~= nil then task.consider(grads[i]) end end
    end
    if grad ~= nil then task.consider(grad) end
  end
end

local function new_task(retain_graph, accumulate)
  local task = {buffers = {}, refs = {}, foreign = {}, callbacks = {}, retain_graph = retain_graph,
                accumulate = accumulate}
  function task.consider(t)
    if (task.refs[t] or 0) == 0 and not task.foreign[t] and not rawget(t, "_keep")
       and rawget(t, "_c") ~= nil then
      t:_release()
    end
  end
  function task.drop(t)
    task.refs[t] = task.refs[t] - 1
    task.consider(t)
  end
  return task
end

local function run_callbacks(task)
  local i = 1
  while i <= #task.callbacks do
    task.callbacks[i]()
    i = i + 1
  end
end

-- The nodes reachable from roots whose backward leads to a node of targets (a set): the
-- others need not run. A node's inputs' nodes were made before it (lower seq), so one pass
-- in seq order sees a node's edges first; accumulators (seq math.huge) have no edges, so
-- they lead to themselves alone.
local function nodes_leading_to(roots, targets)
  local all, seen = {}, {}
  for _, node in ipairs(roots) do
    if not seen[node] then seen[node] = true; all[#all + 1] = node end
  end
  local i = 1
  while i <= #all do
    local node = all[i]
    for e = 1, #node do
      local next_node = node[e]
      if next_node and not seen[next_node] then seen[next_node] = true; all[#all + 1] = next_node end
    end
    i = i + 1
  end
  table.sort(all, function(a, b) return a.seq < b.seq end)
  local reaches, needed = {}, {}
  for node in pairs(targets) do reaches[node] = true end
  for _, node in ipairs(all) do
    local leads = false
    for e = 1, #node do
      local next_node = node[e]
      if next_node and reaches[next_node] then leads = true; break end
    end
    needed[node] = leads
    reaches[node] = leads or targets[node] == true
  end
  return needed
end

-- Backpropagate from tensors (array) with gradients (array; nil entries mean ones for a
-- one-element tensor). Gradients accumulate into the .grad of leaves when accumulate.
-- targets (a set of nodes, autograd.grad's inputs): only the nodes leading to them run, so
-- the rest of the graph keeps its saved tensors for a later backward, as PyTorch's.
local function run_backward(tensors, grads, opts, accumulate, targets)
  opts = opts or {}
  grads = grads or {}
  local root_nodes, root_grads, implicit_grads = {}, {}, {}
  for i, t in ipairs(tensors) do
    if not Tensor.is_tensor(t) then fail("backward", "argument %d is not a tensor", i) end
    if not t.requires_grad then
      fail("backward", "element %d of tensors does not require grad and does not have a grad_fn", i - 1)
    end
    local g = grads[i]
    if g == nil then
      if t:numel() ~= 1 then
        fail("backward", "grad can be implicitly created only for scalar outputs (got shape %s)",
             tostring(t:shape()))
      end
      g = Tensor.empty_like_raw(t)
      check(lib.ms_fill(g._c, 1), "backward")
      implicit_grads[#implicit_grads + 1] = g
    elseif not Tensor.is_tensor(g) then
      fail("backward", "gradient %d is not a tensor", i)
    elseif not (g:shape() == t:shape()) then
      fail("backward", "gradient of shape %s for a tensor of shape %s", tostring(g:shape()),
           tostring(t:shape()))
    elseif g._c.storage.pool ~= t._c.storage.pool then
      fail("backward", "gradient %d is on %s but its tensor is on %s", i, g:device(), t:device())
    elseif g._c.dtype ~= t._c.dtype then -- cast to the tensor's dtype, as PyTorch does
      local cast = Tensor.empty_like_raw(t)
      check(lib.ms_copy(cast._c, g._c), "backward")
      g = cast
      implicit_grads[#implicit_grads + 1] = g
    end
    root_nodes[#root_nodes + 1] = t.grad_fn or accumulator(t)
    root_grads[#root_grads + 1] = g
  end
  local task = new_task(opts.retain_graph, accumulate)
  if targets then task.needed = nodes_leading_to(root_nodes, targets) end
  tasks[#tasks + 1] = task
  local mark = scope.enter()
  local previous_mode = grad_enabled
  grad_enabled = false
  local ok, err = pcall(execute, task, root_nodes, root_grads)
  if ok then ok, err = pcall(run_callbacks, task) end
  grad_enabled = previous_mode
  tasks[#tasks] = nil
  scope.exit(mark, {}, 0)
  -- root gradients are never adopted as .grad (they are foreign to the task), so the ones
  -- made here end with the pass, unless autograd.grad returns one
  for _, g in ipairs(implicit_grads) do
    if rawget(g, "_c") ~= nil and not rawget(g, "_keep") then g:_release() end
  end
  if not ok then error(err, 0) end
end

function M.backward(tensors, grads, opts) return run_backward(tensors, grads, opts, true) end

-- Gradients of outputs with respect to inputs, returned instead of accumulated.
-- value as an array of tensors: a tensor, or an array of them (else an error naming what).
local function tensor_list(value, what)
  if Tensor.is_tensor(value) then return {value} end
  if type(value) ~= "table" or getmetatable(value) ~= nil then
    fail("grad", "%s must be a tensor or an array of tensors, got %s", what, type(value))
  end
  for i, t in ipairs(value) do
    if not Tensor.is_tensor(t) then fail("grad", "%s[%d] is not a tensor (%s)", what, i, type(t)) end
  end
  return value
end

function M.grad(outputs, inputs, grad_outputs, opts)
  outputs, inputs = tensor_list(outputs, "outputs"), tensor_list(inputs, "inputs")
  if grad_outputs ~= nil then grad_outputs = tensor_list(grad_outputs, "grad_outputs") end
  local captured, handles, targets = {}, {}, {}
  for i, t in ipairs(inputs) do
    if not t.requires_grad then fail("grad", "input %d does not require grad", i) end
    targets[t.grad_fn or accumulator(t)] = true
    handles[i] = M.register_hook(t, function(g)
      -- g is foreign to the task once a hook saw it, so the engine never releases it
      captured[i] = scope.keep(captured[i] and add_grads(captured[i], g) or g)
    end)
  end
  local ok, err = pcall(run_backward, outputs, grad_outputs, opts, false, targets)
  for i = 1, #inputs do handles[i].remove() end
  if not ok then error(err, 0) end
  return captured
end

return M
