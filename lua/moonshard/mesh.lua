-- DeviceMesh: the world's ranks laid out row-major in an n-D array, with one process group
-- per mesh dim (the ranks that differ from this one only along that dim). Dims are 0-based.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local dist = require "moonshard.dist"

local fail = C.fail

local M = {}

local DeviceMesh = {}
DeviceMesh.__name = "DeviceMesh"
M.DeviceMesh = DeviceMesh

local function product(shape)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return n
end

-- Row-major coordinates of index in shape (0-based).
local function coordinates(index, shape)
  local coords = {}
  for d = #shape, 1, -1 do
    coords[d] = index % shape[d]
    index = math.floor(index / shape[d])
  end
  return coords
end

-- The mesh dim a caller names by 0-based number or by name.
local function dim_index(mesh, dim, what)
  if dim == nil then
    if #mesh._shape ~= 1 then fail(what, "a %d-D mesh needs a mesh dim", #mesh._shape) end
    return 0
  end
  if type(dim) == "string" then
    for d, name in ipairs(mesh.mesh_dim_names or {}) do
      if name == dim then return d - 1 end
    end
    fail(what, "no mesh dim named '%s' (dims: %s)", dim,
         mesh.mesh_dim_names and table.concat(mesh.mesh_dim_names, ", ") or "unnamed")
  end
  if type(dim) ~= "number" or dim % 1 ~= 0 or dim < 0 or dim >= #mesh._shape then
    fail(what, "mesh dim %s outside [0, %d)", tostring(dim), #mesh._shape)
  end
  return dim
end

function DeviceMesh:ndim() return #self._shape end

-- Ranks along dim, or in the whole mesh when dim is nil.
function DeviceMesh:size(dim)
  if dim == nil then return product(self._shape) end
  return self._shape[dim_index(self, dim, "DeviceMesh:size") + 1]
end

function DeviceMesh:shape()
  local copy = {}
  for d, s in ipairs(self._shape) do copy[d] = s end
  return copy
end

-- The process group along dim (number or name; may be omitted for a 1-D mesh).
function DeviceMesh:get_group(dim)
  return self._groups[dim_index(self, dim, "DeviceMesh:get_group") + 1]
end

-- This rank's coordinate along dim.
function DeviceMesh:get_local_rank(dim)
  return self._coordinate[dim_index(self, dim, "DeviceMesh:get_local_rank") + 1]
end

function DeviceMesh:get_rank() return self._rank end

function DeviceMesh:get_coordinate()
  local copy = {}
  for d, c in ipairs(self._coordinate) do copy[d] = c end
  return copy
end

-- The global rank at 0-based coordinates.
function DeviceMesh:rank_at(coords)
  local index = 0
  for d, s in ipairs(self._shape) do index = index * s + coords[d] end
  return self._world_ranks[index + 1]
end

function DeviceMesh.__eq(a, b)
  if #a._shape ~= #b._shape or #a._world_ranks ~= #b._world_ranks then return false end
  for d, s in ipairs(a._shape) do
    if b._shape[d] ~= s or (a.mesh_dim_names or {})[d] ~= (b.mesh_dim_names or {})[d] then
      return false
    end
  end
  for i, r in ipairs(a._world_ranks) do
    if b._world_ranks[i] ~= r then return false end
  end
  return true
end

-- DeviceMesh('cpu', [[0, 1], [2, 3]], mesh_dim_names=('replicate', 'shard'))
function DeviceMesh:__tostring()
  local function nested(d, offset)
    if d > #self._shape then return tostring(self._world_ranks[offset + 1]) end
    local parts, stride = {}, product({unpack(self._shape, d + 1)})
    for i = 0, self._shape[d] - 1 do parts[#parts + 1] = nested(d + 1, offset + i * stride) end
    return "[" .. table.concat(parts, ", ") .. "]"
  end
  local names = ""
  if self.mesh_dim_names then
    names = ", mesh_dim_names=('" .. table.concat(self.mesh_dim_names, "', '") .. "')"
  end
  return "DeviceMesh('cpu', " .. nested(1, 0) .. names .. ")"
end

-- A 1-D mesh of one named dim of this mesh (PyTorch's mesh["shard"]).
function DeviceMesh:submesh(name)
  local dim = dim_index(self, name, "DeviceMesh:submesh")
  local group = self._groups[dim + 1]
  return setmetatable({
    _shape = {group:size()}, _groups = {group}, _coordinate = {self._coordinate[dim + 1]},
    _rank = self._rank, _world_ranks = group:ranks(),
    mesh_dim_names = self.mesh_dim_names and {self.mesh_dim_names[dim + 1]} or nil,
  }, DeviceMesh)
end

DeviceMesh.__index = function(mesh, key)
  local method = DeviceMesh[key]
  if method ~= nil then return method end
  if type(key) == "string" and rawget(mesh, "mesh_dim_names") then
    for _, name in ipairs(mesh.mesh_dim_names) do
      if name == key then return mesh:submesh(key) end
    end
  end
  return nil
end

local function parse_arguments(what, device, shape, opts)
  if type(device) ~= "string" then device, shape, opts = "cpu", device, shape end
  if device ~= "cpu" then
    fail(what, "device type '%s' is not supported by the CPU backends (use 'cpu')", device)
  end
  if type(shape) == "number" then shape = {shape} end
  if type(shape) ~= "table" or #shape == 0 then
    fail(what, "mesh shape must be an array of sizes, e.g. {2, 2}")
  end
  for _, s in ipairs(shape) do
    if type(s) ~= "number" or s < 1 or s % 1 ~= 0 then
      fail(what, "mesh sizes must be positive integers, got %s", tostring(s))
    end
  end
  opts = opts or {}
  local names = opts.mesh_dim_names
  if names ~= nil then
    if type(names) ~= "table" or #names ~= #shape then
      fail(what, "mesh_dim_names needs one name per mesh dim (%d)", #shape)
    end
    local seen = {}
    for _, name in ipairs(names) do
      if type(name) ~= "string" or seen[name] then
        fail(what, "mesh_dim_names must be distinct strings")
      end
      seen[name] = true
    end
  end
  return shape, names
end

-- init_device_mesh([device,] shape, {mesh_dim_names = {...}}): a mesh over every rank of
-- the world; every rank calls it with the same arguments.
function M.init_device_mesh(device, shape, opts)
  local what = "dist.init_device_mesh"
  local names
  shape, names = parse_arguments(what, device, shape, opts)
  local world_size, rank = dist.get_world_size(), dist.get_rank()
  if product(shape) ~= world_size then
    fail(what, "mesh shape {%s} holds %d ranks but the world has %d", table.concat(shape, ", "),
         product(shape), world_size)
  end
  local copy, world_ranks = {}, {}
  for d, s in ipairs(shape) do copy[d] = s end
  for r = 0, world_size - 1 do world_ranks[r + 1] = r end
  local mesh = setmetatable({_shape = copy, _coordinate = coordinates(rank, shape),
                             _rank = rank, _world_ranks = world_ranks, _groups = {},
                             mesh_dim_names = names and {unpack(names)} or nil}, DeviceMesh)
  -- Every rank makes every line's group in the same order and keeps the one it is in.
  for d = 1, #shape do
    local stride = product({unpack(shape, d + 1)})
    for line = 0, world_size / shape[d] - 1 do
      local outer, inner = math.floor(line / stride), line % stride
      local first = outer * stride * shape[d] + inner
      local members = {}
      for i = 0, shape[d] - 1 do members[i + 1] = first + i * stride end
      local group = dist.new_group(members)
      if group:rank() >= 0 then mesh._groups[d] = group end
    end
  end
  return mesh
end

-- A 1-D mesh over the ranks of a process group (PyTorch's DeviceMesh.from_group); the
-- caller must be a member.
function M.from_group(group, what)
  what = what or "DeviceMesh.from_group"
  if getmetatable(group) ~= dist.ProcessGroup then
    fail(what, "expected a process group from dist.new_group, got %s", type(group))
  end
  if group:rank() < 0 then
    fail(what, "%s does not contain this rank (%d)", tostring(group), dist.get_rank())
  end
  return setmetatable({_shape = {group:size()}, _groups = {group}, _coordinate = {group:rank()},
                       _rank = dist.get_rank(), _world_ranks = group:ranks()}, DeviceMesh)
end

-- A 2-D (replicate, shard) mesh from a shard group and a replicate group that cross at
-- this rank (HYBRID_SHARD's process_group pair); every member of both calls it.
function M.from_groups(shard, replicate, what)
  local shard_mesh, replicate_mesh = M.from_group(shard, what), M.from_group(replicate, what)
  -- each replica's shard group, gathered over the replicate group, lays out every rank
  local ranks = Tensor.empty_raw({shard:size()}, 1, 0)
  local values = ffi.cast("double*", ranks:data_ptr())
  for i, r in ipairs(shard:ranks()) do values[i - 1] = r end
  local all = Tensor.empty_raw({replicate:size() * shard:size()}, 1, 0)
  dist.all_gather_into_tensor(all, ranks, {group = replicate})
  local world_ranks = {}
  for i, r in ipairs(all:table()) do world_ranks[i] = r end
  ranks:_release()
  all:_release()
  if world_ranks[replicate:rank() * shard:size() + shard:rank() + 1] ~= dist.get_rank() then
    fail(what, "the shard group %s and the replicate group %s do not cross at this rank", tostring(shard),
         tostring(replicate))
  end
  return setmetatable({_shape = {replicate:size(), shard:size()}, _groups = {replicate, shard},
                       _coordinate = {replicate_mesh._coordinate[1], shard_mesh._coordinate[1]},
                       _rank = dist.get_rank(), _world_ranks = world_ranks,
                       mesh_dim_names = {"replicate", "shard"}}, DeviceMesh)
end

return M
