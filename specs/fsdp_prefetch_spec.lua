-- FSDP prefetching: forward_prefetch and backward_prefetch (BACKWARD_PRE, BACKWARD_POST)
-- give the same training as the unsharded model and bitwise the same as no prefetching,
-- issue no extra all-gathers, and hold exactly one more unit's all-gather buffer at the
-- moments the allocator's statistics are read inside forward and backward. A unit gathered
-- ahead that the iteration does not use is freed by the end of backward.
local ms = require "moonshard"
local parity = require "support.parity"
local nn, dist, fsdp = ms.nn, ms.dist, ms.fsdp

local STEPS = 3
local TOLERANCE = 1e-5

describe("FSDP prefetching", function()
  local reference
  setup(function() reference = parity.reference(STEPS) end)

  local cases = {
    {strategy = "FULL_SHARD", wrap = "layer", world = 2},
    {strategy = "FULL_SHARD", wrap = "nested", world = 3},
    {strategy = "SHARD_GRAD_OP", wrap = "nested", world = 2},
    {strategy = "FULL_SHARD", wrap = "layer", world = 2, offload = true},
    {strategy = "HYBRID_SHARD", wrap = "layer", world = 4, mesh_shape = {2, 2}},
  }
  for _, case in ipairs(cases) do
    for _, backward in ipairs({"BACKWARD_PRE", "BACKWARD_POST"}) do
      it(("%s, %s wrapping on %d ranks%s: forward_prefetch + %s match the unsharded model and no prefetching bitwise")
           :format(case.strategy, case.wrap, case.world, case.offload and ", offload" or "", backward), function()
        local config = {strategy = case.strategy, wrap = case.wrap, offload = case.offload, mesh_shape = case.mesh_shape}
        local plain = parity.sharded(STEPS, case.world, config)
        config.forward_prefetch, config.backward_prefetch = true, backward
        local prefetched = parity.sharded(STEPS, case.world, config)
        parity.expect_match(prefetched, reference, TOLERANCE)
        for rank, run in ipairs(prefetched) do
          assert.are.same(plain[rank].losses, run.losses, "rank " .. (rank - 1) .. " losses")
          assert.are.same(plain[rank].params, run.params, "rank " .. (rank - 1) .. " parameters")
          assert.are.same(plain[rank].grads, run.grads, "rank " .. (rank - 1) .. " gradients")
        end
      end)
    end
  end

  -- ---- memory and collectives, read from inside the layers ----
  local WORLD, LAYERS, DIM, F32 = 4, 4, 64, 4
  -- one Linear(DIM, DIM) unit's all-gather output: every rank's ceil(DIM / WORLD) rows of
  -- weight and bias
  local GATHERED_BYTES = WORLD * math.ceil(DIM / WORLD) * (DIM + 1) * F32

  -- A layer that reads the allocator right after its Linear's forward and, in backward,
  -- right after the Linear's backward (an identity node in front of it).
  local Probe = nn.Module:extend("PrefetchProbe")
  function Probe:__init(index, marks)
    self.linear = nn.Linear(DIM, DIM)
    self.index, self.marks = index, marks
  end
  function Probe:forward(x)
    local marks, index = self.marks, self.index
    local through = ms.no_grad(function() return x * 1 end)
    ms.autograd.record(through, "Probe", function(_, g)
      marks.backward[index] = ms.memory_stats("cpu").allocated - marks.base
      return g
    end, x)
    local y = self.linear(through)
    marks.forward[index] = ms.memory_stats("cpu").allocated - marks.base
    return y
  end

  -- Two iterations (the first records the order) on WORLD ranks; what the second saw.
  local function probe(opts, skip_in_second)
    return dist.spawn(WORLD, function()
      ms.set_default_dtype("f32") -- under mpirun the parity runs above share this process
      ms.manual_seed(0)
      local marks = {forward = {}, backward = {}, base = 0}
      local layers = {}
      for i = 1, LAYERS do layers[i] = Probe(i, marks) end
      local model = nn.Sequential(unpack(layers))
      if skip_in_second then
        function model:forward(x)
          for i, layer in ipairs(layers) do
            if not (self.skip and i == skip_in_second) then x = layer(x) end
          end
          return x
        end
      end
      opts.auto_wrap_policy = fsdp.wrap_policy({nn.Linear})
      model = fsdp.FSDP(model, opts)
      local x = ms.randn(1, DIM):requires_grad_(true)
      model(x):sum():backward()
      for _, p in ipairs(model:parameters()) do p.grad = nil end
      collectgarbage("collect") -- the dropped gradients' memory goes back now, and no
      collectgarbage("stop")    -- collection frees anything while the probes read
      model.skip = true
      fsdp.reset_stats()
      local base = ms.memory_stats("cpu").allocated
      marks.base = base
      ms.reset_peak_memory_stats("cpu")
      model(x):sum():backward()
      collectgarbage("restart")
      local grads = {}
      for name, p in model:named_parameters() do grads[name] = p.grad and p.grad:full_tensor():reshape(-1):table() or "none" end
      return {forward = marks.forward, backward = marks.backward, peak = ms.memory_stats("cpu").peak - base,
              after = ms.memory_stats("cpu").allocated - base, gathers = fsdp.stats().all_gathers, grads = grads}
    end)
  end

  it("forward_prefetch holds the next unit's all-gather while a unit computes, and no extra all-gathers", function()
    local plain = probe({backward_prefetch = false})
    local ahead = probe({forward_prefetch = true, backward_prefetch = false})
    for rank = 1, WORLD do
      for i = 1, LAYERS do
        local expected = i < LAYERS and GATHERED_BYTES or 0
        assert.are.equal(expected, ahead[rank].forward[i] - plain[rank].forward[i],
                         ("rank %d layer %d"):format(rank - 1, i))
        assert.are.equal(plain[rank].backward[i], ahead[rank].backward[i], ("rank %d layer %d backward"):format(rank - 1, i))
      end
      assert.are.equal(plain[rank].gathers, ahead[rank].gathers)
      assert.are.equal(2 * LAYERS, plain[rank].gathers) -- FULL_SHARD: once in forward, once in backward
      assert.are.equal(plain[rank].after, ahead[rank].after)
    end
  end)

  for _, mode in ipairs({"BACKWARD_PRE", "BACKWARD_POST"} ) do
    it(mode .. " holds the previous unit's all-gather once a unit's backward has run", function()
      local plain = probe({backward_prefetch = false})
      local ahead = probe({backward_prefetch = mode})
      for rank = 1, WORLD do
        for i = 1, LAYERS do
          -- layer 1 comes last in backward: the root before it owns no parameters
          local expected = i > 1 and GATHERED_BYTES or 0
          assert.are.equal(expected, ahead[rank].backward[i] - plain[rank].backward[i],
                           ("rank %d layer %d"):format(rank - 1, i))
          assert.are.equal(plain[rank].forward[i], ahead[rank].forward[i])
        end
        assert.are.equal(plain[rank].gathers, ahead[rank].gathers)
        assert.are.equal(plain[rank].after, ahead[rank].after)
        -- at most one more all-gather buffer than without prefetching
        assert.is_true(ahead[rank].peak <= plain[rank].peak + GATHERED_BYTES,
                       ("rank %d peak %d vs %d"):format(rank - 1, ahead[rank].peak, plain[rank].peak))
      end
    end)
  end

  it("frees a unit gathered ahead that the iteration skips, with gradients as without prefetching", function()
    local plain = probe({backward_prefetch = false}, 3)
    local ahead = probe({forward_prefetch = true, backward_prefetch = "BACKWARD_PRE"}, 3)
    for rank = 1, WORLD do
      assert.are.equal(plain[rank].after, ahead[rank].after, "rank " .. (rank - 1) .. " after backward")
      assert.are.same(plain[rank].grads, ahead[rank].grads)
      -- the skipped layer was gathered ahead once and never used
      assert.are.equal(plain[rank].gathers + 1, ahead[rank].gathers)
    end
  end)

  it("is off by default on host backends and rejects unknown settings", function()
    dist.spawn(2, function()
      local model = fsdp.FSDP(nn.Linear(4, 4))
      assert.is_false(fsdp.unit_of(model).tree.backward_prefetch)
      assert.is_false(fsdp.unit_of(model).tree.forward_prefetch)
      local chosen = fsdp.FSDP(nn.Linear(4, 4), {backward_prefetch = fsdp.BackwardPrefetch.BACKWARD_POST})
      assert.are.equal("BACKWARD_POST", fsdp.unit_of(chosen).tree.backward_prefetch)
      assert.has_error(function() fsdp.FSDP(nn.Linear(4, 4), {backward_prefetch = "BACKWARD_SOON"}) end,
                       "moonshard: FSDP: unknown backward_prefetch 'BACKWARD_SOON' (expected BACKWARD_PRE, BACKWARD_POST or false)")
      assert.has_error(function() fsdp.FSDP(nn.Linear(4, 4), {forward_prefetch = "yes"}) end,
                       "moonshard: FSDP: forward_prefetch must be true or false, got yes")
    end)
  end)
end)
