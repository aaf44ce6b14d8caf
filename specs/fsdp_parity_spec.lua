-- FSDP parity: every sharding strategy, world sizes 1 to 4 (3 gives uneven shards and
-- ranks with empty shards; hybrid strategies on every 2-D mesh of those sizes), three ways
-- of wrapping and parameter offload on and off, each against the unsharded model trained
-- on the same global batch.
local parity = require "support.parity"

local STEPS = 3
local TOLERANCE = 1e-5

local reference

local function expect_match(runs, world_size)
  assert.equal(world_size, #runs)
  parity.expect_match(runs, reference, TOLERANCE)
end

describe("FSDP parity with the unsharded model", function()
  setup(function() reference = parity.reference(STEPS) end)

  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
    for world_size = 1, 4 do
      for _, wrap in ipairs({"root", "layer", "nested"}) do
        for _, offload in ipairs({false, true}) do
          it(("%s on %d ranks, %s wrapping, offload %s"):format(strategy, world_size, wrap, tostring(offload)), function()
            local runs = parity.sharded(STEPS, world_size, {strategy = strategy, wrap = wrap, offload = offload})
            expect_match(runs, world_size)
          end)
        end
      end
    end
  end

  for _, strategy in ipairs({"HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"}) do
    for _, mesh_shape in ipairs({{1, 1}, {1, 2}, {2, 1}, {1, 3}, {3, 1}, {2, 2}}) do
      for _, wrap in ipairs({"root", "layer", "nested"}) do
        for _, offload in ipairs({false, true}) do
          it(("%s on a %dx%d mesh, %s wrapping, offload %s"):format(strategy, mesh_shape[1], mesh_shape[2], wrap,
                                                                  tostring(offload)), function()
            local world_size = mesh_shape[1] * mesh_shape[2]
            local runs = parity.sharded(STEPS, world_size, {strategy = strategy, wrap = wrap, mesh_shape = mesh_shape,
                                                            offload = offload})
            expect_match(runs, world_size)
          end)
        end
      end
    end
  end
end)
