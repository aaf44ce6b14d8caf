-- FSDP memory on the device through the cuda:N pools' exact statistics: with FULL_SHARD over
-- nccl a rank holds its local shards, one unit's unsharded parameters and the flat
-- all-gather buffers at a time, as specs/fsdp_memory_spec.lua checks on the CPU.
local ms = require "moonshard"
local nn, dist, fsdp = ms.nn, ms.dist, ms.fsdp
local gpu = require "gpu.helpers"

local LAYERS, DIM, F32 = 8, 256, 4
local ACTIVATION_BUDGET = 32 * 1024

describe("FSDP memory on a device #gpu", function()
  local missing = gpu.missing_devices(2)
  if missing then
    pending(missing)
    return
  end
  local world = gpu.world_size()
  local unit_bytes = DIM * (DIM + 1) * F32
  local shard_bytes = math.ceil(DIM / world) * (DIM + 1) * F32
  local local_shards = LAYERS * shard_bytes
  local flat_buffers = world * shard_bytes + shard_bytes

  it("FULL_SHARD holds one unit unsharded at a time", function()
    local results = dist.spawn(world, function(rank)
      return gpu.with_nccl(function()
        local device = gpu.rank_device(rank)
        ms.manual_seed(0)
        local layers = {}
        for i = 1, LAYERS do layers[i] = nn.Linear(DIM, DIM) end
        local model = nn.Sequential(unpack(layers))
        model:to(device)
        fsdp.FSDP(model, {sharding_strategy = "FULL_SHARD",
                          auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
        local x = ms.randn(1, DIM):to(device)
        local base = ms.memory_stats(device).allocated
        ms.reset_peak_memory_stats(device)
        local loss = model(x):sum()
        local forward_peak = ms.memory_stats(device).peak - base
        loss:backward()
        return {base = base, forward_peak = forward_peak,
                after = ms.memory_stats(device).allocated - base}
      end)
    end)
    for rank, m in ipairs(results) do
      local label = "rank " .. (rank - 1)
      assert.is_true(m.base >= local_shards and m.base < local_shards + ACTIVATION_BUDGET,
                     label .. " base " .. m.base)
      assert.is_true(m.forward_peak <= unit_bytes + flat_buffers + ACTIVATION_BUDGET,
                     label .. " forward peak " .. m.forward_peak)
      assert.is_true(m.after <= local_shards + ACTIVATION_BUDGET, label .. " after " .. m.after)
    end
  end)
end)
