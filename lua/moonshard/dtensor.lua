-- DTensor: a tensor distributed over a device mesh (a local tensor, the mesh, one placement
-- per mesh dim, the global shape). Sharding is on dim 0 with ceil-sized row chunks.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local placement = require "moonshard.placement"
local raw = require "moonshard.ops.raw"
local scope = require "moonshard.scope"

local lib, check, fail = C.lib, C.check, C.fail

local DTensor = {__name = "DTensor", __dtensor = true}

local function dist() return require "moonshard.dist" end

function DTensor.is_dtensor(v) return type(v) == "table" and getmetatable(v) == DTensor end

-- What a DTensor offers; anything else a tensor has (arithmetic, reductions, views) raises.
local SUPPORTED = "to_local(), full_tensor(), redistribute(), shape(), size(), dim(), numel(), " ..
                  "dtype(), device(), clone() and detach()"
local function unsupported(what)
  fail("DTensor", "%s is not supported on a DTensor (a DTensor supports %s); compute on d:to_local() " ..
       "(this rank's shard) or d:full_tensor() (the whole tensor)", what, SUPPORTED)
end

local OPERATORS = {__add = "+", __sub = "-", __mul = "*", __div = "/", __mod = "%", __pow = "^",
                   __unm = "unary -", __concat = ".."}
for event, symbol in pairs(OPERATORS) do
  DTensor[event] = function() unsupported("the operator " .. symbol) end
end

-- d:sum(), d:view(...) and the other tensor methods raise naming the method.
local refusals = {}
DTensor.__index = function(_, key)
  local method = DTensor[key]
  if method ~= nil then return method end
  if type(key) == "string" and key:sub(1, 1) ~= "_" and type(Tensor[key]) == "function" then
    local refuse = refusals[key]
    if not refuse then
      refuse = function() unsupported(key .. "()") end
      refusals[key] = refuse
    end
    return refuse
  end
  return nil
end

-- The mesh dim that shards dim 0 (nil when every placement replicates).
local function shard_mesh_dim(placements)
  local found
  for i, p in ipairs(placements) do
    if not placement.is_placement(p) then
      fail("DTensor", "placement %d must be ms.Shard(d) or ms.Replicate(), got %s", i,
           type(p) == "string" and ("the string '" .. p .. "'") or type(p))
    end
    if p:is_shard() then
      if p.dim ~= 0 then fail("DTensor", "only Shard(0) is supported, got %s", tostring(p)) end
      if found then fail("DTensor", "a tensor can be sharded on one mesh dim only") end
      found = i - 1
    end
  end
  return found
end

local function check_mesh(mesh, what)
  if getmetatable(mesh) ~= require("moonshard.mesh").DeviceMesh then
    fail(what, "device_mesh must be a DeviceMesh (dist.init_device_mesh), got %s",
         DTensor.is_dtensor(mesh) and "a DTensor" or type(mesh))
  end
end

