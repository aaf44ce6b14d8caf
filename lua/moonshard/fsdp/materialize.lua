-- Deferred initialisation inside FSDP: a unit whose parameters were built on the meta
-- device gets only its local shards, which param_init_fn (default: reset_parameters) fills;
-- and sync_module_states, which gives every rank the first rank's values after that.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local init_fns = require "moonshard.nn.init_fns"
local random = require "moonshard.random"
local finally = require "moonshard.finally"

local lib, check, fail = C.lib, C.check, C.fail

local function dist() return require "moonshard.dist" end

local M = {}

-- PyTorch's default: each module with meta state resets its own parameters.
function M.default_init(module)
  if module.reset_parameters then module:reset_parameters() end
end

-- Give the meta buffers of module uninitialised storage in pool. fresh_of maps a meta tensor
-- to the tensor replacing it and is shared by every unit of one FSDP call, so a buffer shared
-- by several modules (one tensor under several names) stays one tensor. Each name gets a
-- record for undo; made marks the one that created the tensor (it checks and frees it).
local function materialise_buffers(unit, module, pool, fresh_of)
  for name, b in module:named_buffers({recurse = false, remove_duplicate = false}) do
    if Tensor.is_meta(b) then
      local fresh, made = fresh_of[b], false
      if fresh == nil then
        fresh = Tensor.empty_raw(b:shape(), Tensor.dtype_id(b:dtype(), "FSDP"), pool)
        rawset(fresh, "_init_draws", rawget(b, "_init_draws"))
        fresh_of[b], made = fresh, true
      end
      module:set_buffer(name, fresh)
      unit.materialised_buffers[#unit.materialised_buffers + 1] =
        {module = module, name = name, original = b, fresh = fresh, made = made,
         version = made and fresh:_version() or nil}
    end
  end
end

local function has_meta_buffer(module)
  for _, b in module:named_buffers({recurse = false, remove_duplicate = false}) do
    if Tensor.is_meta(b) then return true end
  end
  return false
end

-- Run init_fn on every module of the unit that holds meta parameters or buffers (in
-- registration order), then check that each of them was written. fresh_of: see
-- materialise_buffers (a new table when nil). Each module's init replays the recorded draws
-- of its materialised buffers from the start, also on a buffer shared with a module whose
-- init ran before (in this unit or an earlier one), as it would on a tensor of its own.
function M.run(unit, modules, init_fn, pool, fresh_of)
  fresh_of = fresh_of or {}
  unit.materialised_buffers = {}
  local targets, seen = {}, {}
  local function add(m)
    if not seen[m] then
      seen[m] = true
      targets[#targets + 1] = m
    end
  end
  local versions = {}
  for _, p in ipairs(unit.params) do
    if p.meta and not p.synced then
      versions[p] = p.sharded._local:_version()
      for _, slot in ipairs(p.slots) do add(slot.module) end
    end
  end
  for _, m in ipairs(modules) do
    if has_meta_buffer(m) then
      add(m)
      materialise_buffers(unit, m, pool, fresh_of)
    end
  end
  local held = {}
  for _, b in ipairs(unit.materialised_buffers) do
    local list = held[b.module] or {}
    list[#list + 1] = b
    held[b.module] = list
  end
  for _, m in ipairs(targets) do
    for _, b in ipairs(held[m] or {}) do
      rawset(b.fresh, "_init_draws", rawget(b.original, "_init_draws"))
      rawset(b.fresh, "_init_next", nil)
    end
    init_fns.run_init(m, init_fn)
  end
  for _, p in ipairs(unit.params) do
    if p.meta and not p.synced then
      rawset(p.sharded, "_init_draws", nil)
      rawset(p.sharded, "_init_next", nil)
      if p.sharded._local:_version() == versions[p] then
        fail("FSDP", "parameter '%s' was built on the meta device and is still uninitialised after " ..
             "param_init_fn ran on its module (%s has no reset_parameters, or it does not write the " ..
             "parameter); give FSDP a param_init_fn that initialises it", p.fqn, p.module.__name or "?")
      end
    end
  end
  for _, b in ipairs(unit.materialised_buffers) do
    rawset(b.fresh, "_init_draws", nil)
    rawset(b.fresh, "_init_next", nil)
    if b.made and b.fresh:_version() == b.version then
      fail("FSDP", "buffer '%s' of %s was built on the meta device and is still uninitialised after " ..
           "param_init_fn ran on its module", b.name, b.module.__name or "?")
    end
  end
end

-- Wrapping succeeded: drop the unit's undo records of materialised buffers.
function M.commit(unit)
  unit.materialised_buffers = nil
end

-- ---- sync_module_states ----
-- Every rank ends with the values the mesh's first rank has after materialisation, as
-- PyTorch's broadcast after param_init_fn: each step below runs within each mesh dim from
-- its first rank, dim by dim. What is on the meta device on the first rank is materialised
-- on every rank as it is there: its initialisation counters (each meta tensor's recorded
-- draws) and its random state are broadcast first, so param_init_fn draws the first rank's
-- values for every row. What is real there is broadcast: buffers before wrapping (a rank
-- holding a meta buffer gets storage for it first), each parameter while its unit is built
-- (a rank holding it on the meta device receives it whole into a temporary and keeps its
-- rows), so no rank holds more than one parameter at full size beyond its shards.

-- The tensors this FSDP call manages, in an order every rank shares: each unit's owned
-- parameters, then the buffers of its modules (one entry per tensor, with every slot).
local function managed_states(to_wrap, owned, modules)
  local entries, seen = {}, {}
  for _, m in ipairs(to_wrap) do
    for _, use in ipairs(owned[m]) do
      entries[#entries + 1] = {tensor = use.tensor, fqn = use.fqn, param = true}
    end
  end
  for _, m in ipairs(to_wrap) do
    for _, mod in ipairs(modules[m]) do
      for name, b in mod:named_buffers({recurse = false, remove_duplicate = false}) do
        local entry = seen[b]
        if not entry then
          entry = {tensor = b, fqn = name, slots = {}}
          seen[b] = entry
          entries[#entries + 1] = entry
        end
        entry.slots[#entry.slots + 1] = {module = mod, name = name}
      end
    end
  end
  return entries
end

-- Broadcast values (a Lua array of numbers) within each dim of mesh from its first rank;
-- returns what the mesh's first rank sent.
local function broadcast_numbers(values, mesh)
  local d = dist()
  for g = 1, mesh:ndim() do
    local group = mesh:get_group(g - 1)
    local src = group:ranks()[1]
    local count = Tensor.empty_raw({1}, lib.MS_F64, lib.MS_POOL_CPU)
    check(lib.ms_fill(count._c, #values), "FSDP: sync_module_states")
    d.broadcast(count, src, {group = group})
    local n = count:item()
    count:_release()
    local payload = Tensor.empty_raw({math.max(n, 1)}, lib.MS_F64, lib.MS_POOL_CPU)
    local data = ffi.cast("double *", lib.ms_tensor_data(payload._c))
    for i = 1, math.min(#values, n) do data[i - 1] = values[i] end -- the source's fill all n
    d.broadcast(payload, src, {group = group})
    values = {}
    for i = 1, n do values[i] = data[i - 1] end
    payload:_release()
  end
  return values
end

-- Whether any rank of mesh has flag set (all-reduced max within each dim, dim by dim).
local function any_rank(flag, mesh)
  local d = dist()
  local t = Tensor.empty_raw({1}, lib.MS_F64, lib.MS_POOL_CPU)
  check(lib.ms_fill(t._c, flag and 1 or 0), "FSDP: sync_module_states")
  for g = 1, mesh:ndim() do d.all_reduce(t, "max", {group = mesh:get_group(g - 1)}) end
  local value = t:item()
  t:_release()
  return value > 0
end

-- Exchange what the first rank has (random state, which states are meta and their
-- draws), give this rank's meta tensors the first rank's draws and broadcast the buffers
-- real there. Returns the plan wrapping follows: {rng = the first rank's random state,
-- real = set of parameters real on the first rank, buffers = the meta buffers given storage
-- here (in pool), one entry per tensor with every slot, for undo_sync}.
function M.prepare_sync(to_wrap, owned, modules, mesh, pool)
  local entries = managed_states(to_wrap, owned, modules)
  local rng = random.get_rng_state()
  local mine = {rng.seed, rng.offset, #entries}
  for _, e in ipairs(entries) do
    local draws = Tensor.is_meta(e.tensor) and rawget(e.tensor, "_init_draws") or {}
    mine[#mine + 1] = Tensor.is_meta(e.tensor) and 1 or 0
    mine[#mine + 1] = #draws
    for _, draw in ipairs(draws) do
      mine[#mine + 1] = draw[1]
      mine[#mine + 1] = draw[2]
    end
  end
  local first = broadcast_numbers(mine, mesh)
  local mismatch
  if first[3] ~= #entries then
    mismatch = ("the first rank manages %d parameters and buffers, this rank %d"):format(first[3], #entries)
  end
  local plan = {rng = {seed = first[1], offset = first[2]}, real = {}, buffers = {}}
  local at = 4
  for _, e in ipairs(mismatch and {} or entries) do
    local meta_there, count = first[at] == 1, first[at + 1]
    local draws = {}
    for i = 1, count do draws[i] = {first[at + 2 * i], first[at + 2 * i + 1]} end
    at = at + 2 + 2 * count
    e.meta_there = meta_there
    if meta_there then
      if not Tensor.is_meta(e.tensor) then
        mismatch = mismatch or ("'%s' is on the meta device on the first rank and real here"):format(e.fqn)
      else
        rawset(e.tensor, "_init_draws", count > 0 and draws or nil)
      end
    end
  end
  if any_rank(mismatch ~= nil, mesh) then
    fail("FSDP", "sync_module_states: %s; build the model on the meta device on every rank, or real on " ..
         "the first rank (the others may use meta)", mismatch or "the ranks' models differ (see the other ranks' errors)")
  end
  for _, e in ipairs(entries) do
    if not e.meta_there then
      if e.param then
        plan.real[e.tensor] = true
      else
        local b = e.tensor
        if Tensor.is_meta(b) then
          b = Tensor.empty_raw(b:shape(), Tensor.dtype_id(b:dtype(), "FSDP"), pool)
          for _, slot in ipairs(e.slots) do slot.module:set_buffer(slot.name, b) end
          plan.buffers[#plan.buffers + 1] = {slots = e.slots, original = e.tensor, fresh = b}
        end
        for g = 1, mesh:ndim() do
          local group = mesh:get_group(g - 1)
          dist().broadcast(b, group:ranks()[1], {group = group})
        end
      end
    end
  end
  return plan
end

-- A failed wrap: the buffers prepare_sync gave storage go back to the meta device.
function M.undo_sync(plan)
  for _, b in ipairs(plan.buffers) do
    for _, slot in ipairs(b.slots) do slot.module:set_buffer(slot.name, b.original) end
    b.fresh:_release()
  end
  plan.buffers = {}
end

-- The unit's parameters real on the first rank get its values: the first rank's whole
-- tensor broadcast (into a temporary where this rank's is meta), this rank's rows kept.
function M.sync_params(unit, plan)
  local mesh = unit.mesh
  for _, p in ipairs(unit.params) do
    if plan.real[p.original] then
      local full = p.original
      local local_rows = p.sharded._local
      local whole = full
      if p.meta then
        whole = Tensor.empty_raw(p.shape, local_rows._c.dtype, local_rows._c.storage.pool)
      end
      for g = 1, mesh:ndim() do
        local group = mesh:get_group(g - 1)
        dist().broadcast(whole, group:ranks()[1], {group = group})
      end
      if p.local_rows > 0 then
        local rows = #p.shape > 0 and whole:narrow(0, p.local_start, p.local_rows) or whole
        check(lib.ms_copy(local_rows._c, rows._c), "FSDP: sync_module_states")
        local_rows:_bump_version()
      end
      if p.meta then
        whole:_release()
        p.synced = true -- param_init_fn leaves it alone
        rawset(p.sharded, "_init_draws", nil)
      end
    end
  end
end

-- Run fn(...) with the first rank's random state; afterwards this rank's own state
-- advanced by what fn drew (or the state fn set, when it seeded).
function M.with_rng(state, fn, ...)
  local own = random.get_rng_state()
  random.set_rng_state(state)
  local function restore()
    local after = random.get_rng_state()
    if after.seed == state.seed and after.offset >= state.offset then
      random.set_rng_state({seed = own.seed, offset = own.offset + (after.offset - state.offset)})
    end
  end
  return finally(restore, fn, ...)
end

return M
