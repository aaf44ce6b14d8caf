-- Checks, under mpirun over several hosts, that HYBRID_SHARD's 2-D mesh puts the shard dimension
-- inside each host and the replicate dimension across hosts. Prints "mesh ok" on rank 0.
-- Usage: mpirun -n 4 ... luajit tools/multihost_mesh.lua (2 hosts x 2 ranks)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local dist = ms.dist

local world = dist.get_world_size()
local mesh = dist.init_device_mesh({2, world / 2}, {mesh_dim_names = {"replicate", "shard"}})
local hostname = assert(io.open("/proc/sys/kernel/hostname")):read("*l")

-- The hostnames of a group's members, in group order: each rank's name as 64 bytes, gathered.
local function hostnames(group)
  local size = dist.get_world_size(group)
  local bytes = {}
  for i = 1, 64 do bytes[i] = hostname:byte(i) or 0 end
  local mine = ms.tensor(bytes, {dtype = "i32"})
  local all = ms.zeros(64 * size, {dtype = "i32"})
  dist.all_gather_into_tensor(all, mine, {group = group})
  local data = ffi.cast("int32_t *", all:data_ptr())
  local names = {}
  for r = 0, size - 1 do
    local chars = {}
    for i = 0, 63 do
      if data[r * 64 + i] == 0 then break end
      chars[#chars + 1] = string.char(data[r * 64 + i])
    end
    names[#names + 1] = table.concat(chars)
  end
  return names
end

local shard, replicate = hostnames(mesh:get_group("shard")), hostnames(mesh:get_group("replicate"))
for _, name in ipairs(shard) do
  if name ~= hostname then error(("shard group spans hosts: %s"):format(table.concat(shard, ", ")), 0) end
end
for i = 2, #replicate do
  if replicate[i] == replicate[1] then
    error(("replicate group stays on one host: %s"):format(table.concat(replicate, ", ")), 0)
  end
end
dist.barrier()
if dist.get_rank() == 0 then print("mesh ok: shard groups within a host, replicate groups across hosts") end
