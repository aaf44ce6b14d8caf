-- One FSDP unit: the parameters a wrapped module owns, sharded on dim 0 over the shard
-- group. Unshard = issue the all-gathers (start_unshard, which a prefetch may run early),
-- then make the parameters whole; reduce = reduce-scatter the gradients (plus an all-reduce
-- across replicas for hybrid strategies) into the local rows. A large parameter whose rows
-- split evenly over the ranks is "direct": its shards gather straight into the unsharded
-- tensor and its gradient reduce-scatters straight from where backward left it, since the
-- ranks' rows in rank order are the whole parameter. The other parameters share one flat
-- buffer per unit (one collective for all of them): copied in, gathered, copied out.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local placement = require "moonshard.placement"
local scope = require "moonshard.scope"
local raw = require "moonshard.ops.raw"
local stats = require "moonshard.fsdp.stats"
local prefetch = require "moonshard.fsdp.prefetch"
local autograd = require "moonshard.autograd"
local checkpointing = require "moonshard.ac.checkpoint"

local lib, check, fail = C.lib, C.check, C.fail
local empty, view_raw = Tensor.empty_raw, Tensor.view_raw

-- Elements from which a parameter goes direct: below it, a collective of its own (mostly
-- the wait for the slower rank, 100-200 us when ranks share cores) costs more than copying
-- it in and out of the unit's flat buffer (bench/README.md).
local DIRECT_NUMEL = 262144

local Unit = {}
Unit.__index = Unit

