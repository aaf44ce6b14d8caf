-- Process groups and collectives with PyTorch's names (torch.distributed): the world of
-- dist.spawn or mpirun, sub-groups, and in-place collectives on tensors.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local finally = require "moonshard.finally"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

M.ReduceOp = {SUM = "sum", AVG = "avg", MAX = "max", MIN = "min"}
local op_ids = {sum = lib.MS_DIST_SUM, avg = lib.MS_DIST_AVG, max = lib.MS_DIST_MAX,
                min = lib.MS_DIST_MIN}

-- ---- process groups ----

local Group = {}
Group.__index = Group
Group.__name = "ProcessGroup"
M.ProcessGroup = Group

-- A Lua group around an ms_group handle; owned handles are freed with the group.
local function wrap_group(handle, owned, what)
  local size = lib.ms_group_size(handle)
  local ranks_out = ffi.new("int[?]", size)
  check(lib.ms_group_ranks(handle, ranks_out), what)
  local ranks, index = {}, {}
  for i = 0, size - 1 do
    ranks[i + 1] = ranks_out[i]
    index[ranks_out[i]] = i
  end
  return setmetatable({
    _c = owned and ffi.gc(handle, lib.ms_group_free) or handle, _owned = owned,
    _rank = lib.ms_group_rank(handle), _size = size, _ranks = ranks, _index = index,
    backend = ffi.string(lib.ms_group_backend(handle)),
  }, Group)
end
M._wrap_group = wrap_group

-- This process's index in the group, -1 when it is not a member.
function Group:rank() return self._rank end
function Group:size() return self._size end
-- The members' global ranks, in group order.
function Group:ranks()
  local copy = {}
  for i, r in ipairs(self._ranks) do copy[i] = r end
  return copy
end
-- The group index of a global rank, or nil when it is not a member.
function Group:group_rank(global_rank) return self._index[global_rank] end
function Group:__tostring()
  return string.format("ProcessGroup(%s, ranks {%s}%s)", self.backend,
                       table.concat(self._ranks, ", "), self._c == nil and ", destroyed" or "")
end

-- ---- the world ----

local world_out = ffi.new("ms_group*[1]")
local state = {base = nil, override = nil, alone = nil}

-- The default world has one owner, this module: the runtime's installed world (dist.spawn's,
-- or mpirun's started on first use), unless _with_world overrides it.
local function world_reachable()
  return lib.ms_dist_world(world_out) == 0 or lib.ms_mpi_launched() == 1
end

-- MPI is finalised by the runtime when the process exits (ms_mpi_init registers it).
local function base_world(what)
  if lib.ms_dist_world(world_out) ~= 0 then
    if lib.ms_mpi_launched() ~= 1 then
      fail(what, "no process group: call it inside dist.spawn(n, fn) or run the script " ..
                 "under mpirun")
    end
    check(lib.ms_mpi_init(), what)
    check(lib.ms_dist_world(world_out), what)
  end
  if state.base == nil or state.base._c ~= world_out[0] then
    state.base = wrap_group(world_out[0], false, what)
  end
  return state.base
end

