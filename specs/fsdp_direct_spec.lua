-- FSDP parameters of 256Ki elements or more whose rows split evenly over the shard group are
-- gathered straight into their unsharded tensors and reduce-scattered straight from their
-- gradients (one collective each); the unit's other parameters share its flat buffer. The
-- parity model with wide blocks (fc1.weight [43692, 6] and fc2.weight [6, 43692], 262152
-- elements each) mixes both: trained sharded, it must match the unsharded model, and each
-- parameter that can go direct must have its own reduce-scatter. Under NO_SHARD, gradients of 256Ki elements or more are
-- all-reduced where backward left them, the others through one flat buffer per unit.
local parity = require "support.parity"

local STEPS = 3
local TOLERANCE = 1e-5
local HIDDEN = 43692 -- divisible by 2, 3 and 4: fc1.weight's rows split evenly on each

-- Reduce-scatters of one backward with layer wrapping: per block one for its flat buffer
-- plus one per direct parameter (fc1.weight always; fc2.weight's 6 rows split evenly on 2
-- and 3 ranks only), one for the root's flat buffer.
local function reduce_scatters(shard_size)
  local direct = 6 % shard_size == 0 and 2 or 1
  return 2 * (1 + direct) + 1
end

describe("FSDP direct parameters", function()
  local reference
  setup(function() reference = parity.reference(STEPS, HIDDEN) end)

  local cases = {
    {strategy = "FULL_SHARD", world = 2}, {strategy = "FULL_SHARD", world = 3}, {strategy = "FULL_SHARD", world = 4},
    {strategy = "SHARD_GRAD_OP", world = 2}, {strategy = "SHARD_GRAD_OP", world = 4},
    {strategy = "FULL_SHARD", world = 2, offload = true}, {strategy = "FULL_SHARD", world = 4, forward_prefetch = true},
    {strategy = "HYBRID_SHARD", world = 4, mesh_shape = {2, 2}},
    {strategy = "NO_SHARD", world = 2}, {strategy = "NO_SHARD", world = 3},
    {strategy = "NO_SHARD", world = 2, offload = true},
  }
  for _, case in ipairs(cases) do
    local name = ("%s on %d ranks%s%s%s"):format(case.strategy, case.world, case.offload and ", offload" or "",
                                               case.forward_prefetch and ", forward_prefetch" or "",
                                               case.mesh_shape and ", 2x2 mesh" or "")
    it(name .. " matches the unsharded model, one collective per direct parameter", function()
      local runs = parity.sharded(STEPS, case.world, {strategy = case.strategy, wrap = "layer", hidden = HIDDEN,
                                                      offload = case.offload, mesh_shape = case.mesh_shape,
                                                      forward_prefetch = case.forward_prefetch})
      assert.equal(case.world, #runs)
      parity.expect_match(runs, reference, TOLERANCE)
      local shard_size = case.mesh_shape and case.mesh_shape[2] or case.world
      for rank, run in ipairs(runs) do
        if case.strategy == "NO_SHARD" then
          -- per block: the flat buffer, fc1.weight and fc2.weight; the root's flat buffer
          assert.equal(7, run.stats.all_reduces, "rank " .. (rank - 1))
        else
          assert.equal(reduce_scatters(shard_size), run.stats.reduce_scatters, "rank " .. (rank - 1))
        end
      end
    end)
  end
end)
