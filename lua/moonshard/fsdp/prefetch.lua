-- FSDP prefetching: the order units ran in during the first forward, and the unit whose
-- all-gather to issue early. forward_prefetch gathers the next unit of that order when a
-- unit starts its forward; backward_prefetch gathers the previous one (backward runs in
-- reverse) when a unit starts its backward (BACKWARD_PRE) or once its gradients are done
-- (BACKWARD_POST). Prefetching holds one more unit's all-gather buffer; it pays off when
-- collectives run while the device computes (nccl) and is off by default elsewhere.
local autograd = require "moonshard.autograd"

local M = {}

M.BACKWARD = {BACKWARD_PRE = true, BACKWARD_POST = true}

-- The backward_prefetch a tree uses: the option as given (false for none), or by default
-- BACKWARD_PRE on groups whose collectives overlap computation.
function M.resolve_backward(option, backend)
  if option == nil then return backend == "nccl" and "BACKWARD_PRE" or false end
  return option
end

-- The tree's root starts a forward outside backward: the first forward records the order,
-- later ones walk it.
function M.begin_forward(tree)
  tree.forward_cursor = 0
  if not tree.forward_order then tree.recording = {} end
end

-- The root's post-forward: the recorded order is fixed from now on.
function M.end_forward(tree)
  if tree.recording then
    tree.forward_order, tree.recording = tree.recording, nil
  end
end

-- Issue unit's all-gather ahead of its use, unless limit_all_gathers holds it back: then
-- at most one prefetched all-gather buffer is alive at a time (a unit gathered ahead and
-- not yet run keeps the next one from starting).
local function prefetch(unit)
  local tree = unit.tree
  if tree.limit_all_gathers then
    for _, u in ipairs(tree.units) do
      if u.gathering and u ~= unit then return end
    end
  end
  unit:start_unshard()
end

-- A unit starts its forward: record it (first forward) and gather the next unit.
function M.on_forward(unit)
  local tree = unit.tree
  if autograd.in_backward() or not tree.forward_cursor then return end
  tree.forward_cursor = tree.forward_cursor + 1
  if tree.recording then
    local order = tree.recording
    order[#order + 1] = unit
    if not unit.forward_index then unit.forward_index = #order end
    return
  end
  if tree.forward_prefetch then
    local next_unit = tree.forward_order[tree.forward_cursor + 1]
    if next_unit and next_unit ~= unit then prefetch(next_unit) end
  end
end

-- The unit backward reaches after this one: the one that ran before it in forward.
function M.backward_next(unit)
  local order = unit.tree.forward_order
  local index = unit.forward_index
  return order and index and order[index - 1] or nil
end

-- A unit starts its backward (mode BACKWARD_PRE) or has all its gradients (BACKWARD_POST).
function M.on_backward(unit, mode)
  if unit.tree.backward_prefetch ~= mode then return end
  local next_unit = M.backward_next(unit)
  if next_unit then prefetch(next_unit) end
end

return M
