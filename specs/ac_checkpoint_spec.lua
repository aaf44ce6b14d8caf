-- Activation checkpointing in one process: every variant (functional, wrappers, reentrant
-- and not, selective, offload, nested) trains bitwise like the model without it; dropout
-- masks replay; names do not change; counters count; bad input gets clear errors.
local ms = require "moonshard"
local nn, ac, optim = ms.nn, ms.ac, ms.optim

local models = require "support.ac_models"
local global_state = require "support.global_state"

local DIM, BATCH = models.DIM, 5
local Block, Model, each_block = models.Block, models.Model, models.each_block

local function reentrant(m) return ac.checkpoint_wrapper(m, {checkpoint_impl = "reentrant"}) end
local function selective(m) return ac.checkpoint_wrapper(m, {policy = ac.default_policy}) end

-- {name, prepare = fn(model) -> model, call = fn(model, x) -> output}
local variants = {
  {"checkpoint_wrapper (no_reentrant) on each block", each_block(ac.checkpoint_wrapper)},
  {"checkpoint_wrapper (reentrant) on each block", each_block(reentrant)},
  {"selective checkpointing with the default policy", each_block(selective)},
  {"selective checkpointing, reentrant", each_block(function(m)
    return ac.checkpoint_wrapper(m, {checkpoint_impl = "reentrant", policy = ac.default_policy})
  end)},
  {"offload_wrapper on each block", each_block(ac.offload_wrapper)},
  {"apply_activation_checkpointing with check_fn", function(model)
    return ac.apply_activation_checkpointing(model, {check_fn = function(m) return m.__name == "Block" end})
  end},
  {"apply_activation_checkpointing on every submodule (nested regions)", function(model)
    return ac.apply_activation_checkpointing(model)
  end},
  {"apply_activation_checkpointing with a reentrant checkpoint_wrapper_fn", function(model)
    return ac.apply_activation_checkpointing(model, {check_fn = function(m) return m.__name == "Linear" end,
                                                      checkpoint_wrapper_fn = reentrant})
  end},
  {"ac.checkpoint around the whole model", nil, function(model, x) return ac.checkpoint(model, x) end},
  {"ac.checkpoint with use_reentrant around the whole model", nil, function(model, x)
    return ac.checkpoint(model, x, {use_reentrant = true})
  end},
  {"reentrant checkpoint around non-reentrant blocks", each_block(ac.checkpoint_wrapper), function(model, x)
    return ac.checkpoint(model, x, {use_reentrant = true})
  end},
  {"non-reentrant checkpoint around reentrant blocks", each_block(reentrant), function(model, x)
    return ac.checkpoint(model, x)
  end},
  {"selective checkpoint around selective blocks", each_block(selective), function(model, x)
    return ac.checkpoint(model, x, {policy = ac.default_policy})
  end},
  {"save_on_cpu around the forward", nil, function(model, x)
    return ac.save_on_cpu(function() return model(x) end, {pin_memory = true})
  end},
  {"offload around checkpointed blocks", each_block(ac.checkpoint_wrapper), function(model, x)
    return ac.save_on_cpu(function() return model(x) end)
  end},
  {"offload around reentrant checkpointed blocks", each_block(reentrant), function(model, x)
    return ac.save_on_cpu(function() return model(x) end)
  end},
  {"save_on_cpu around a reentrant checkpoint of the whole model", nil, function(model, x)
    return ac.save_on_cpu(function() return ac.checkpoint(model, x, {use_reentrant = true}) end)
  end},
  {"checkpoint around offloaded blocks", each_block(ac.offload_wrapper), function(model, x)
    return ac.checkpoint(model, x)
  end},
}

