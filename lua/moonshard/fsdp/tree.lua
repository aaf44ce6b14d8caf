-- One FSDP tree's shared state, owned by one object per root that every unit of the tree
-- points at (unit.tree): its units (root first), the end-of-backward callback flag, the
-- forward order prefetching records, the prefetch settings and the state-dict settings.
local Tree = {}
Tree.__index = Tree

-- units: the tree's units, root first; settings: {forward_prefetch, limit_all_gathers,
-- backward_prefetch} as resolved from FSDP's options. Trees rooted at the units (nested
-- FSDP calls made first) end here: their hooks (tree.hooks, on the root module) are removed.
function Tree.new(units, settings)
  for _, unit in ipairs(units) do
    local absorbed = Tree.rooted_at(unit)
    for _, handle in ipairs(absorbed and absorbed.hooks or {}) do handle.remove() end
  end
  local tree = setmetatable({
    root = units[1], units = units, callback_queued = false,
    forward_prefetch = settings.forward_prefetch, limit_all_gathers = settings.limit_all_gathers,
    backward_prefetch = settings.backward_prefetch,
    state_dict_settings = {type = "SHARDED_STATE_DICT"},
    forward_order = nil, recording = nil, forward_cursor = nil, hooks = {},
  }, Tree)
  for _, unit in ipairs(units) do unit.tree = tree end
  return tree
end

-- The tree whose root unit is unit (nil for a unit inside another's tree, or no unit).
function Tree.rooted_at(unit)
  local tree = unit and unit.tree
  return tree and tree.root == unit and tree or nil
end

function Tree:is_root(unit) return self.root == unit end

return Tree
