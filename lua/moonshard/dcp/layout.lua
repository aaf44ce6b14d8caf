-- Where a state-dict tensor lives in its global tensor: the local tensor, the global shape,
-- the offsets of the local region, and whether this rank writes it (replicas are written by
-- the replica at coordinate 0 of every replicating mesh dim; plain tensors by rank 0).
local ffi = require "ffi"
local C = require "moonshard.ffi"
local DTensor = require "moonshard.dtensor"
local placement = require "moonshard.placement"

local fail = C.fail

local M = {}

local function copy_array(values)
  local out = {}
  for i, v in ipairs(values) do out[i] = v end
  return out
end

-- {tensor =, global_shape =, offsets =, writer =} for a tensor or DTensor leaf.
function M.of(leaf, rank, what)
  local value = leaf.value
  if not DTensor.is_dtensor(value) then
    local shape = value:shape()
    local offsets = {}
    for d = 1, #shape do offsets[d] = 0 end
    return {tensor = value, global_shape = copy_array(shape), offsets = offsets, writer = rank == 0}
  end
  local mesh, local_tensor = value.device_mesh, value:to_local()
  if rawget(local_tensor, "_c") == nil then fail(what, "'%s': the local tensor was released", leaf.fqn) end
  local global_shape = copy_array(value:shape())
  local local_shape = local_tensor:shape()
  local offsets, expected = {}, copy_array(global_shape)
  for d = 1, #global_shape do offsets[d] = 0 end
  local writer = true
  for i, p in ipairs(value.placements) do
    local coordinate = mesh:get_local_rank(i - 1)
    if p:is_shard() then
      local start, length = placement.shard_range(global_shape[1], mesh:size(i - 1), coordinate)
      offsets[1], expected[1] = start, length
    elseif coordinate ~= 0 then
      writer = false
    end
  end
  if #local_shape ~= #expected then
    fail(what, "'%s': the local tensor has %d dims, the global shape %s has %d", leaf.fqn,
         #local_shape, tostring(value:shape()), #expected)
  end
  for d = 1, #expected do
    if local_shape[d] ~= expected[d] then
      fail(what, "'%s': the local tensor has shape %s, but rank %d's part of %s is [%s]", leaf.fqn,
           tostring(local_shape), mesh:get_rank(), tostring(value:shape()), table.concat(expected, ", "))
    end
  end
  return {tensor = local_tensor, global_shape = global_shape, offsets = offsets, writer = writer}
end

-- An int64_t[8] holding a Lua array (for the C calls).
function M.int64s(values, buffer)
  buffer = buffer or ffi.new("int64_t[8]")
  for i, v in ipairs(values) do buffer[i - 1] = v end
  return buffer
end

return M