-- Placements as given, or Replicate() on every mesh dim when nil (PyTorch's default); checked.
local function placements_for(placements, mesh, what)
  if placements == nil then
    placements = {}
    for d = 1, mesh:ndim() do placements[d] = placement.Replicate() end
  end
  placement.check(placements, mesh:ndim(), what)
  local mesh_dim = shard_mesh_dim(placements)
  return placements, mesh_dim
end

local function check_plain_tensor(t, what, name)
  if DTensor.is_dtensor(t) then fail(what, "%s must be a plain tensor, got a DTensor", name) end
  if not Tensor.is_tensor(t) then fail(what, "%s must be a tensor, got %s", name, type(t)) end
end

local function shape_text(shape) return "[" .. table.concat(shape, ", ") .. "]" end

-- Wrap local_tensor (this rank's rows) as a DTensor of global_shape.
function DTensor.new(local_tensor, mesh, placements, global_shape)
  if not Tensor.is_tensor(local_tensor) then fail("DTensor", "local tensor must be a tensor") end
  if #placements ~= mesh:ndim() then
    fail("DTensor", "%d placements for a %d-D mesh", #placements, mesh:ndim())
  end
  local self = setmetatable({
    _local = scope.keep(local_tensor), device_mesh = mesh, placements = placements,
    _global_shape = setmetatable(global_shape, Tensor.Size), _shard_dim = shard_mesh_dim(placements),
  }, DTensor)
  return self
end

-- DTensor.from_local(t, mesh[, placements][, global_shape]) like PyTorch's (placements default
-- to Replicate() on every mesh dim). Without a global shape every rank is assumed to hold the
-- same number of rows. The local shape is checked against the global one: dims other than 0
-- (and dim 0 when nothing shards it) must equal it, and a sharded dim 0 must hold the rows
-- Shard(0) gives this rank of the declared size.
function DTensor.from_local(local_tensor, mesh, placements, global_shape)
  local what = "DTensor.from_local"
  check_plain_tensor(local_tensor, what, "the local tensor")
  check_mesh(mesh, what)
  local mesh_dim
  placements, mesh_dim = placements_for(placements, mesh, what)
  local local_shape = local_tensor:shape()
  if mesh_dim and #local_shape == 0 then
    fail(what, "Shard(0) needs a tensor with at least one dim, got a 0-d local tensor")
  end
  if global_shape == nil then
    global_shape = local_tensor:shape()
    if mesh_dim then global_shape[1] = global_shape[1] * mesh:size(mesh_dim) end
    return DTensor.new(local_tensor, mesh, placements, global_shape)
  end
  if type(global_shape) ~= "table" then
    fail(what, "shape must be an array of sizes, got %s", type(global_shape))
  end
  local declared = {}
  for i = 1, #global_shape do
    local n = global_shape[i]
    if type(n) ~= "number" or n < 0 or n % 1 ~= 0 then
      fail(what, "shape: size %d is %s (sizes must be non-negative integers)", i, tostring(n))
    end
    declared[i] = n
  end
  if #declared ~= #local_shape then
    fail(what, "the local tensor %s has %d dims but the declared shape %s has %d", shape_text(local_shape),
         #local_shape, shape_text(declared), #declared)
  end
  for d = 1, #declared do
    if d == 1 and mesh_dim then
      local coordinate, ranks = mesh:get_local_rank(mesh_dim), mesh:size(mesh_dim)
      local start, length = placement.shard_range(declared[1], ranks, coordinate)
      if local_shape[1] ~= length then
        fail(what, "the local tensor %s has %d rows but Shard(0) of the declared shape %s over the %d ranks " ..
             "of mesh dim %d gives this rank (coordinate %d) %d rows (%d..%d)", shape_text(local_shape),
             local_shape[1], shape_text(declared), ranks, mesh_dim, coordinate, length, start,
             start + length - 1)
      end
    elseif local_shape[d] ~= declared[d] then
      fail(what, "dim %d of the local tensor %s is %d but the declared shape %s has %d (%s)", d - 1,
           shape_text(local_shape), local_shape[d], shape_text(declared), declared[d],
           d == 1 and "no placement shards it" or "only dim 0 can be sharded")
    end
  end
  return DTensor.new(local_tensor, mesh, placements, declared)
end

-- PyTorch's src_data_rank: the mesh coordinate (along every mesh dim) whose data every rank
-- ends with, or false (PyTorch's None) for each rank's own tensor without communication.
local function source_coordinate(opts, mesh, what)
  opts = raw.options(what, opts, {src_data_rank = true})
  local src = opts.src_data_rank
  if src == nil then return 0 end
  if src == false then return false end
  if type(src) ~= "number" or src % 1 ~= 0 or src < 0 then
    fail(what, "src_data_rank must be a mesh coordinate (a non-negative integer) or false, got %s", tostring(src))
  end
  for d = 0, mesh:ndim() - 1 do
    if src >= mesh:size(d) then
      fail(what, "src_data_rank %d is outside mesh dim %d of size %d", src, d, mesh:size(d))
    end
  end
  return src
end

-- The data of the rank at coordinate src along every mesh dim: broadcast within each mesh
-- dim's group from its member at src, as PyTorch's mesh broadcasts and scatters. Returns full
-- itself on the ranks whose data it is, else a new tensor.
local function from_source(full, mesh, src)
  local data = raw.contiguous(full)
  for d = 0, mesh:ndim() - 1 do
    if mesh:size(d) > 1 then
      local group = mesh:get_group(d)
      if mesh:get_local_rank(d) ~= src and data == full then data = raw.empty_shape(full:shape(), full) end
      dist().broadcast(data, group:ranks()[src + 1], {group = group})
    end
  end
  return data
end

-- ms.distribute_tensor(full, mesh[, placements][, {src_data_rank = 0}]): shard or replicate
-- full as PyTorch does. By default every rank ends with the data of the mesh's first rank
-- (coordinate 0 on every mesh dim), whatever the others passed; a collective over the mesh.
function DTensor.distribute(full, mesh, placements, opts)
  local what = "distribute_tensor"
  check_plain_tensor(full, what, "the tensor")
  check_mesh(mesh, what)
  local mesh_dim
  placements, mesh_dim = placements_for(placements, mesh, what)
  if mesh_dim and full:dim() == 0 then
    fail(what, "Shard(0) needs a tensor with at least one dim, got a 0-d tensor")
  end
  local src = source_coordinate(opts, mesh, what)
  local data = full
  if src and not Tensor.is_meta(full) then data = from_source(full, mesh, src) end
  local local_tensor
  if mesh_dim then
    local n = data:size(0)
    local start, length = placement.shard_range(n, mesh:size(mesh_dim), mesh:get_local_rank(mesh_dim))
    local shape = data:shape()
    shape[1] = length
    local_tensor = Tensor.empty_raw(shape, data._c.dtype, data._c.storage.pool)
    if length > 0 then
      local rows = data:narrow(0, start, length)
      check(lib.ms_copy(local_tensor._c, rows._c), what)
    end
    if data ~= full then data:_release() end
  elseif data ~= full then
    local_tensor = data
  else
    local_tensor = raw.copy(full)
  end
  return DTensor.new(local_tensor, mesh, placements, full:shape())
end

function DTensor:to_local() return self._local end
function DTensor:shape() return setmetatable({unpack(self._global_shape)}, Tensor.Size) end
function DTensor:size(dim)
  if dim == nil then return self:shape() end
  if dim < 0 then dim = dim + #self._global_shape end
  return self._global_shape[dim + 1]
end
function DTensor:dim() return #self._global_shape end
function DTensor:numel()
  local n = 1
  for _, s in ipairs(self._global_shape) do n = n * s end
  return n
end
function DTensor:dtype() return self._local:dtype() end
function DTensor:device() return self._local:device() end

function DTensor:__tostring()
  local names = {}
  for i, p in ipairs(self.placements) do names[i] = tostring(p) end
  return string.format("DTensor(shape=%s, dtype=%s, placements={%s}, local=%s)", tostring(self:shape()),
                       self:dtype(), table.concat(names, ", "), tostring(self._local:shape()))
end

-- All-gather rows of a dim-0 shard over group into a full tensor of n rows.
local function gather_rows(local_tensor, n, group, group_size)
  local shape = local_tensor:shape()
  local rows = shape[1]
  local chunk = math.ceil(n / group_size)
  local padded_shape = {chunk}
  for d = 2, #shape do padded_shape[d] = shape[d] end
  local dtype, pool = local_tensor._c.dtype, local_tensor._c.storage.pool
  local send = Tensor.empty_raw(padded_shape, dtype, pool)
  check(lib.ms_fill(send._c, 0), "full_tensor")
  if rows > 0 then
    local head = Tensor.view_raw(send, shape, nil, 0, "full_tensor")
    check(lib.ms_copy(head._c, local_tensor._c), "full_tensor")
    head:_release()
  end
  local gathered_shape = {chunk * group_size}
  for d = 2, #shape do gathered_shape[d] = shape[d] end
  local gathered = Tensor.empty_raw(gathered_shape, dtype, pool)
  dist().all_gather_into_tensor(gathered, send, {group = group})
  send:_release()
  if chunk * group_size == n then return gathered end
  local full_shape = {n}
  for d = 2, #shape do full_shape[d] = shape[d] end
  local full = Tensor.empty_raw(full_shape, dtype, pool)
  if n > 0 then
    local head = Tensor.view_raw(gathered, full_shape, nil, 0, "full_tensor")
    check(lib.ms_copy(full._c, head._c), "full_tensor")
    head:_release()
  end
  gathered:_release()
  return full
end
DTensor.gather_rows = gather_rows

-- The whole tensor on every rank (a plain tensor).
function DTensor:full_tensor()
  local mesh_dim = self._shard_dim
  if not mesh_dim then return raw.copy(self._local) end
  local mesh = self.device_mesh
  return gather_rows(self._local, self._global_shape[1], mesh:get_group(mesh_dim), mesh:size(mesh_dim))
end

-- The same values with other placements on mesh (which must equal this one's mesh).
function DTensor:redistribute(mesh, placements)
  mesh = mesh or self.device_mesh
  if not (mesh == self.device_mesh) then
    fail("redistribute", "moving between different meshes is not supported")
  end
  placement.check(placements, mesh:ndim(), "redistribute")
  local target_dim = shard_mesh_dim(placements)
  if target_dim == self._shard_dim then
    return DTensor.new(raw.copy(self._local), mesh, placements, self:shape())
  end
  local full = self:full_tensor()
  -- every rank holds the same full tensor, so each takes its part of its own
  local out = DTensor.distribute(full, mesh, placements, {src_data_rank = false})
  if rawget(full, "_c") then full:_release() end
  return out
end

function DTensor:clone()
  return DTensor.new(raw.copy(self._local), self.device_mesh, self.placements, self:shape())
end

function DTensor:detach()
  return DTensor.new(self._local:detach(), self.device_mesh, self.placements, self:shape())
end

-- Release the local tensor now.
function DTensor:release()
  if rawget(self._local, "_c") then self._local:_release() end
end

return DTensor
