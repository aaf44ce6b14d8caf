-- FSDP memory through the allocator's exact statistics: with FULL_SHARD on 4 ranks the
-- parameters held at any time are the local shards, one unit's unsharded parameters and
-- the flat all-gather buffers; SHARD_GRAD_OP keeps every unit whole until backward.
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn, dist, fsdp = ms.nn, ms.dist, ms.fsdp

local WORLD, LAYERS, DIM, F32 = 4, 8, 256, 4
-- One unit is one Linear(DIM, DIM): DIM * (DIM + 1) elements; each rank holds
-- ceil(DIM / WORLD) rows of the weight and of the bias.
local UNIT_BYTES = DIM * (DIM + 1) * F32
local SHARD_BYTES = math.ceil(DIM / WORLD) * (DIM + 1) * F32
local LOCAL_SHARDS = LAYERS * SHARD_BYTES
local FLAT_BUFFERS = WORLD * SHARD_BYTES + SHARD_BYTES -- all-gather output + send buffer
-- Activations of a batch of one row: a few DIM-float rows per layer, far below one unit.
local ACTIVATION_BUDGET = 32 * 1024

local function measure(strategy)
  return dist.spawn(WORLD, function()
    local before = ms.memory_stats("cpu").allocated -- what the forked parent held
    ms.manual_seed(0)
    local layers = {}
    for i = 1, LAYERS do layers[i] = nn.Linear(DIM, DIM) end
    local model = fsdp.FSDP(nn.Sequential(unpack(layers)),
                            {sharding_strategy = strategy, auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
    local x = ms.randn(1, DIM)
    local base = ms.memory_stats("cpu").allocated
    ms.reset_peak_memory_stats("cpu")
    local loss = model(x):sum()
    local forward_peak = ms.memory_stats("cpu").peak - base
    ms.reset_peak_memory_stats("cpu")
    loss:backward()
    return {held = base - before, forward_peak = forward_peak, backward_peak = ms.memory_stats("cpu").peak - base,
            after = ms.memory_stats("cpu").allocated - base}
  end)
end

before_each(global_state.save)
after_each(global_state.restore)

describe("FSDP memory", function()
  it("FULL_SHARD holds one unit unsharded at a time in forward and backward", function()
    for rank, m in ipairs(measure("FULL_SHARD")) do
      local label = "rank " .. (rank - 1)
      assert.is_true(m.held >= LOCAL_SHARDS and m.held < LOCAL_SHARDS + ACTIVATION_BUDGET, label .. " holds " .. m.held)
      assert.is_true(m.forward_peak <= UNIT_BYTES + FLAT_BUFFERS + ACTIVATION_BUDGET,
                     label .. " forward peak " .. m.forward_peak)
      -- backward adds the unit's unsharded gradients and the local gradient shards
      assert.is_true(m.backward_peak <= 2 * UNIT_BYTES + FLAT_BUFFERS + LOCAL_SHARDS + ACTIVATION_BUDGET,
                     label .. " backward peak " .. m.backward_peak)
      assert.is_true(m.after <= LOCAL_SHARDS + ACTIVATION_BUDGET, label .. " after backward " .. m.after)
    end
  end)

  it("SHARD_GRAD_OP keeps every unit unsharded from forward until backward", function()
    for rank, m in ipairs(measure("SHARD_GRAD_OP")) do
      assert.is_true(m.forward_peak >= LAYERS * UNIT_BYTES, "rank " .. (rank - 1) .. " forward peak " .. m.forward_peak)
      assert.is_true(m.after <= LOCAL_SHARDS + ACTIVATION_BUDGET, "rank " .. (rank - 1) .. " after " .. m.after)
    end
  end)
end)