-- The group collectives use by default: the spawned world (or mpirun's).
local function world(what) return state.override or base_world(what) end
M._world = world

-- Run fn with group as the default world (dist.spawn under mpirun with fewer ranks).
function M._with_world(group, fn, ...)
  local previous = state.override
  state.override = group
  return finally(function() state.override = previous end, fn, ...)
end

local function group_of(opts, what)
  local g = opts and opts.group
  if g == nil then return world(what) end
  if getmetatable(g) ~= Group then
    fail(what, "group must come from dist.new_group or a device mesh, got %s", tostring(g))
  end
  if g._c == nil then fail(what, "%s was destroyed by dist.destroy_process_group", tostring(g)) end
  return g
end

-- While the REPL runs a line on rank 0 alone, collectives over several ranks fail at once
-- with this message (the other ranks wait for the REPL, not in the collective). Returns
-- the previous message; nil lifts it.
function M._set_alone(message)
  local previous = state.alone
  state.alone = message
  return previous
end

-- The group of a collective: as group_of, refused at once while this rank runs alone.
local function collective_group(opts, what)
  local g = group_of(opts, what)
  if state.alone and g:size() > 1 then fail(what, "%s", state.alone) end
  return g
end

function M.is_initialized()
  return state.override ~= nil or world_reachable()
end

function M.get_rank(group)
  if group ~= nil then return group_of({group = group}, "dist.get_rank"):rank() end
  return world("dist.get_rank"):rank()
end

function M.get_world_size(group)
  if group ~= nil then return group_of({group = group}, "dist.get_world_size"):size() end
  return world("dist.get_world_size"):size()
end

function M.get_backend(group) return group_of({group = group}, "dist.get_backend").backend end

-- dist.init_process_group(backend) inside a rank (dist.spawn or mpirun): "nccl" turns the
-- world into NCCL communicators on this rank's GPU (collectives then take device tensors);
-- the world's own backend ("local" or "mpi", or nil) keeps it as it is.
function M.init_process_group(backend)
  local what = "dist.init_process_group"
  if type(backend) == "table" then backend = backend.backend end
  local current = world(what).backend
  if backend == nil or backend == current then return end
  if backend ~= "nccl" then
    fail(what, "unknown backend '%s' (expected nccl, or this world's own '%s')", tostring(backend), current)
  end
  if state.override ~= nil then
    fail(what, "nccl needs the whole world (this rank runs a dist.spawn smaller than mpirun's)")
  end
  check(lib.ms_nccl_init(), what)
end

-- destroy_process_group(group): release this rank's handle on a group from new_group (or a
-- mesh's) now; collectives on it raise from then on. The local backend reuses the group's
-- place in the shared segment once every member destroyed it (or collected it: the collector
-- releases dropped groups too). Without a group, or with the world: undo
-- init_process_group("nccl"), the world going back to the group it was made from.
function M.destroy_process_group(group)
  local what = "dist.destroy_process_group"
  if group == nil or (getmetatable(group) == Group and not group._owned) then
    check(lib.ms_nccl_finalize(), what)
    return
  end
  local g = group_of({group = group}, what)
  local handle = g._c
  g._c = nil
  lib.ms_group_free(ffi.gc(handle, nil))
end

function M.get_process_group_ranks(group)
  return group_of({group = group}, "dist.get_process_group_ranks"):ranks()
end

-- Collectives wait this long for a missing rank before raising (local backend); under
-- mpirun it bounds how long an exiting process waits for the others to finish.
function M.set_timeout(seconds, opts)
  local what = "dist.set_timeout"
  if type(seconds) ~= "number" or seconds <= 0 then fail(what, "timeout must be > 0 seconds") end
  check(lib.ms_group_set_timeout(group_of(opts, what)._c, math.ceil(seconds * 1000)), what)
end

-- The timeout collectives on the group (the world by default) wait, in seconds.
function M.get_timeout(opts)
  return tonumber(lib.ms_group_timeout(group_of(opts, "dist.get_timeout")._c)) / 1000
end

-- A group of the listed global ranks (all of them when nil). Every rank of the world
-- calls it with the same list in the same order; ranks not listed get a group whose
-- rank() is -1.
function M.new_group(ranks, opts)
  local what = "dist.new_group"
  local parent = world(what)
  if state.alone and parent:size() > 1 then fail(what, "%s", state.alone) end
  ranks = ranks or parent._ranks
  if type(ranks) ~= "table" or #ranks == 0 then fail(what, "ranks must be a non-empty array") end
  local indices = ffi.new("int[?]", #ranks)
  for i, r in ipairs(ranks) do
    local index = parent:group_rank(r)
    if index == nil then
      fail(what, "rank %s is not in the world (%d ranks)", tostring(r), parent:size())
    end
    indices[i - 1] = index
  end
  local out = ffi.new("ms_group*[1]")
  check(lib.ms_group_new(out, parent._c, indices, #ranks), what)
  local group = wrap_group(out[0], true, what)
  if opts and opts.timeout then M.set_timeout(opts.timeout, {group = group}) end
  return group
end

-- ---- collectives (in place, like PyTorch's synchronous forms) ----
-- On nccl groups they also take host tensors (staged through the group's device).

local function tensor_arg(t, what, name)
  if not Tensor.is_tensor(t) then
    if type(t) == "table" and rawget(getmetatable(t) or {}, "__released") then
      fail(what, "%s was used after it was released (return it from forward or call ms.keep(t) to keep it)", name)
    end
    fail(what, "%s must be a tensor, got %s", name, type(t) == "table" and "a table" or type(t))
  end
  return t._c
end

-- nccl groups move device memory: a host tensor goes through a buffer on the group's
-- device (filled from it, and copied back into it when the collective writes). Other
-- backends take tensors as they are.
local function on_device(g, t, fill)
  if g.backend ~= "nccl" or t._c.storage.pool >= lib.MS_POOL_CUDA0 then return t end
  local device = lib.ms_group_device(g._c)
  local staged = Tensor.empty_raw(t:shape(), t._c.dtype, lib.MS_POOL_CUDA0 + device)
  if fill then check(lib.ms_copy(staged._c, t._c), "dist: staging a host tensor") end
  return staged
end

local function back_to_host(t, staged)
  if staged == t then return end
  check(lib.ms_copy(t._c, staged._c), "dist: staging a host tensor")
  staged:_release()
end

local function release_staged(t, staged)
  if staged ~= t then staged:_release() end
end

local function op_arg(op, what)
  local id = op_ids[type(op) == "string" and op:lower() or op]
  if id == nil then fail(what, "unknown op '%s' (expected sum, avg, max or min)", tostring(op)) end
  return id
end

-- all_reduce(t, [op = "sum"], [{group = g}])
function M.all_reduce(t, op, opts)
  if type(op) == "table" then op, opts = nil, op end
  local what = "dist.all_reduce"
  local g = collective_group(opts, what)
  local op_id = op_arg(op or "sum", what)
  tensor_arg(t, what, "tensor")
  local data = on_device(g, t, true)
  check(lib.ms_dist_all_reduce(g._c, data._c, op_id), what)
  back_to_host(t, data)
  t:_bump_version()
end

-- out (world_size * t along dim 0) = every rank's t, in rank order.
function M.all_gather_into_tensor(out, t, opts)
  local what = "dist.all_gather_into_tensor"
  local g = collective_group(opts, what)
  tensor_arg(out, what, "output")
  tensor_arg(t, what, "input")
  local staged_out, staged_in = on_device(g, out, false), on_device(g, t, true)
  check(lib.ms_dist_all_gather_into_tensor(g._c, staged_out._c, staged_in._c), what)
  release_staged(t, staged_in)
  back_to_host(out, staged_out)
  out:_bump_version()
end

-- out = op over ranks of their block number rank of t (t is world_size * out along dim 0).
function M.reduce_scatter_tensor(out, t, op, opts)
  if type(op) == "table" then op, opts = nil, op end
  local what = "dist.reduce_scatter_tensor"
  local g = collective_group(opts, what)
  local op_id = op_arg(op or "sum", what)
  tensor_arg(out, what, "output")
  tensor_arg(t, what, "input")
  local staged_out, staged_in = on_device(g, out, false), on_device(g, t, true)
  check(lib.ms_dist_reduce_scatter_tensor(g._c, staged_out._c, staged_in._c, op_id), what)
  release_staged(t, staged_in)
  back_to_host(out, staged_out)
  out:_bump_version()
end

-- t on every rank = t of global rank src.
function M.broadcast(t, src, opts)
  local what = "dist.broadcast"
  local g = collective_group(opts, what)
  local root = g:group_rank(src)
  if root == nil then
    fail(what, "src %s is not a member of %s", tostring(src), tostring(g))
  end
  tensor_arg(t, what, "tensor")
  local data = on_device(g, t, true)
  check(lib.ms_dist_broadcast(g._c, data._c, root), what)
  if g:rank() == root then -- the source is only read
    release_staged(t, data)
  else
    back_to_host(t, data)
    t:_bump_version()
  end
end

function M.barrier(opts)
  local what = "dist.barrier"
  check(lib.ms_dist_barrier(collective_group(opts, what)._c), what)
end

-- ---- processes and meshes ----

function M.spawn(...) return require("moonshard.spawn").spawn(...) end

function M.init_device_mesh(...) return require("moonshard.mesh").init_device_mesh(...) end

return M