-- The unit wrapping each module. Weak both ways: a wrapped module's forward hooks hold its
-- unit, so the entry lives exactly as long as the module (a unit holds its module, and
-- LuaJIT's weak keys would never let go of a key its own value reaches).
local by_module = setmetatable({}, {__mode = "kv"})

-- The unit FSDP wrapped module into (nil when it is not wrapped).
function Unit.of(module) return by_module[module] end
function Unit.attach(module, unit) by_module[module] = unit end
function Unit.detach(module) by_module[module] = nil end

local function dist() return require "moonshard.dist" end

local STRATEGIES = {
  FULL_SHARD = {shard = true, reshard_after_forward = true},
  SHARD_GRAD_OP = {shard = true, reshard_after_forward = false},
  NO_SHARD = {shard = false, reshard_after_forward = false},
  HYBRID_SHARD = {shard = true, reshard_after_forward = true, hybrid = true},
  _HYBRID_SHARD_ZERO2 = {shard = true, reshard_after_forward = false, hybrid = true},
}
Unit.STRATEGIES = STRATEGIES

local function release_storage(t)
  check(lib.ms_storage_release(t._c.storage), "fsdp: reshard")
end

local function restore_storage(t)
  check(lib.ms_storage_restore(t._c.storage), "fsdp: unshard")
end

local function is_released(t) return t._c.storage.released ~= 0 end

-- Build a unit for module over the given owned parameters: {module, name, fqn, tensor,
-- aliases = {{module, name, fqn}, ...}} (aliases: the other slots of a tied parameter).
-- config: strategy name, mesh, offload (bool), pool (where shards of meta parameters go,
-- and every shard when device_id was given), mp (a resolved mixed-precision policy or nil:
-- the unsharded parameters are param_dtype, gradients reduce in reduce_dtype and land on
-- the shards in their own dtype). The originals stay until Unit:commit.
function Unit.new(module, owned, config)
  local strategy = STRATEGIES[config.strategy]
  local mesh = config.mesh
  local self = setmetatable({
    module = module, strategy_name = config.strategy, strategy = strategy, mesh = mesh,
    offload = config.offload, mp = config.mp, params = {}, per_rank_numel = 0, unsharded = false,
    reduced = false, hooks = {}, flat_params = 0, padded = false,
    exposed = false, contexts = {}, context_count = 0,
  }, Unit)
  if strategy.shard then
    local shard_dim = mesh:ndim() - 1
    self.shard_group, self.shard_size = mesh:get_group(shard_dim), mesh:size(shard_dim)
    self.shard_rank = mesh:get_local_rank(shard_dim)
    if strategy.hybrid then self.replicate_group = mesh:get_group(0) end
    self.placements = strategy.hybrid and {placement.Replicate(), placement.Shard(0)} or {placement.Shard(0)}
  else
    self.shard_size, self.shard_rank = 1, 0
    self.replicate_group = mesh:get_group(0)
    self.placements = {}
    for d = 1, mesh:ndim() do self.placements[d] = placement.Replicate() end
  end
  local offload_pool = config.offload and Tensor.pool_id("host", "FSDP") or nil
  local ok, err = pcall(function()
    local dtype
    for _, entry in ipairs(owned) do
      local full = entry.tensor
      dtype = dtype or full:dtype()
      if full:dtype() ~= dtype then
        fail("FSDP", "parameters of one unit must share a dtype ('%s' is %s, others %s)", entry.fqn,
             full:dtype(), dtype)
      end
      local pool = config.pool or (Tensor.is_meta(full) and 0 or full._c.storage.pool)
      self:add_param(entry, offload_pool or pool, pool)
    end
  end)
  if not ok then
    self:undo()
    error(err, 0)
  end
  return self
end

-- Shard one parameter: this rank's rows (as a DTensor leaf; uninitialised for a meta
-- parameter, which keeps its random counters for the initialiser) and the unsharded tensor
-- the module computes with (storage released until unshard).
function Unit:add_param(entry, shard_pool, compute_pool)
  local full = entry.tensor
  local meta = Tensor.is_meta(full)
  local dtype = Tensor.dtype_id(full:dtype(), "FSDP")
  local shape = full:shape()
  local rows = #shape > 0 and shape[1] or 1
  local row_numel = rows > 0 and full:numel() / rows or 0
  local start, length, chunk = placement.shard_range(rows, self.shard_size, self.shard_rank)
  local local_shape = {unpack(shape)}
  if #local_shape > 0 then local_shape[1] = length end
  local local_tensor = empty(local_shape, dtype, shard_pool)
  if length > 0 and not meta then
    local source = #shape > 0 and full:narrow(0, start, length) or full
    check(lib.ms_copy(local_tensor._c, source._c), "FSDP")
  end
  local_tensor.requires_grad = full.requires_grad
  local_tensor._is_param = true
  local sharded = DTensor.new(local_tensor, self.mesh, self.placements, shape)
  sharded._is_param, sharded.requires_grad = true, full.requires_grad
  if meta then sharded._init_draws = rawget(full, "_init_draws") end
  local compute_dtype = self.mp and self.mp.param_dtype and Tensor.dtype_id(self.mp.param_dtype, "FSDP") or dtype
  -- NO_SHARD without offload or a cast computes on the shards themselves
  self.aliased = not self.strategy.shard and not self.offload and compute_dtype == dtype
  local unsharded
  if self.aliased then
    unsharded = scope.keep(Tensor.alias_raw(local_tensor))
  else
    unsharded = scope.keep(empty(shape, compute_dtype, compute_pool))
    release_storage(unsharded)
  end
  unsharded.requires_grad = full.requires_grad
  local slots = {{module = entry.module, name = entry.name, fqn = entry.fqn}}
  for _, alias in ipairs(entry.aliases or {}) do slots[#slots + 1] = alias end
  local direct = self.strategy.shard and rows > 0 and rows == chunk * self.shard_size and full:numel() >= DIRECT_NUMEL
  local param = {
    module = entry.module, name = entry.name, fqn = entry.fqn, slots = slots, sharded = sharded,
    unsharded = unsharded, rows = rows, row_numel = row_numel, chunk = chunk, original = full, meta = meta,
    local_start = start, local_rows = length, flat_offset = not direct and self.per_rank_numel or nil,
    shape = shape, direct = direct, needs_grad = full.requires_grad and true or false, fired = 0, excluded = 0,
  }
  if not direct then
    self.per_rank_numel = self.per_rank_numel + chunk * row_numel
    self.flat_params = self.flat_params + 1
    -- rows that do not split evenly leave padding slots in the flat buffers, zeroed before use
    if rows ~= chunk * self.shard_size then self.padded = true end
  end
  self.params[#self.params + 1] = param
  -- zero_grad (an optimizer's or a module's) calls this for the parameter: gradients
  -- accumulated under no_sync and not reduced yet go with the reduced ones
  rawset(sharded, "_on_zero_grad", function() self:drop_unreduced_grad(param) end)
  if full.requires_grad then
    unsharded:register_post_accumulate_grad_hook(function() self:on_grad_ready(param) end)
  end
  for _, slot in ipairs(slots) do slot.module:set_parameter(slot.name, sharded) end
end

-- Wrapping succeeded: free the original full parameters.
function Unit:commit()
  for _, p in ipairs(self.params) do
    local full = p.original
    p.original = nil
    if not p.meta then
      full._released_param = true
      release_storage(full)
    end
  end
end

-- Wrapping failed: put the original parameters (and buffers) back and free what the unit made.
function Unit:undo()
  for _, p in ipairs(self.params) do
    for _, slot in ipairs(p.slots) do slot.module:set_parameter(slot.name, p.original) end
    p.sharded:release()
    if rawget(p.unsharded, "_c") then p.unsharded:_release() end
  end
  -- a buffer shared by several names is one tensor, freed by the record that made it
  for _, b in ipairs(self.materialised_buffers or {}) do b.module:set_buffer(b.name, b.original) end
  for _, b in ipairs(self.materialised_buffers or {}) do
    if b.made then b.fresh:_release() end
  end
  for _, handle in ipairs(self.hooks) do handle.remove() end
  self.params = {}
end

-- The [ranks, chunk, row] view of param's slots in a flat buffer of ranks * per_rank_numel.
local function rank_slots(flat, param, ranks, per_rank_numel)
  return view_raw(flat, {ranks, param.chunk, param.row_numel}, {per_rank_numel, param.row_numel, 1},
                  param.flat_offset, "fsdp")
end

-- Copy between a full [rows, ...] tensor and its rank slots (to_slots: full -> slots).
local function move_rows(full, flat, param, size, per_rank_numel, to_slots)
  if param.rows == 0 or param.row_numel == 0 then return end
  local whole_ranks = math.floor(param.rows / param.chunk)
  local full_offset = tonumber(full._c.offset)
  if whole_ranks > 0 then
    local slots = rank_slots(flat, param, whole_ranks, per_rank_numel)
    local rows = view_raw(full, {whole_ranks, param.chunk, param.row_numel}, nil, full_offset, "fsdp")
    if to_slots then check(lib.ms_copy(slots._c, rows._c), "fsdp") else check(lib.ms_copy(rows._c, slots._c), "fsdp") end
    slots:_release()
    rows:_release()
  end
  local remainder = param.rows - whole_ranks * param.chunk
  if remainder > 0 and whole_ranks < size then
    local slot = view_raw(flat, {remainder, param.row_numel}, nil,
                          whole_ranks * per_rank_numel + param.flat_offset, "fsdp")
    local rows = view_raw(full, {remainder, param.row_numel}, nil,
                          full_offset + whole_ranks * param.chunk * param.row_numel, "fsdp")
    if to_slots then check(lib.ms_copy(slot._c, rows._c), "fsdp") else check(lib.ms_copy(rows._c, slot._c), "fsdp") end
    slot:_release()
    rows:_release()
  end
end

-- Issue the unit's all-gathers: direct parameters land in their unsharded tensors, the
-- others in a flat buffer (self.gathering = {flat = buffer or nil}); the parameters become
-- whole in unshard. Strategies without one make the parameters whole right away.
function Unit:start_unshard()
  if self.unsharded or self.gathering then return end
  if not self.strategy.shard or #self.params == 0 then return self:unshard() end
  local first = self.params[1].unsharded
  local outputs = {}
  for i, p in ipairs(self.params) do
    if p.direct then
      if is_released(p.unsharded) then restore_storage(p.unsharded) end
      outputs[i] = p.unsharded
    end
  end
  self.gathering = {flat = self:all_gather(first._c.dtype, first._c.storage.pool, outputs)}
end

-- This rank's rows of a direct parameter as its all-gather input: the shard itself, or a
-- copy in dtype and pool (second result true: the caller frees it).
local function gather_input(p, dtype, pool)
  local rows = p.sharded._local
  if rows._c.dtype == dtype and rows._c.storage.pool == pool then return rows, false end
  local cast = empty(rows:shape(), dtype, pool)
  check(lib.ms_copy(cast._c, rows._c), "fsdp: unshard")
  return cast, true
end

-- Every rank's shards cast to dtype and gathered (counted in fsdp.stats: the bytes of
-- dtype): direct parameter i into outputs[i] (its whole tensor, of dtype), the others into
-- one flat buffer in pool, returned (nil when there are none).
function Unit:all_gather(dtype, pool, outputs)
  local size, per_rank = self.shard_size, self.per_rank_numel
  for i, p in ipairs(self.params) do
    if p.direct then
      local input, fresh = gather_input(p, dtype, pool)
      -- the parameter gets back the values it had, which is no modification: its version
      -- stays, so what autograd saved of it in forward is still valid in backward
      local storage = outputs[i]._c.storage
      local version = storage.version
      stats.timed("all_gathers", tonumber(lib.ms_tensor_nbytes(outputs[i]._c)), dist().all_gather_into_tensor,
                  outputs[i], input, {group = self.shard_group})
      storage.version = version
      if fresh then input:_release() end
    end
  end
  if per_rank == 0 then return nil end
  local send = empty({per_rank}, dtype, pool)
  if self.padded then check(lib.ms_fill(send._c, 0), "fsdp: unshard") end
  for _, p in ipairs(self.params) do
    if not p.direct and p.local_rows > 0 and p.row_numel > 0 then
      local slot = view_raw(send, {p.local_rows, p.row_numel}, nil, p.flat_offset, "fsdp")
      check(lib.ms_copy(slot._c, p.sharded._local._c), "fsdp: unshard")
      slot:_release()
    end
  end
  local gathered = scope.keep(empty({size * per_rank}, dtype, pool)) -- may outlive this forward
  stats.timed("all_gathers", tonumber(lib.ms_tensor_nbytes(gathered._c)), dist().all_gather_into_tensor,
              gathered, send, {group = self.shard_group})
  send:_release()
  return gathered
end

-- Make every parameter of the unit whole: copy out of the flat all-gather buffer (issuing
-- the all-gathers first unless a prefetch did).
function Unit:unshard()
  if self.unsharded then return end
  if self.strategy.shard and #self.params > 0 and not self.gathering then self:start_unshard() end
  self.unsharded = true
  if #self.params == 0 or self.aliased then return end
  for _, p in ipairs(self.params) do
    if is_released(p.unsharded) then restore_storage(p.unsharded) end
  end
  if not self.strategy.shard then
    for _, p in ipairs(self.params) do
      check(lib.ms_copy(p.unsharded._c, p.sharded._local._c), "fsdp: unshard")
    end
    return
  end
  local flat = self.gathering.flat
  self.gathering = nil
  if not flat then return end
  for _, p in ipairs(self.params) do
    if not p.direct then move_rows(p.unsharded, flat, p, self.shard_size, self.per_rank_numel, false) end
  end
  flat:_release()
end

-- ---- when a unit's gradients are all in ----
-- Each backward pass (engine run) reaching a parameter accumulates into its gradient once
-- and fires its post-accumulate hook. A plain backward is one pass; a reentrant
-- checkpointed region adds a nested pass of its own, run when backward reaches the region.
-- So a unit notes the contexts its parameters were exposed in (the graph outside reentrant
-- regions, BASE, and each reentrant region: ac.checkpoint's graph contexts) and is complete
-- once each parameter has fired once per context, less the regions whose recomputed graph
-- does not reach it. A unit never seen in a context (a backward through a graph made some
-- other way) expects one pass.
local BASE = setmetatable({}, {__tostring = function() return "fsdp: the graph outside reentrant regions" end})

-- Units whose parameter slots hold their unsharded parameters, each with the count at
-- which it was exposed (weak: a unit dropped while exposed goes).
local exposed_units = setmetatable({}, {__mode = "k"})
local exposures = 0
-- The units that noted each reentrant region (weak: the entry goes with the region).
local units_of_context = setmetatable({}, {__mode = "k"})

local function current_context()
  local context = checkpointing.graph_context()
  if context ~= nil then return context or nil end
  if autograd.is_grad_enabled() and not autograd.in_backward() then return BASE end
  return nil
end

function Unit:note_context(context)
  if not context or self.contexts[context] then return end
  self.contexts[context] = true
  self.context_count = self.context_count + 1
  if context ~= BASE then
    local units = units_of_context[context]
    if not units then
      units = {}
      units_of_context[context] = units
    end
    units[#units + 1] = self
  end
end

-- Every parameter that takes a gradient fired as often as the contexts it was used in.
function Unit:grads_complete()
  local count = self.context_count
  for _, p in ipairs(self.params) do
    if p.needs_grad and p.fired < (count == 0 and 1 or count - p.excluded) then return false end
  end
  return true
end

local function set_exposed(unit, exposed)
  if unit.exposed == exposed then return end
  unit.exposed = exposed
  if exposed then
    exposures = exposures + 1
    exposed_units[unit] = exposures
  else
    exposed_units[unit] = nil
  end
end

local function by_exposure(a, b) return exposed_units[a] < exposed_units[b] end

checkpointing.observe({
  -- a reentrant region starts its forward pass or its recomputation: the units exposed
  -- now (those around it) may be read by it
  enter = function(frame)
    local units = {}
    for unit in pairs(exposed_units) do units[#units + 1] = unit end
    table.sort(units, by_exposure)
    for _, unit in ipairs(units) do unit:note_context(frame) end
  end,
  -- the region's recomputed graph reaches only these leaves: its nested backward fires no
  -- other parameter
  reached = function(frame, leaves_fn)
    local units = units_of_context[frame]
    if not units then return end
    local leaves = leaves_fn()
    for _, unit in ipairs(units) do
      if unit.contexts[frame] and unit.contexts[frame] ~= "reached" then
        unit.contexts[frame] = "reached"
        for _, p in ipairs(unit.params) do
          if p.needs_grad and not leaves[p.unsharded] then p.excluded = p.excluded + 1 end
        end
      end
    end
  end,
  -- the region's nested backward is over: units it did not reach may be complete now
  done = function(frame)
    local units = units_of_context[frame]
    if not units then return end
    for _, unit in ipairs(units) do
      if unit.contexts[frame] and not unit.reduced and unit:grads_complete() then unit:grads_done() end
    end
  end,
})

-- Point the module's parameter slots at the unsharded tensors (forward), at values[i] for
-- param i (summon_full_params) or back at the sharded DTensors (between iterations).
function Unit:expose(unsharded, values)
  for i, p in ipairs(self.params) do
    local value = values and values[i] or unsharded and p.unsharded or p.sharded
    for _, slot in ipairs(p.slots) do slot.module:set_parameter(slot.name, value) end
  end
  local exposed = unsharded and not values and true or false
  set_exposed(self, exposed)
  if exposed then self:note_context(current_context()) end
end

-- The parameters whole in their own dtype, one tensor per param: the unsharded ones, or
-- under a mixed-precision cast a separate full-precision gather (fresh: the caller frees
-- them). Returns the tensors and whether they are fresh.
function Unit:full_params()
  local params = self.params
  if #params == 0 or params[1].unsharded._c.dtype == params[1].sharded._local._c.dtype then
    self:unshard()
    local out = {}
    for i, p in ipairs(params) do out[i] = p.unsharded end
    return out, false
  end
  local dtype, pool = params[1].sharded._local._c.dtype, params[1].unsharded._c.storage.pool
  local out = {}
  for i, p in ipairs(params) do out[i] = scope.keep(empty(p.shape, dtype, pool)) end
  if self.strategy.shard then
    local flat = self:all_gather(dtype, pool, out)
    if flat then
      for i, p in ipairs(params) do
        if not p.direct then move_rows(out[i], flat, p, self.shard_size, self.per_rank_numel, false) end
      end
      flat:_release()
    end
  else
    for i, p in ipairs(params) do check(lib.ms_copy(out[i]._c, p.sharded._local._c), "summon_full_params") end
  end
  return out, true
end

-- Free the unsharded parameters (their autograd views stay valid handles).
function Unit:reshard()
  if self.gathering then -- prefetched but not used
    if self.gathering.flat then self.gathering.flat:_release() end
    self.gathering = nil
    for _, p in ipairs(self.params) do
      if p.direct and not is_released(p.unsharded) then release_storage(p.unsharded) end
    end
  end
  if not self.unsharded then return end
  self.unsharded = false
  self:expose(false)
  if self.aliased then return end -- the shards are whole
  for _, p in ipairs(self.params) do
    if not is_released(p.unsharded) then release_storage(p.unsharded) end
  end
end

-- A parameter's gradient was accumulated: once the unit is complete, reduce and free it.
-- A gradient arriving after that (a pass no context foresaw) is reduced on its own.
function Unit:on_grad_ready(p)
  p.fired = p.fired + 1
  if self:grads_complete() then self:grads_done() end
end

-- Every gradient of the unit is in: reduce them and free the parameters. BACKWARD_POST
-- frees first and gathers the next unit, whose all-gather then runs beside the reduction.
function Unit:grads_done()
  local post = self.tree.backward_prefetch == "BACKWARD_POST"
  if self.no_sync then
    if post then prefetch.on_backward(self, "BACKWARD_POST") end
    return
  end
  if post then
    self:reshard()
    prefetch.on_backward(self, "BACKWARD_POST")
    self:reduce_grads()
  else
    self:reduce_grads()
    self:reshard()
  end
end

-- Accumulate local gradient rows (a view into a reduction buffer, handed over to this
-- function) into the sharded parameter's grad (a DTensor). The first gradient adopts the
-- view itself when it has the parameter's pool and dtype, so no copy is made.
local function accumulate_local_grad(p, source)
  local sharded = p.sharded
  local grad = rawget(sharded, "grad")
  local local_param = sharded._local
  if grad == nil then
    local g = source
    if source._c.storage.pool ~= local_param._c.storage.pool or source._c.dtype ~= local_param._c.dtype then
      g = empty(local_param:shape(), local_param._c.dtype, local_param._c.storage.pool)
      check(lib.ms_copy(g._c, source._c), "fsdp: gradient")
      source:_release()
    end
    sharded.grad = DTensor.new(scope.keep(g), sharded.device_mesh, sharded.placements, sharded:shape())
  else
    local g = grad._local
    if g._c.storage.pool == source._c.storage.pool and g._c.dtype == source._c.dtype then
      check(lib.ms_binary(g._c, g._c, source._c, raw.ADD), "fsdp: gradient")
    else
      local moved = empty(g:shape(), g._c.dtype, g._c.storage.pool)
      check(lib.ms_copy(moved._c, source._c), "fsdp: gradient")
      check(lib.ms_binary(g._c, g._c, moved._c, raw.ADD), "fsdp: gradient")
      moved:_release()
    end
    g:_bump_version()
    source:_release()
  end
end

-- The dtype gradients are reduced in: the policy's reduce_dtype, else the gradients' own.
function Unit:reduce_dtype(grad)
  local name = self.mp and self.mp.reduce_dtype
  return name and Tensor.dtype_id(name, "FSDP") or grad._c.dtype
end

-- Average the shard group's (and for hybrid strategies the replicas') copies of rows, in
-- place.
function Unit:average_replicas(rows)
  if self.replicate_group then
    stats.timed("all_reduces", tonumber(lib.ms_tensor_nbytes(rows._c)), dist().all_reduce, rows, "avg",
                {group = self.replicate_group})
  end
end

-- One direct parameter's gradient reduce-scattered in dtype straight into new local rows.
function Unit:reduce_direct(p, dtype)
  local g = p.unsharded.grad
  local input = g
  if g._c.dtype ~= dtype or not g:is_contiguous() then
    input = empty(g:shape(), dtype, g._c.storage.pool)
    check(lib.ms_copy(input._c, g._c), "fsdp: reduce")
  end
  local rows = empty(p.sharded._local:shape(), dtype, g._c.storage.pool)
  stats.timed("reduce_scatters", tonumber(lib.ms_tensor_nbytes(input._c)), dist().reduce_scatter_tensor,
              rows, input, "avg", {group = self.shard_group})
  if input ~= g then input:_release() end
  self:average_replicas(rows)
  accumulate_local_grad(p, rows)
end

-- The gradients of params (none direct) through one flat buffer: copied in, one
-- reduce-scatter in dtype, each local block handed to its parameter.
function Unit:reduce_flat(params, dtype)
  local size, per_rank = self.shard_size, self.per_rank_numel
  local pool = params[1].unsharded.grad._c.storage.pool
  local flat = empty({size * per_rank}, dtype, pool)
  if self.padded or #params < self.flat_params then check(lib.ms_fill(flat._c, 0), "fsdp: reduce") end
  for _, p in ipairs(params) do move_rows(p.unsharded.grad, flat, p, size, per_rank, true) end
  local shard = empty({per_rank}, dtype, pool)
  stats.timed("reduce_scatters", tonumber(lib.ms_tensor_nbytes(flat._c)), dist().reduce_scatter_tensor,
              shard, flat, "avg", {group = self.shard_group})
  flat:_release()
  self:average_replicas(shard)
  for _, p in ipairs(params) do
    local rows = view_raw(shard, p.sharded._local:shape(), nil, p.flat_offset, "fsdp")
    accumulate_local_grad(p, rows)
  end
  shard:_release()
end

-- NO_SHARD: a gradient of 256Ki elements or more all-reduced where backward left it (when it
-- is dense and already in the reduce dtype), the others through one flat buffer and one
-- all-reduce; then each is handed to its parameter.
function Unit:all_reduce_grads(params)
  local dtype = self:reduce_dtype(params[1].unsharded.grad)
  local flat_params, total = {}, 0
  for _, p in ipairs(params) do
    local g = p.unsharded.grad
    if g:numel() >= DIRECT_NUMEL and g._c.dtype == dtype and g:is_contiguous() then
      stats.timed("all_reduces", tonumber(lib.ms_tensor_nbytes(g._c)), dist().all_reduce, g, "avg",
                  {group = self.replicate_group})
      p.reduced_grad = g
    else
      flat_params[#flat_params + 1], total = p, total + g:numel()
    end
  end
  if #flat_params > 0 then
    local flat = empty({total}, dtype, flat_params[1].unsharded.grad._c.storage.pool)
    local offset = 0
    for _, p in ipairs(flat_params) do
      local g = p.unsharded.grad
      local slot = view_raw(flat, g:shape(), nil, offset, "fsdp")
      check(lib.ms_copy(slot._c, g._c), "fsdp: reduce")
      p.reduced_grad, offset = slot, offset + g:numel()
    end
    stats.timed("all_reduces", tonumber(lib.ms_tensor_nbytes(flat._c)), dist().all_reduce, flat, "avg",
                {group = self.replicate_group})
    flat:_release()
  end
  for _, p in ipairs(params) do
    local g = p.reduced_grad
    p.reduced_grad = nil
    if g == p.unsharded.grad then g = Tensor.alias_raw(g) end -- the unit frees the gradient itself
    accumulate_local_grad(p, g)
  end
end

-- Reduce the unsharded gradients of this backward into the local shards' grads.
function Unit:reduce_grads()
  self.reduced = true
  local with_grad = {}
  for _, p in ipairs(self.params) do
    if rawget(p.unsharded, "grad") then with_grad[#with_grad + 1] = p end
  end
  if #with_grad == 0 then return end
  if not self.strategy.shard then
    self:all_reduce_grads(with_grad)
  else
    local dtype = self:reduce_dtype(with_grad[1].unsharded.grad)
    local flat_grads = {}
    for _, p in ipairs(with_grad) do
      if p.direct then self:reduce_direct(p, dtype) else flat_grads[#flat_grads + 1] = p end
    end
    if #flat_grads > 0 then self:reduce_flat(flat_grads, dtype) end
  end
  for _, p in ipairs(with_grad) do
    local g = p.unsharded.grad
    p.unsharded.grad = nil
    g:_release()
  end
end

-- Free the parameter's unsharded gradient (what no_sync accumulated) without reducing it.
function Unit:drop_unreduced_grad(p)
  local g = rawget(p.unsharded, "grad")
  if g then
    p.unsharded.grad = nil
    g:_release()
  end
end

-- Start of an iteration's forward (outside backward).
function Unit:reset_iteration()
  self.reduced = false
  self.contexts, self.context_count = {}, 0
  for _, p in ipairs(self.params) do p.fired, p.excluded = 0, 0 end
end

return Unit
