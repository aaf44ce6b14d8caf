-- FSDP state dicts: SHARDED_STATE_DICT (DTensors sharing the shards' storage),
-- FULL_STATE_DICT (gathered tensors; rank0_only optional) and LOCAL_STATE_DICT (local
-- shards), for the model and for the optimizer, with the unwrapped model's keys.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local autograd = require "moonshard.autograd"
local placement = require "moonshard.placement"
local Tree = require "moonshard.fsdp.tree"
local Unit = require "moonshard.fsdp.unit"
local pack = require "moonshard.pack"
local state_keys = require "moonshard.state_keys"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local TYPES = {SHARDED_STATE_DICT = true, FULL_STATE_DICT = true, LOCAL_STATE_DICT = true}

local function dist() return require "moonshard.dist" end

local function settings_of(module)
  local unit = Unit.of(module)
  return unit and unit.tree and unit.tree.state_dict_settings or {type = "SHARDED_STATE_DICT"}
end

-- The settings a state-dict config table may hold, per type (as PyTorch's configs).
local CONFIG_KEYS = {
  FULL_STATE_DICT = {rank0_only = true, offload_to_cpu = true},
  SHARDED_STATE_DICT = {offload_to_cpu = true},
  LOCAL_STATE_DICT = {offload_to_cpu = true},
}

local function check_config(kind, config, what)
  if config == nil then return {} end
  if type(config) ~= "table" then fail("set_state_dict_type", "%s must be a table, got %s", what, type(config)) end
  for key, value in pairs(config) do
    if not CONFIG_KEYS[kind][key] then
      local names = {}
      for name in pairs(CONFIG_KEYS[kind]) do names[#names + 1] = name end
      table.sort(names)
      fail("set_state_dict_type", "unknown %s option '%s' for %s (expected %s)", what, tostring(key), kind,
           table.concat(names, " or "))
    end
    if type(value) ~= "boolean" then
      fail("set_state_dict_type", "%s.%s must be true or false, got %s", what, key, tostring(value))
    end
  end
  return config
end

-- fsdp.set_state_dict_type(model, "FULL_STATE_DICT", {rank0_only = true, offload_to_cpu = true}
--                          [, optim_state_dict_config])
function M.set_state_dict_type(model, kind, config, optim_config)
  if not TYPES[kind] then
    fail("set_state_dict_type", "unknown state dict type '%s' (expected SHARDED_STATE_DICT, " ..
         "FULL_STATE_DICT or LOCAL_STATE_DICT)", tostring(kind))
  end
  local tree = Tree.rooted_at(Unit.of(model))
  if not tree then fail("set_state_dict_type", "expects the root FSDP module") end
  config = check_config(kind, config, "state_dict_config")
  optim_config = check_config(kind, optim_config, "optim_state_dict_config")
  local settings = {type = kind, rank0_only = config.rank0_only or false, offload_to_cpu = config.offload_to_cpu or false,
                    optim = {type = kind, rank0_only = optim_config.rank0_only or false,
                             offload_to_cpu = optim_config.offload_to_cpu or false}}
  tree.state_dict_settings = settings
end

-- Every parameter and persistent buffer in registration order: {fqn, value, is_buffer}; a
-- tied parameter and a buffer shared by several modules appear under each of their names
-- (the same value), as in the unwrapped model's state dict.
local function entries(model)
  return model:state_dict_entries()
end

-- The tensors of entries in the order of their first names: {value = t, names = {fqn, ...}}
-- (a tied parameter or a shared buffer is one tensor with several names).
local function tensors_of(list)
  local out, by_value = {}, {}
  for _, entry in ipairs(list) do
    local group = by_value[entry[2]]
    if not group then
      group = {value = entry[2], names = {}}
      by_value[entry[2]] = group
      out[#out + 1] = group
    end
    group.names[#group.names + 1] = entry[1]
  end
  return out
end

-- True on the rank at the mesh's coordinate (0, ...), "rank 0" of rank0_only.
local function at_origin(mesh)
  for _, c in ipairs(mesh:get_coordinate()) do if c ~= 0 then return false end end
  return true
end

-- Rank 0 of the value's mesh; plain values count as held by all.
local function is_rank0(value)
  local mesh = value.device_mesh
  return mesh == nil or at_origin(mesh)
end

local function host_copy(t)
  local copy = Tensor.empty_raw(t:shape(), t._c.dtype, Tensor.pool_id("host", "state_dict"))
  check(lib.ms_copy(copy._c, t._c), "state_dict")
  return copy
end

-- The full value of a sharded DTensor, gathered through one padded buffer (the only
-- full-size compute tensor alive); kept only where settings ask (rank0_only), in the host
-- pool with offload_to_cpu. Returns nil on ranks that keep nothing.
local function gather_full(value, settings)
  local mesh_dim = value._shard_dim
  local keep = not settings.rank0_only or is_rank0(value)
  if not mesh_dim then
    if not keep then return nil end
    return settings.offload_to_cpu and host_copy(value._local) or value._local:clone()
  end
  local mesh = value.device_mesh
  local size, shape = mesh:size(mesh_dim), value:shape()
  local rows = shape[1]
  local chunk = math.ceil(rows / size)
  local local_tensor = value._local
  local padded = {chunk}
  for d = 2, #shape do padded[d] = shape[d] end
  local dtype, pool = local_tensor._c.dtype, local_tensor._c.storage.pool
  local send = Tensor.empty_raw(padded, dtype, pool)
  check(lib.ms_fill(send._c, 0), "state_dict")
  if local_tensor:numel() > 0 then
    local head = Tensor.view_raw(send, local_tensor:shape(), nil, 0, "state_dict")
    check(lib.ms_copy(head._c, local_tensor._c), "state_dict")
    head:_release()
  end
  padded[1] = chunk * size
  local gathered = Tensor.empty_raw(padded, dtype, pool)
  dist().all_gather_into_tensor(gathered, send, {group = mesh:get_group(mesh_dim)})
  send:_release()
  if not keep then
    gathered:_release()
    return nil
  end
  local out
  if settings.offload_to_cpu or chunk * size ~= rows then
    out = Tensor.empty_raw(shape, dtype, settings.offload_to_cpu and Tensor.pool_id("host", "state_dict") or pool)
    if rows > 0 then
      local head = Tensor.view_raw(gathered, shape, nil, 0, "state_dict")
      check(lib.ms_copy(out._c, head._c), "state_dict")
      head:_release()
    end
    gathered:_release()
  else
    out = gathered
  end
  return out
end
M.gather_full = gather_full

local function export(value, settings)
  local exported
  if not DTensor.is_dtensor(value) then
    exported = value:detach()
  elseif settings.type == "SHARDED_STATE_DICT" then
    exported = value:detach()
    if settings.offload_to_cpu then
      exported = DTensor.new(host_copy(value._local), value.device_mesh, value.placements, value:shape())
    end
  elseif settings.type == "LOCAL_STATE_DICT" then
    exported = settings.offload_to_cpu and host_copy(value._local) or value:to_local():detach()
  else
    return gather_full(value, settings)
  end
  return exported
end

-- Buffers that mixed precision cast to buffer_dtype -> their original dtype names.
local function cast_buffer_dtypes(model)
  local unit = Unit.of(model)
  local out = {}
  for _, u in ipairs(unit and unit.tree and unit.tree.units or {}) do
    for _, r in ipairs(u.cast_buffers or {}) do out[r.module[r.name]] = r.dtype end
  end
  return out
end

-- A full state dict holds a cast buffer in its original dtype (a copy, as PyTorch's).
local function export_full_buffer(value, dtype, settings)
  local pool = settings.offload_to_cpu and Tensor.pool_id("host", "state_dict") or value._c.storage.pool
  local copy = Tensor.empty_raw(value:shape(), Tensor.dtype_id(dtype, "state_dict"), pool)
  check(lib.ms_copy(copy._c, value._c), "state_dict")
  return copy
end

-- The root's state-dict post hook: the values laid out as the tree's settings ask.
local function model_state_dict(model, _, prefix)
  local settings = settings_of(model)
  local out, done = {}, {}
  local cast = settings.type == "FULL_STATE_DICT" and cast_buffer_dtypes(model) or {}
  for _, entry in ipairs(entries(model)) do
    local fqn, value = entry[1], entry[2]
    if done[value] == nil and cast[value] then done[value] = export_full_buffer(value, cast[value], settings) end
    if done[value] == nil then done[value] = export(value, settings) or false end
    if done[value] then out[prefix .. fqn] = done[value] end
  end
  return out
end

local function shape_mismatch(fqn, got, want)
  fail("load_state_dict", "size mismatch for '%s': checkpoint has shape %s, model has %s", fqn,
       tostring(got), tostring(want))
end

-- This rank's rows of a full tensor laid out like the DTensor target (nil when it has none).
local function local_rows_of(full, target)
  local mesh_dim = target._shard_dim
  if not mesh_dim then return full end
  local start, length = placement.shard_range(target:size(0), target.device_mesh:size(mesh_dim),
                                              target.device_mesh:get_local_rank(mesh_dim))
  return length > 0 and full:narrow(0, start, length) or nil
end

-- What source (a DTensor, a full tensor, or for LOCAL_STATE_DICT a local tensor) gives the
-- target: a plain tensor of the target's shape, or for a sharded parameter its local rows
-- (an empty tensor where this rank holds none).
local function local_value(fqn, target, source, settings)
  if not (Tensor.is_tensor(source) or DTensor.is_dtensor(source)) then
    fail("load_state_dict", "value for '%s' is a %s, not a tensor", fqn, type(source))
  end
  if not DTensor.is_dtensor(target) then
    local value = DTensor.is_dtensor(source) and source:full_tensor() or source
    if not (value:shape() == target:shape()) then shape_mismatch(fqn, value:shape(), target:shape()) end
    return value
  end
  local local_target = target:to_local()
  local value
  if DTensor.is_dtensor(source) then
    if not (source:shape() == target:shape()) then shape_mismatch(fqn, source:shape(), target:shape()) end
    local same_layout = source._shard_dim == target._shard_dim and source:to_local():shape() == local_target:shape()
    value = same_layout and source:to_local() or local_rows_of(source:full_tensor(), target)
  elseif settings.type == "LOCAL_STATE_DICT" then
    if not (source:shape() == local_target:shape()) then
      fail("load_state_dict", "size mismatch for '%s': got shape %s, the local shard is %s", fqn,
           tostring(source:shape()), tostring(local_target:shape()))
    end
    value = source
  else
    if not (source:shape() == target:shape()) then shape_mismatch(fqn, source:shape(), target:shape()) end
    value = local_rows_of(source, target)
  end
  if value and value:dtype() ~= local_target:dtype() then
    fail("load_state_dict", "dtype mismatch for '%s': checkpoint has %s, model has %s", fqn, value:dtype(),
         local_target:dtype())
  end
  return value or Tensor.empty_raw(local_target:shape(), local_target._c.dtype, local_target._c.storage.pool)
end

-- Copy source into target (a plain tensor or a DTensor's local shard).
local function import(fqn, target, source, settings)
  local value = local_value(fqn, target, source, settings)
  local dst = DTensor.is_dtensor(target) and target:to_local() or target
  check(lib.ms_copy(dst._c, value._c), "load_state_dict")
  dst:_bump_version()
end

-- ---- rank0_only loading: the mesh's rank 0 holds the values, every rank receives them ----

-- The mesh of the FSDP tree rooted at model: its coordinate (0, ...) is rank 0 for
-- rank0_only, and its groups carry the broadcasts (a model on a process group stays in it).
local function tree_mesh(model)
  return Unit.of(model).mesh
end

-- t on every rank of mesh = t at the mesh's coordinate (0, ...): one broadcast along each
-- mesh dim from that dim's first rank, dim 0 first (after dim d every rank whose later
-- coordinates are 0 holds the value, so the last dim reaches every rank).
local function broadcast_from_origin(t, mesh)
  if t:numel() == 0 then return end
  for d = 0, mesh:ndim() - 1 do
    local group = mesh:get_group(d)
    if group:size() > 1 then dist().broadcast(t, group:ranks()[1], {group = group}) end
  end
end

-- make() run on rank 0 of mesh, its result (nil, numbers, strings, booleans and tables)
-- sent to every rank of mesh. An error raised by make (rank 0's state dict is wrong) is
-- raised on every rank, so no rank is left waiting in a later collective.
local function plan_from_origin(mesh, make)
  local holder = at_origin(mesh)
  local plan, bytes
  if holder then
    local ok, result = pcall(make)
    if ok then
      plan = result
      ok, bytes = pcall(pack.encode, plan, "the state dict plan")
      if not ok then result = bytes end
    end
    if not ok then
      plan = {error = tostring(result)}
      bytes = pack.encode(plan)
    end
  end
  local length = Tensor.empty_raw({1}, lib.MS_F64, lib.MS_POOL_CPU)
  local n_ptr = ffi.cast("double*", length:data_ptr())
  n_ptr[0] = holder and #bytes or 0
  broadcast_from_origin(length, mesh)
  local n = n_ptr[0]
  length:_release()
  local message = Tensor.empty_raw({n}, lib.MS_U8, lib.MS_POOL_CPU)
  if holder then ffi.copy(message:data_ptr(), bytes, n) end
  broadcast_from_origin(message, mesh)
  if not holder then plan = pack.decode(ffi.cast("const char*", message:data_ptr()), n) end
  message:_release()
  if plan.error then error(plan.error, 0) end
  return plan
end

-- Raises unless rank 0's source can be broadcast as the full value of target (a DTensor
-- or a plain tensor; shapes as in the model, a sharded target's dtype).
local function check_rank0_source(fqn, target, source)
  if DTensor.is_dtensor(source) then
    fail("load_state_dict", "value for '%s' is a DTensor; with rank0_only rank 0 loads full tensors", fqn)
  end
  if not Tensor.is_tensor(source) then
    fail("load_state_dict", "value for '%s' is a %s, not a tensor", fqn, type(source))
  end
  if Tensor.is_meta(source) then
    fail("load_state_dict", "'%s' is a meta tensor (%s %s, no data)", fqn, tostring(source:shape()), source:dtype())
  end
  if not (source:shape() == target:shape()) then shape_mismatch(fqn, source:shape(), target:shape()) end
  if DTensor.is_dtensor(target) and source:dtype() ~= target:dtype() then
    fail("load_state_dict", "dtype mismatch for '%s': checkpoint has %s, model has %s", fqn, source:dtype(),
         target:dtype())
  end
end

-- What target (a DTensor or a plain tensor) takes from rank 0's source (nil on the other
-- ranks): the full value in target's dtype, broadcast over mesh, then for a sharded target
-- a copy of this rank's rows (the full tensor is freed: one parameter at full size at a time).
local function receive_from_origin(target, source, mesh)
  local like = DTensor.is_dtensor(target) and target:to_local() or target
  local shape = target:shape()
  local full = Tensor.empty_raw(shape, like._c.dtype, like._c.storage.pool)
  if source ~= nil and full:numel() > 0 then check(lib.ms_copy(full._c, source._c), "load_state_dict") end
  broadcast_from_origin(full, mesh)
  local mesh_dim = DTensor.is_dtensor(target) and target._shard_dim
  if not mesh_dim then return full end
  local local_shape = like:shape()
  local rows = Tensor.empty_raw(local_shape, like._c.dtype, like._c.storage.pool)
  if rows:numel() > 0 then
    local offset = 0 -- a 0-d parameter is one row
    if #shape > 0 then
      local start = placement.shard_range(shape[1], target.device_mesh:size(mesh_dim),
                                          target.device_mesh:get_local_rank(mesh_dim))
      offset = start * (full:numel() / shape[1])
    end
    local view = Tensor.view_raw(full, local_shape, nil, offset, "load_state_dict")
    check(lib.ms_copy(rows._c, view._c), "load_state_dict")
    view:_release()
  end
  full:_release()
  return rows
end

-- A FULL_STATE_DICT load with rank0_only: rank 0 of the tree's mesh checks its state dict
-- and tells every rank which entries it holds and which keys the model lacks; under strict
-- a missing or unexpected key raises on every rank before any value moves; then each tensor
-- rank 0 holds a value for is broadcast once, in registration order. The other ranks' state
-- dicts are not read.
local function load_from_rank0(model, sd, strict)
  local mesh, list = tree_mesh(model), entries(model)
  local holder = at_origin(mesh)
  local plan = plan_from_origin(mesh, function()
    local known, present, unexpected = {}, {}, {}
    for i, entry in ipairs(list) do
      local fqn, target = entry[1], entry[2]
      known[fqn] = true
      present[i] = sd[fqn] ~= nil
      if present[i] then check_rank0_source(fqn, target, sd[fqn]) end
    end
    for key in pairs(sd) do if not known[key] then unexpected[#unexpected + 1] = tostring(key) end end
    table.sort(unexpected)
    return {present = present, unexpected = unexpected}
  end)
  local missing, held = {}, {}
  for i, entry in ipairs(list) do
    if plan.present[i] then held[entry[1]] = true else missing[#missing + 1] = entry[1] end
  end
  if strict and (#missing > 0 or #plan.unexpected > 0) then
    fail("load_state_dict", "%s", state_keys.describe(missing, plan.unexpected))
  end
  local prepared = {}
  autograd.no_grad(function()
    -- one broadcast per tensor, of the value under its last name rank 0 holds (as PyTorch
    -- loads a tensor with several names: each name in turn, the last one wins)
    for _, group in ipairs(tensors_of(list)) do
      local source
      for _, fqn in ipairs(group.names) do if held[fqn] then source = fqn end end
      if source then
        local value = receive_from_origin(group.value, holder and sd[source] or nil, mesh)
        for _, fqn in ipairs(group.names) do if held[fqn] then prepared[fqn] = value end end
      end
    end
  end)
  -- reported as unexpected on every rank; only their names are read
  for _, key in ipairs(plan.unexpected) do prepared[key] = holder and sd[key] or false end
  return prepared
end

-- The root's load pre hook: a state dict nn.Module's loading copies from, each sharded
-- parameter's value turned into this rank's rows, in registration order (loading may
-- gather: every rank the same order); rank0_only loads from rank 0's state dict.
local function prepare_load(model, sd, strict)
  local settings = settings_of(model)
  if settings.type == "FULL_STATE_DICT" and settings.rank0_only then return load_from_rank0(model, sd, strict) end
  local list, prepared = entries(model), {}
  autograd.no_grad(function()
    -- every name's value is checked; a tensor with several names takes the value under its
    -- last name present (as PyTorch loads them: each name in turn), so all its names agree
    for _, group in ipairs(tensors_of(list)) do
      local value
      for _, fqn in ipairs(group.names) do
        local source = sd[fqn]
        if source ~= nil then value = local_value(fqn, group.value, source, settings) end
      end
      for _, fqn in ipairs(group.names) do if sd[fqn] ~= nil then prepared[fqn] = value end end
    end
  end)
  local known = {}
  for _, entry in ipairs(list) do known[entry[1]] = true end
  for key, value in pairs(sd) do if not known[key] then prepared[key] = value end end
  return prepared
end

-- Handles of the hooks that make the tree rooted at module give and take state dicts as
-- its settings say.
function M.install(module)
  return {module:register_state_dict_post_hook(model_state_dict),
          module:register_load_state_dict_pre_hook(prepare_load)}
end

-- ---- optimizer state ----

-- The optimizer state-dict settings (optim_state_dict_config) of the tree rooted at model.
local function optim_settings(model)
  local settings = settings_of(model)
  return settings.optim or {type = settings.type}
end

local function param_names(model)
  local names = {}
  for _, entry in ipairs(entries(model)) do
    if not entry[3] and not names[entry[2]] then names[entry[2]] = entry[1] end
  end
  return names
end

-- One optimizer state tensor of sharded parameter p, laid out like p in the state dict
-- (making only the view or the gathered tensor that is returned).
local function export_state(value, p, settings)
  if settings.type == "FULL_STATE_DICT" then
    return gather_full(DTensor.new(value, p.device_mesh, p.placements, p:shape()), settings)
  end
  return export(DTensor.new(value, p.device_mesh, p.placements, p:shape()), settings)
end

-- The optimizer's state keyed by parameter names, tensors laid out like the parameters
-- (DTensors for a sharded state dict, full tensors for a full one).
function M.optim_state_dict(model, opt)
  local settings = optim_settings(model)
  local names = param_names(model)
  local out = {state = {}, param_groups = {}}
  for _, group in ipairs(opt.param_groups) do
    local entry = {params = {}}
    for key, value in pairs(group) do if key ~= "params" then entry[key] = value end end
    for _, p in ipairs(group.params) do
      local fqn = names[p]
      if not fqn then fail("optim_state_dict", "the optimizer holds a parameter the model does not have") end
      entry.params[#entry.params + 1] = fqn
      local state = opt.state[p]
      if state then
        local copy = {}
        local keys = {}
        for key in pairs(state) do keys[#keys + 1] = key end
        table.sort(keys) -- a full export gathers (a collective): the same order on every rank
        for _, key in ipairs(keys) do
          local value = state[key]
          if Tensor.is_tensor(value) and DTensor.is_dtensor(p) then
            copy[key] = export_state(value, p, settings)
          elseif Tensor.is_tensor(value) then
            copy[key] = value:detach()
          else
            copy[key] = value
          end
        end
        out.state[fqn] = copy
      end
    end
    out.param_groups[#out.param_groups + 1] = entry
  end
  return out
end

-- rank 0's optimizer state dict as a rank0_only load needs it on every rank: per param group
-- its saved hyper-parameters, per parameter name (of the optimizer's parameters) the
-- state's other values and the sorted keys of its tensors (each checked against the
-- parameter's shape and dtype; broadcast afterwards, one at a time).
local function optim_plan(opt, names, osd)
  if type(osd) ~= "table" or type(osd.state) ~= "table" then
    fail("optim_state_dict_to_load", "expected a table with state and param_groups")
  end
  local plan = {param_groups = {}, state = {}}
  for g, group in ipairs(opt.param_groups) do
    local saved, hyper = osd.param_groups and osd.param_groups[g] or {}, {}
    for key, value in pairs(saved) do if key ~= "params" then hyper[key] = value end end
    plan.param_groups[g] = hyper
    for _, p in ipairs(group.params) do
      local fqn = names[p]
      local state = fqn and osd.state[fqn]
      if state then
        local values, tensors = {}, {}
        for key, value in pairs(state) do
          if DTensor.is_dtensor(value) or Tensor.is_tensor(value) then
            check_rank0_source(fqn .. "." .. key, p, value)
            tensors[#tensors + 1] = key
          else
            values[key] = value
          end
        end
        table.sort(tensors)
        plan.state[fqn] = {values = values, tensors = tensors}
      end
    end
  end
  return plan
end

-- One parameter's state from osd's: tensors imported as this rank's value (plain tensors
-- as full ones, or under LOCAL_STATE_DICT as local shards), other values as they are.
local function state_to_load(fqn, p, state, plain_kind)
  local copy, keys = {}, {}
  for key in pairs(state) do keys[#keys + 1] = key end
  table.sort(keys) -- import may gather (a collective): the same order on every rank
  for _, key in ipairs(keys) do
    local value = state[key]
    if DTensor.is_dtensor(value) or Tensor.is_tensor(value) then
      local like = DTensor.is_dtensor(p) and p:to_local() or p
      local buffer = Tensor.empty_raw(like:shape(), like._c.dtype, like._c.storage.pool)
      local target = DTensor.is_dtensor(p) and DTensor.new(buffer, p.device_mesh, p.placements, p:shape()) or buffer
      import(fqn .. "." .. key, target, value, {type = DTensor.is_dtensor(value) and "SHARDED_STATE_DICT" or plain_kind})
      copy[key] = buffer
    else
      copy[key] = value
    end
  end
  return copy
end

-- One parameter's state as rank 0's plan describes it, its tensors broadcast from rank 0
-- (source: rank 0's state, nil elsewhere).
local function state_from_rank0(p, planned, source, mesh)
  local copy = {}
  for key, value in pairs(planned.values) do copy[key] = value end
  autograd.no_grad(function()
    for _, key in ipairs(planned.tensors) do -- the same order on every rank
      copy[key] = receive_from_origin(p, source and source[key], mesh)
    end
  end)
  return copy
end

-- Turn a state dict from optim_state_dict (possibly loaded from a checkpoint) into one
-- opt:load_state_dict accepts, read as the model's optimizer state-dict type says: DTensors
-- as sharded values, plain tensors as full ones (local shards under LOCAL_STATE_DICT).
-- With FULL_STATE_DICT and rank0_only only rank 0 of the model's mesh reads osd: it sends
-- the structure and broadcasts each tensor within the mesh, so every rank gets rank 0's state.
function M.optim_state_dict_to_load(model, opt, osd)
  local settings = optim_settings(model)
  local names = param_names(model)
  local from_rank0 = settings.type == "FULL_STATE_DICT" and settings.rank0_only
  local mesh = from_rank0 and tree_mesh(model)
  local holder = from_rank0 and at_origin(mesh)
  local rank0_osd = holder and osd
  if from_rank0 then
    -- every rank continues from rank 0's plan: its hyper-parameters and its state
    local plan = plan_from_origin(mesh, function() return optim_plan(opt, names, osd) end)
    osd = {param_groups = plan.param_groups, state = plan.state}
  elseif type(osd) ~= "table" or type(osd.state) ~= "table" then
    fail("optim_state_dict_to_load", "expected a table with state and param_groups")
  end
  local plain_kind = settings.type == "LOCAL_STATE_DICT" and "LOCAL_STATE_DICT" or "FULL_STATE_DICT"
  local out = {state = {}, param_groups = {}}
  local index = 0
  for g, group in ipairs(opt.param_groups) do
    local saved_group = osd.param_groups and osd.param_groups[g] or {}
    local entry = {params = {}}
    for key, value in pairs(saved_group) do if key ~= "params" then entry[key] = value end end
    for key, value in pairs(group) do if entry[key] == nil and key ~= "params" then entry[key] = value end end
    for _, p in ipairs(group.params) do
      local fqn = names[p]
      entry.params[#entry.params + 1] = index
      local state = fqn and osd.state[fqn]
      if state and from_rank0 then
        out.state[index] = state_from_rank0(p, state, holder and rank0_osd.state[fqn] or nil, mesh)
      elseif state then
        out.state[index] = state_to_load(fqn, p, state, plain_kind)
      end
      index = index + 1
    end
    out.param_groups[#out.param_groups + 1] = entry
  end
  return out
end

return M