-- Two training steps; returns every loss, output, input gradient and parameter gradient.
local function train(prepare, call)
  ms.manual_seed(0)
  local model = Model()
  if prepare then model = prepare(model) end
  local opt = optim.SGD(model:parameters(), {lr = 0.1, momentum = 0.9})
  local record = {}
  for step = 1, 2 do
    ms.manual_seed(100 + step)
    local x = ms.randn(BATCH, DIM, {requires_grad = true})
    opt:zero_grad()
    local out = call and call(model, x) or model(x)
    local loss = (out * out):mean()
    loss:backward()
    record[#record + 1] = ms.keep(loss:detach())
    record[#record + 1] = ms.keep(out:detach())
    record[#record + 1] = ms.keep(x.grad)
    for _, p in ipairs(model:parameters()) do record[#record + 1] = ms.keep(p.grad:clone()) end
    opt:step()
  end
  return record
end

local function free_all(tensors) for _, t in ipairs(tensors) do t:free() end end

local function assert_bitwise(expected, got)
  assert.equal(#expected, #got)
  for i = 1, #expected do
    assert.is_true(ms.equal(expected[i], got[i]), "tensor " .. i .. " differs")
  end
  free_all(got)
end

before_each(global_state.save)
after_each(global_state.restore)

describe("activation checkpointing", function()
  local reference
  setup(function() reference = train() end)
  teardown(function() free_all(reference) end)

  describe("bitwise parity with the model without checkpointing", function()
    for _, variant in ipairs(variants) do
      it(variant[1], function()
        ac.reset_stats()
        assert_bitwise(reference, train(variant[2], variant[3]))
        local counted = ac.stats()
        assert.is_true(counted.recomputed > 0 or counted.offload_regions > 0)
      end)
    end
  end)

  describe("dropout in a recomputed region", function()
    -- x.grad comes from the dropout node's mask, w.grad from the recomputed dropout output
    local function region(x, w) return nn.F.dropout(x, 0.5, true) * w end
    for _, reentrant_flag in ipairs({false, true}) do
      local label = reentrant_flag and "reentrant" or "non-reentrant"
      local function grads_of(opts)
        ms.manual_seed(7)
        local x = ms.ones(4, 8, {requires_grad = true})
        local w = ms.full({4, 8}, 3, {requires_grad = true})
        local y = opts and ac.checkpoint(region, x, w, opts) or region(x, w)
        ms.rand(16) -- the stream moves on between forward and backward
        y:backward(ms.ones(4, 8))
        return x.grad, w.grad, y
      end
      it(label .. ": draws the same mask when it is recomputed", function()
        local expected_x, expected_w, y0 = grads_of(nil)
        local got_x, got_w, y1 = grads_of({use_reentrant = reentrant_flag})
        assert.is_true(ms.equal(y0, y1))
        assert.is_true(ms.equal(expected_x, got_x))
        assert.is_true(ms.equal(expected_w, got_w))
        -- a real mask: some elements dropped, the others scaled by 1 / (1 - p)
        local xs, ws, zeros = got_x:reshape(-1):table(), got_w:reshape(-1):table(), 0
        for i = 1, #xs do
          if xs[i] == 0 then
            zeros = zeros + 1
            assert.equal(0, ws[i])
          else
            assert.equal(6, xs[i])
            assert.equal(2, ws[i])
          end
        end
        assert.is_true(zeros > 0 and zeros < #xs)
      end)
      it(label .. ": without preserve_rng_state the recomputed mask differs", function()
        local _, expected_w = grads_of(nil)
        local _, got_w = grads_of({use_reentrant = reentrant_flag, preserve_rng_state = false})
        assert.is_false(ms.equal(expected_w, got_w))
      end)
    end
  end)

  describe("selective checkpointing", function()
    local function region(model, x) return model.fc2(model.act(model.fc1(x))):sum() end
    local function run(policy)
      ms.manual_seed(3)
      local block = Block()
      local x = ms.randn(BATCH, DIM, {requires_grad = true})
      ac.reset_stats()
      local loss = ac.checkpoint(region, block, x, {policy = policy})
      loss:backward()
      return ac.stats(), x.grad, block.fc1.weight.grad
    end

    it("hands back the matrix products' outputs instead of recomputing them", function()
      local counted = run(ac.default_policy)
      assert.equal(1, counted.recomputed)
      assert.equal(2, counted.reused_outputs)
    end)

    it("asks the policy about each matrix product and follows it", function()
      local asked = {}
      local counted = run(function(op)
        asked[#asked + 1] = op
        return "recompute"
      end)
      assert.equal(0, counted.reused_outputs)
      assert.same({"linear", "linear", "linear", "linear"}, asked) -- forward, then recomputation
      assert.same({"linear", "matmul"}, ac.policy_ops)
    end)

    it("gives the gradients of the model without checkpointing", function()
      ms.manual_seed(3)
      local block = Block()
      local x = ms.randn(BATCH, DIM, {requires_grad = true})
      region(block, x):backward()
      local _, gx, gw = run(ac.default_policy)
      assert.is_true(ms.equal(x.grad, gx))
      assert.is_true(ms.equal(block.fc1.weight.grad, gw))
    end)

    it("covers matmul as well as linear", function()
      local x = ms.randn(3, 4, {requires_grad = true})
      local w = ms.randn(4, 4, {requires_grad = true})
      ac.reset_stats()
      local y = ac.checkpoint(function(a, b) return (a:matmul(b):tanh()):matmul(b):sum() end, x, w,
                              {policy = ac.default_policy})
      y:backward()
      assert.equal(2, ac.stats().reused_outputs)
    end)

    it("refuses a policy answer other than save or recompute", function()
      assert.has_error(function() run(function() return "keep" end) end,
        "moonshard: checkpoint: the policy returned keep for op 'linear' (expected 'save' or 'recompute')")
    end)

    it("refuses a policy that is not a function", function()
      assert.has_error(function() ac.checkpoint_wrapper(Block(), {policy = "matmul"}) end,
        "moonshard: checkpoint_wrapper: policy must be callable as policy(op_name) -> 'save' | 'recompute', got string")
    end)

    it("detects a kept output modified in place before recomputation", function()
      local x = ms.randn(3, 4, {requires_grad = true})
      local lin = nn.Linear(4, 4)
      local kept
      local y = ac.checkpoint(function(a)
        local h = lin(a)
        kept = ms.keep(h)
        return h:tanh():sum()
      end, x, {policy = ac.default_policy})
      ms.no_grad(function() kept:add_(1) end)
      assert.has_error(function() y:backward() end,
        "moonshard: checkpoint: the output of op 'linear' kept by the policy was modified in place " ..
        "after the forward pass; recompute that op or avoid the in-place change")
    end)
  end)

  describe("wrappers keep names", function()
    local wrappers = {
      checkpoint_wrapper = ac.checkpoint_wrapper, reentrant = reentrant, selective = selective,
      offload_wrapper = ac.offload_wrapper,
    }
    for label, wrapper in pairs(wrappers) do
      it(label .. ": parameter names and state-dict keys are those of the unwrapped model", function()
        ms.manual_seed(0)
        local plain = Model()
        ms.manual_seed(0)
        local wrapped = Model()
        for _, block in wrapped.blocks:ipairs() do assert.equal(block, wrapper(block)) end
        local plain_names, wrapped_names = {}, {}
        for name in plain:named_parameters() do plain_names[#plain_names + 1] = name end
        for name in wrapped:named_parameters() do wrapped_names[#wrapped_names + 1] = name end
        assert.same(plain_names, wrapped_names)
        assert.equal("blocks.0.fc1.weight", wrapped_names[3])
        local sd = plain:state_dict()
        local result = wrapped:load_state_dict(sd)
        assert.same({}, result.missing_keys)
        assert.same({}, result.unexpected_keys)
        for key in pairs(wrapped:state_dict()) do assert.is_not_nil(sd[key], key) end
      end)
    end

    it("apply_activation_checkpointing leaves the root unwrapped and names unchanged", function()
      local model = Model()
      local before = {}
      for name in model:named_parameters() do before[#before + 1] = name end
      ac.apply_activation_checkpointing(model)
      local after = {}
      for name in model:named_parameters() do after[#after + 1] = name end
      assert.same(before, after)
      assert.is_nil(ac.wrapper_of(model))
      assert.equal("checkpoint_wrapper", ac.wrapper_of(model.blocks:get(1).fc1))
    end)
  end)

  describe("counters", function()
    it("count regions recomputed per backward", function()
      local model = each_block(ac.checkpoint_wrapper)(Model())
      ac.reset_stats()
      local x = ms.randn(BATCH, DIM, {requires_grad = true})
      model(x):sum():backward()
      -- each block ends in fc2, whose saves (its input and weight) end the recomputation
      -- before its product is computed
      assert.same({recomputed = 3, reused_outputs = 0, skipped_ops = 3, offload_regions = 0, offloaded_bytes = 0},
                  ac.stats())
      model(x):sum():backward()
      assert.equal(6, ac.stats().recomputed)
    end)

    it("count exactly the bytes offloaded", function()
      local lin = nn.Linear(4, 3)
      local x = ms.randn(5, 4, {requires_grad = true})
      ac.reset_stats()
      local y = ac.save_on_cpu(function() return lin(x):sum() end)
      -- linear saves its input and its weight
      assert.same({recomputed = 0, reused_outputs = 0, skipped_ops = 0, offload_regions = 1,
                   offloaded_bytes = x:nbytes() + lin.weight:nbytes()}, ac.stats())
      y:backward()
      assert.equal(x:nbytes() + lin.weight:nbytes(), ac.stats().offloaded_bytes)
    end)

    it("count the inputs of a reentrant region offloaded by save_on_cpu, and move them to the host", function()
      local lin = nn.Linear(4, 3)
      local x = ms.randn(5, 4, {requires_grad = true})
      local h = x * 2
      local host_before = ms.memory_stats("host").allocated
      ac.reset_stats()
      local y = ac.save_on_cpu(function() return ac.checkpoint(lin, h, {use_reentrant = true}) end)
      -- the region runs without grad: only its input is saved, as save_for_backward does
      assert.same({recomputed = 0, reused_outputs = 0, skipped_ops = 0, offload_regions = 1, offloaded_bytes = h:nbytes()},
                  ac.stats())
      assert.equal(host_before + h:nbytes(), ms.memory_stats("host").allocated)
      y:sum():backward()
      assert.equal(host_before, ms.memory_stats("host").allocated)
      assert.equal(1, ac.stats().recomputed)
      local plain = x * 2
      local direct_x = x.grad:clone()
      x.grad = nil
      lin.weight.grad = nil
      lin(plain):sum():backward()
      assert.is_true(ms.equal(direct_x, x.grad))
    end)

    it("keep a reentrant region's inputs on the node under a user's saved-tensor hooks", function()
      local lin = nn.Linear(4, 3)
      local x = ms.randn(5, 4, {requires_grad = true})
      local packed, unpacked = 0, 0
      local y = ms.autograd.saved_tensors_hooks(function(t) packed = packed + 1; return t end,
                                                function(t) unpacked = unpacked + 1; return t end,
                                                function() return ac.checkpoint(lin, x, {use_reentrant = true}) end)
      assert.equal(1, packed)
      y:sum():backward()
      assert.equal(1, unpacked)
    end)

    it("count nothing for a region run without grad", function()
      local model = each_block(ac.checkpoint_wrapper)(Model())
      ac.reset_stats()
      ms.no_grad(function() model(ms.randn(BATCH, DIM)) end)
      assert.equal(0, ac.stats().recomputed)
    end)
  end)

  describe("recomputation", function()
    for _, reentrant_flag in ipairs({false, true}) do
      it((reentrant_flag and "reentrant" or "non-reentrant") .. ": runs the region " ..
         (reentrant_flag and "to its end" or "only up to its last save"), function()
        local tail_runs = 0
        local x = ms.randn(3, 3, {requires_grad = true})
        local y = ac.checkpoint(function(a)
          local h = a:tanh()
          tail_runs = tail_runs + 1
          return h * 2
        end, x, {use_reentrant = reentrant_flag})
        y:sum():backward()
        assert.equal(reentrant_flag and 2 or 1, tail_runs)
        local expected = (1 - x:tanh() * x:tanh()) * 2
        assert.is_true(ms.allclose(expected, x.grad, {rtol = 1e-6, atol = 1e-7}))
      end)
    end
  end)

  describe("backward through a region twice", function()
    for _, reentrant_flag in ipairs({false, true}) do
      local label = reentrant_flag and "reentrant" or "non-reentrant"
      local function make()
        ms.manual_seed(5)
        local lin = nn.Linear(4, 4)
        local x = ms.randn(2, 4, {requires_grad = true})
        return lin, x
      end
      it(label .. ": without retain_graph is a clear error", function()
        local lin, x = make()
        local y = ac.checkpoint(function(a) return lin(a):tanh() end, x, {use_reentrant = reentrant_flag})
        local g = ms.ones(2, 4)
        y:backward(g)
        assert.has_error(function() y:backward(g) end,
          "moonshard: backward: trying to backward through the graph a second time (or to use saved " ..
          "tensors after they were freed); pass {retain_graph = true} to the first backward")
      end)
      it(label .. ": with retain_graph accumulates like the model without checkpointing", function()
        local lin, x = make()
        local y = lin(x):tanh()
        local g = ms.ones(2, 4)
        y:backward(g, {retain_graph = true})
        y:backward(g)
        local expected_x, expected_w = x.grad, lin.weight.grad
        lin, x = make()
        y = ac.checkpoint(function(a) return lin(a):tanh() end, x, {use_reentrant = reentrant_flag})
        y:backward(g, {retain_graph = true})
        y:backward(g)
        assert.is_true(ms.equal(expected_x, x.grad))
        assert.is_true(ms.equal(expected_w, lin.weight.grad))
      end)
    end
  end)

  describe("bad input", function()
    for _, reentrant_flag in ipairs({false, true}) do
      local label = reentrant_flag and "reentrant" or "non-reentrant"
      local opts = {use_reentrant = reentrant_flag}

      it(label .. ": a function returning no tensor", function()
        local x = ms.randn(2, 2, {requires_grad = true})
        local expected = reentrant_flag and
          "moonshard: checkpoint: with use_reentrant the function must return one tensor, got number" or
          "moonshard: checkpoint: the checkpointed function returned no tensor (got number)"
        assert.has_error(function() ac.checkpoint(function(a) return 42 end, x, opts) end, expected)
      end)

      it(label .. ": an input modified in place before recomputation", function()
        local lin = nn.Linear(3, 3)
        local x = ms.randn(2, 3, {requires_grad = true})
        local y = ac.checkpoint(function(a) return lin(a):tanh():sum() end, x, opts)
        ms.no_grad(function() x:mul_(2) end)
        assert.has_error(function() y:backward() end,
          "moonshard: checkpoint: input 1 was modified in place after the forward pass and before " ..
          "recomputation (version 1, expected 0)")
      end)
    end

    it("a region that saves different tensors when recomputed", function()
      local width = 3
      local x = ms.randn(2, 3, {requires_grad = true})
      local y = ac.checkpoint(function(a)
        local w = ms.ones(3, width, {requires_grad = true})
        return a:matmul(w):sum()
      end, x)
      width = 5
      assert.has_error(function() y:backward() end,
        "moonshard: checkpoint: recomputed tensor 2 has shape [3, 5], the forward pass saved shape " ..
        "[3, 3] (the region is not deterministic or its inputs changed)")
    end)

    it("a region that saves a different number of tensors when recomputed", function()
      local calls = 0
      local x = ms.randn(2, 3, {requires_grad = true})
      local y = ac.checkpoint(function(a)
        calls = calls + 1
        local h = a:tanh()
        if calls == 1 then h = h:tanh() end
        return h:sum()
      end, x)
      assert.has_error(function() y:backward() end,
        "moonshard: checkpoint: recomputation saved 1 tensors, the forward pass saved 2 (the region " ..
        "is not deterministic or its inputs changed)")
    end)

    it("a function that is not callable", function()
      assert.has_error(function() ac.checkpoint(42, ms.ones(1)) end,
        "moonshard: checkpoint: expected a function or a module to run, got number")
    end)

    it("an unknown option", function()
      assert.has_error(function() ac.checkpoint(function(a) return a end, ms.ones(1), {use_reentrnt = true, policy = ac.default_policy}) end,
        "moonshard: checkpoint: unknown option 'use_reentrnt' (expected use_reentrant, preserve_rng_state, policy)")
    end)

    it("wrapping something that is not a module, twice, or with an unknown implementation", function()
      assert.has_error(function() ac.checkpoint_wrapper(function() end) end,
        "moonshard: checkpoint_wrapper: expected an nn.Module, got function")
      local lin = ac.checkpoint_wrapper(nn.Linear(2, 2))
      assert.has_error(function() ac.offload_wrapper(lin) end,
        "moonshard: offload_wrapper: module Linear is already wrapped by checkpoint_wrapper")
      assert.has_error(function() ac.checkpoint_wrapper(nn.Linear(2, 2), {checkpoint_impl = "fast"}) end,
        "moonshard: checkpoint_wrapper: checkpoint_impl must be 'reentrant' or 'no_reentrant', got 'fast'")
    end)
  end)
end)
