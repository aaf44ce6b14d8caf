-- ms.amp.GradScaler (fsdp.ShardedGradScaler): scale/backoff/growth sequences and unscaled
-- gradients against PyTorch's own, skips agreed by every rank, training parity, dcp, bad input.
local ms = require "moonshard"
local parity = require "support.parity"
local store_dirs = require "support.store_dirs"
local nn, optim, dist, fsdp, dcp, amp = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.dcp, ms.amp

-- Produced by PyTorch 2.15.0 (from PyPI, in a venv outside the repository, on the CPU) running each
-- scenario with torch.amp.GradScaler("cpu", **opts): one parameter p = zeros(4) (two for
-- two_optimizers, each with its own SGD(lr=0.5)), loss = sum(p * W) with W = {0.1, -2.5, 3e-3, 7}
-- ({0.1, -0.25, 3e-3, 0.5} for growth_past_max), scaler.scale(loss).backward(); `inject` then
-- writes inf/-inf/nan into p.grad[1]; `unscale` calls scaler.unscale_ first and records p.grad
-- (`grad`); then scaler.step for each optimizer (`stepped`: did p change), scaler.update(new_scale)
-- and the recorded get_scale() (`scale`) and _get_growth_tracker() (`tracker`). `params` are the
-- final parameters, `state_dict` the final scaler.state_dict().
-- TORCH_16BIT (below): torch._amp_foreach_non_finite_check_and_unscale_ (the kernel both scalers
-- call) on f16 and bf16 gradients `input` with inv_scale = float32(1 / float64(float32(scale))).
local TORCH = {
  powers_of_two = {
    scale_before_first_scale = 65536.0,
    params = {{-0.5000000596046448, 12.5, -0.015000001527369022, -35.0}},
    state_dict = {scale = 10001.0, growth_factor = 2.0, backoff_factor = 0.5, growth_interval = 3, _growth_tracker = 1},
    steps = {
      {stepped = {true}, scale = 65536.0, tracker = 1},
      {inject = "inf", stepped = {false}, scale = 32768.0, tracker = 0},
      {inject = "nan", stepped = {false}, scale = 16384.0, tracker = 0},
      {stepped = {true}, scale = 16384.0, tracker = 1},
      {unscale = true, stepped = {true}, scale = 16384.0, tracker = 2, grad = {0.10000000149011612, -2.5, 0.003000000026077032, 7.0}},
      {stepped = {true}, scale = 32768.0, tracker = 0},
      {stepped = {true}, scale = 32768.0, tracker = 1},
      {inject = "-inf", unscale = true, stepped = {false}, scale = 16384.0, tracker = 0, grad = {0.10000000149011612, -math.huge, 0.003000000026077032, 7.0}},
      {stepped = {true}, scale = 16384.0, tracker = 1},
      {new_scale = 5000.5, stepped = {true}, scale = 5000.5, tracker = 1},
      {stepped = {true}, scale = 5000.5, tracker = 2},
      {stepped = {true}, scale = 10001.0, tracker = 0},
      {unscale = true, stepped = {true}, scale = 10001.0, tracker = 1, grad = {0.10000000149011612, -2.5, 0.003000000026077032, 7.0}},
    },
  },
  odd_factors = {
    scale_before_first_scale = 3.3,
    params = {{-0.3500000238418579, 8.75, -0.010500000789761543, -24.5}},
    state_dict = {scale = 1.4591611623764038, growth_factor = 1.7, backoff_factor = 0.3, growth_interval = 2, _growth_tracker = 0},
    steps = {
      {unscale = true, stepped = {true}, scale = 3.299999952316284, tracker = 1, grad = {0.10000000894069672, -2.5, 0.003000000026077032, 7.000000476837158}},
      {unscale = true, stepped = {true}, scale = 5.610000133514404, tracker = 0, grad = {0.10000000894069672, -2.5, 0.003000000026077032, 7.000000476837158}},
      {unscale = true, stepped = {true}, scale = 5.610000133514404, tracker = 1, grad = {0.10000000894069672, -2.5, 0.003000000026077032, 7.0}},
      {inject = "inf", stepped = {false}, scale = 1.683000087738037, tracker = 0},
      {inject = "nan", unscale = true, stepped = {false}, scale = 0.5049000382423401, tracker = 0, grad = {0.10000000149011612, nan, 0.003000000026077032, 6.999999523162842}},
      {unscale = true, stepped = {true}, scale = 0.5049000382423401, tracker = 1, grad = {0.10000000149011612, -2.5, 0.003000000026077032, 7.000000476837158}},
      {unscale = true, stepped = {true}, scale = 0.8583300709724426, tracker = 0, grad = {0.10000000149011612, -2.5, 0.003000000026077032, 7.000000476837158}},
      {unscale = true, stepped = {true}, scale = 0.8583300709724426, tracker = 1, grad = {0.10000000149011612, -2.5, 0.0030000002589076757, 7.0}},
      {unscale = true, stepped = {true}, scale = 1.4591611623764038, tracker = 0, grad = {0.10000000149011612, -2.5, 0.0030000002589076757, 7.0}},
    },
  },
  two_optimizers = {
    scale_before_first_scale = 1024.0,
    params = {{-0.25, 6.25, -0.007500000298023224, -17.5}, {-0.25, 6.25, -0.007500000298023224, -17.5}},
    state_dict = {scale = 512.0, growth_factor = 2.0, backoff_factor = 0.5, growth_interval = 2, _growth_tracker = 0},
    steps = {
      {inject = {false, false}, stepped = {true, true}, scale = 1024.0, tracker = 1},
      {inject = {"inf", false}, stepped = {false, true}, scale = 512.0, tracker = 0},
      {inject = {false, false}, stepped = {true, true}, scale = 512.0, tracker = 1},
      {inject = {false, "nan"}, stepped = {true, false}, scale = 256.0, tracker = 0},
      {inject = {false, false}, stepped = {true, true}, scale = 256.0, tracker = 1},
      {inject = {false, false}, stepped = {true, true}, scale = 512.0, tracker = 0},
    },
  },
  overflow_to_infinity = {
    scale_before_first_scale = 4.253529586511731e+37,
    params = {{-0.10000000149011612, 2.5, -0.003000000026077032, -7.0}},
    state_dict = {scale = 8.507059173023462e+37, growth_factor = 4.0, backoff_factor = 0.5, growth_interval = 1, _growth_tracker = 0},
    steps = {
      {stepped = {true}, scale = 1.7014118346046923e+38, tracker = 0},
      {stepped = {false}, scale = 8.507059173023462e+37, tracker = 0},
      {stepped = {false}, scale = 4.253529586511731e+37, tracker = 0},
      {inject = "inf", stepped = {false}, scale = 2.1267647932558654e+37, tracker = 0},
      {stepped = {true}, scale = 8.507059173023462e+37, tracker = 0},
    },
  },
  growth_past_max = {
    scale_before_first_scale = 8.507059173023462e+37,
    params = {{-0.15000000596046448, 0.375, -0.0044999998062849045, -0.75}},
    state_dict = {scale = 1.7014118346046923e+38, growth_factor = 4.0, backoff_factor = 0.5, growth_interval = 1, _growth_tracker = 0},
    steps = {
      {stepped = {true}, scale = 8.507059173023462e+37, tracker = 0},
      {stepped = {true}, scale = 8.507059173023462e+37, tracker = 0},
      {inject = "nan", stepped = {false}, scale = 4.253529586511731e+37, tracker = 0},
      {stepped = {true}, scale = 1.7014118346046923e+38, tracker = 0},
    },
  },
}

local TORCH_16BIT = {
  {dtype = "f16", scale = 3.3, input = {0.0999755859375, -2.5, 0.0030002593994140625, 7.0, 1000.0, -0.012298583984375, 60000.0, 0.00010001659393310547}, unscaled = {0.0302886962890625, -0.7578125, 0.0009093284606933594, 2.12109375, 303.0, -0.003726959228515625, 18176.0, 3.0279159545898438e-05}, found = 0},
  {dtype = "f16", scale = 1024.0, input = {0.0999755859375, -2.5, 0.0030002593994140625, 7.0, 1000.0, -0.012298583984375, 60000.0, 0.00010001659393310547}, unscaled = {9.763240814208984e-05, -0.00244140625, 2.9206275939941406e-06, 0.0068359375, 0.9765625, -1.2040138244628906e-05, 58.59375, 1.1920928955078125e-07}, found = 0},
  {dtype = "f16", scale = 0.37, input = {0.0999755859375, -2.5, 0.0030002593994140625, 7.0, 1000.0, -0.012298583984375, 60000.0, 0.00010001659393310547}, unscaled = {0.270263671875, -6.7578125, 0.00811004638671875, 18.921875, 2702.0, -0.033233642578125, math.huge, 0.0002703666687011719}, found = 0},
  {dtype = "f16", scale = 2.0, input = {1.0, math.huge, 2.0}, unscaled = {0.5, math.huge, 1.0}, found = 1},
  {dtype = "bf16", scale = 3.3, input = {0.10009765625, -2.5, 0.0030059814453125, 7.0, 1000.0, -0.0123291015625, 3.00405527047391e+38, 0.00010013580322265625}, unscaled = {0.0302734375, -0.7578125, 0.000911712646484375, 2.125, 304.0, -0.0037384033203125, 9.105211771126674e+37, 3.039836883544922e-05}, found = 0},
  {dtype = "bf16", scale = 1024.0, input = {0.10009765625, -2.5, 0.0030059814453125, 7.0, 1000.0, -0.0123291015625, 3.00405527047391e+38, 0.00010013580322265625}, unscaled = {9.775161743164062e-05, -0.00244140625, 2.9355287551879883e-06, 0.0068359375, 0.9765625, -1.2040138244628906e-05, 2.9336477250721776e+35, 9.778887033462524e-08}, found = 0},
  {dtype = "bf16", scale = 0.37, input = {0.10009765625, -2.5, 0.0030059814453125, 7.0, 1000.0, -0.0123291015625, 3.00405527047391e+38, 0.00010013580322265625}, unscaled = {0.271484375, -6.75, 0.00811767578125, 18.875, 2704.0, -0.033203125, math.huge, 0.000270843505859375}, found = 0},
  {dtype = "bf16", scale = 2.0, input = {1.0, math.huge, 2.0}, unscaled = {0.5, math.huge, 1.0}, found = 1},
}

-- under mpirun the ranks are the busted process: leave no garbage to later spec files
after_each(function() collectgarbage(); collectgarbage() end)

local W = {0.1, -2.5, 3e-3, 7.0}
local INJECT = {inf = math.huge, ["-inf"] = -math.huge, nan = 0 / 0}

local function loss_of(model, tokens, targets)
  return nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
end

local function same_number(expected, got)
  if expected ~= expected then return got ~= got end
  return expected == got
end

local function assert_numbers(expected, got, what)
  assert.equal(#expected, #got, what)
  for i, e in ipairs(expected) do
    assert.is_true(same_number(e, got[i]), ("%s[%d]: expected %.17g, got %.17g"):format(what, i, e, got[i]))
  end
end

-- Write value into element index (0-based, row-major) of t.
local function poke(t, index, value)
  ms.no_grad(function() t:view(-1):narrow(0, index, 1):fill_(value) end)
end

local function snapshot(t) return ms.no_grad(function() return t:clone() end) end

local function run_scenario(case, opts, weights, n)
  local ps, opts_ = {}, {}
  for k = 1, n do
    ps[k] = ms.zeros(4, {requires_grad = true})
    opts_[k] = optim.SGD({ps[k]}, {lr = 0.5})
  end
  local scaler = amp.GradScaler(opts)
  local w = ms.tensor(weights)
  assert.equal(case.scale_before_first_scale, scaler:get_scale())
  for i, it in ipairs(case.steps) do
    local label = ("step %d"):format(i)
    for _, o in ipairs(opts_) do o:zero_grad() end
    local loss = (ps[1] * w):sum()
    for k = 2, n do loss = loss + (ps[k] * w):sum() end
    scaler:scale(loss):backward()
    for k = 1, n do
      local inject = it.inject
      if type(inject) == "table" then inject = inject[k] end
      if inject then poke(ps[k].grad, 1, INJECT[inject]) end
    end
    local before = {}
    for k = 1, n do before[k] = snapshot(ps[k]) end
    if it.unscale then
      scaler:unscale_(opts_[1])
      assert_numbers(it.grad, ps[1].grad:table(), label .. " unscaled grad")
    end
    for k = 1, n do assert.is_nil(scaler:step(opts_[k])) end
    for k = 1, n do assert.equal(it.stepped[k], not ms.equal(before[k], ps[k]), label .. " stepped") end
    scaler:update(it.new_scale)
    assert.equal(it.scale, scaler:get_scale(), label .. " scale")
    assert.equal(it.tracker, scaler:state_dict()._growth_tracker, label .. " growth tracker")
  end
  for k = 1, n do assert_numbers(case.params[k], ps[k]:table(), "params") end
  assert.same(case.state_dict, scaler:state_dict())
end

describe("amp.GradScaler against PyTorch", function()
  local scenarios = {
    {"powers_of_two", {growth_interval = 3}, W, 1},
    {"odd_factors", {init_scale = 3.3, growth_factor = 1.7, backoff_factor = 0.3, growth_interval = 2}, W, 1},
    {"two_optimizers", {init_scale = 1024, growth_interval = 2}, W, 2},
    {"overflow_to_infinity", {init_scale = 2 ^ 125, growth_factor = 4, growth_interval = 1}, W, 1},
    {"growth_past_max", {init_scale = 2 ^ 126, growth_factor = 4, growth_interval = 1}, {0.1, -0.25, 3e-3, 0.5}, 1},
  }
  for _, s in ipairs(scenarios) do
    it("gives PyTorch's skips, scales, growth trackers and unscaled gradients: " .. s[1], function()
      run_scenario(TORCH[s[1]], s[2], s[3], s[4])
    end)
  end

  for _, case in ipairs(TORCH_16BIT) do
    it(("unscales %s gradients as PyTorch does (f32 math, one rounding), scale %g"):format(case.dtype, case.scale), function()
      local p = ms.zeros(#case.input, {dtype = case.dtype})
      local opt = optim.SGD({p}, {lr = 0.5})
      local scaler = amp.GradScaler({init_scale = case.scale})
      scaler:scale(ms.tensor({1.0}))
      p.grad = ms.tensor(case.input, {dtype = case.dtype})
      scaler:unscale_(opt)
      assert.equal(case.dtype, p.grad:dtype())
      assert_numbers(case.unscaled, p.grad:table(), "unscaled")
      local scale = scaler:get_scale()
      scaler:update()
      assert.equal(case.found == 1 and scale * 0.5 or scale, scaler:get_scale())
    end)
  end

  it("is fsdp.ShardedGradScaler, takes PyTorch's leading device argument and has PyTorch's defaults", function()
    assert.equal(amp.GradScaler, fsdp.ShardedGradScaler)
    local scaler = amp.GradScaler("cuda", {growth_interval = 5})
    assert.same({scale = 65536, growth_factor = 2, backoff_factor = 0.5, growth_interval = 5, _growth_tracker = 0},
                scaler:state_dict())
    assert.same({scale = 65536, growth_factor = 2, backoff_factor = 0.5, growth_interval = 2000, _growth_tracker = 0},
                amp.GradScaler():state_dict())
    assert.is_true(scaler:is_enabled())
    scaler:set_growth_factor(3)
    scaler:set_backoff_factor(0.25)
    scaler:set_growth_interval(9)
    assert.same({3, 0.25, 9}, {scaler:get_growth_factor(), scaler:get_backoff_factor(), scaler:get_growth_interval()})
  end)

  it("step() after unscale_() does not unscale again; step returns what optimizer:step returns", function()
    local p = ms.zeros(4, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1})
    local plain_step = opt.step
    function opt:step(...)
      plain_step(self, ...)
      return "stepped"
    end
    local scaler = amp.GradScaler({init_scale = 8})
    scaler:scale((p * ms.tensor(W)):sum()):backward()
    scaler:unscale_(opt)
    local once = p.grad:table()
    assert.equal("stepped", scaler:step(opt))
    assert_numbers(once, p.grad:table(), "grad after step")
    assert_numbers(ms.tensor(W):neg():table(), p:table(), "params")
    scaler:update()
    opt:zero_grad()
    scaler:scale((p * ms.tensor(W)):sum()):backward()
    poke(p.grad, 0, 0 / 0)
    assert.is_nil(scaler:step(opt))
  end)
end)

describe("amp.GradScaler with FSDP", function()
  -- A clean step, then a step with inf/NaN written into one element of one rank's gradient
  -- shard (the other ranks' shards are finite), then another clean step.
  local function poisoned_step(size, config)
    return dist.spawn(size, function(rank)
      ms.manual_seed(0)
      local opts = {sharding_strategy = config.strategy, auto_wrap_policy = fsdp.wrap_policy({parity.Block}),
                    cpu_offload = {offload_params = config.offload or false}}
      if config.mesh_shape then
        opts.device_mesh = dist.init_device_mesh(config.mesh_shape, {mesh_dim_names = {"replicate", "shard"}})
      end
      local model = fsdp.FSDP(parity.Model(), opts)
      local params = model:parameters()
      local opt = optim.Adam(params, {lr = 0.01})
      local scaler = fsdp.ShardedGradScaler({init_scale = 1024, growth_interval = 1000})
      local per_rank = parity.GLOBAL_BATCH / size
      local function backward(step)
        opt:zero_grad()
        local tokens, targets = parity.batch(step)
        local loss = loss_of(model, tokens:narrow(0, rank * per_rank, per_rank),
                             targets:narrow(0, rank * per_rank, per_rank))
        scaler:scale(loss):backward()
      end
      local function locals()
        local out = {}
        for name, p in model:named_parameters() do out[name] = snapshot(p:to_local()) end
        return out
      end
      local function unchanged(before)
        for name, p in model:named_parameters() do
          if not ms.equal(before[name], p:to_local()) then return false end
        end
        return true
      end
      backward(1)
      scaler:step(opt)
      scaler:update()
      backward(2)
      local poked
      if rank == config.bad_rank then
        for name, p in model:named_parameters() do
          local g = p.grad:to_local()
          if g:numel() > 0 then
            poke(g, g:numel() - 1, INJECT[config.value])
            poked = name
            break
          end
        end
      end
      local before = locals()
      local returned = scaler:step(opt)
      local skipped = unchanged(before)
      scaler:update()
      local scale_after_skip = scaler:get_scale()
      backward(3)
      scaler:step(opt)
      scaler:update()
      return {skipped = skipped, poked = poked, returned = tostring(returned), scale = scale_after_skip,
              moved_after = not unchanged(before), adam_step = opt.state[params[1]].step}
    end)
  end

  for _, config in ipairs({
    {name = "FULL_SHARD, inf on rank 1 of 2", size = 2, strategy = "FULL_SHARD", bad_rank = 1, value = "inf"},
    {name = "FULL_SHARD, NaN on rank 2 of 4", size = 4, strategy = "FULL_SHARD", bad_rank = 2, value = "nan"},
    {name = "FULL_SHARD, -inf on rank 0 of 4", size = 4, strategy = "FULL_SHARD", bad_rank = 0, value = "-inf"},
    {name = "FULL_SHARD with CPU offload, inf on rank 0 of 2", size = 2, strategy = "FULL_SHARD", offload = true,
     bad_rank = 0, value = "inf"},
    {name = "NO_SHARD, NaN on rank 1 of 2", size = 2, strategy = "NO_SHARD", bad_rank = 1, value = "nan"},
    {name = "HYBRID_SHARD on a 2x2 mesh, inf on rank 3", size = 4, strategy = "HYBRID_SHARD", mesh_shape = {2, 2},
     bad_rank = 3, value = "inf"},
  }) do
    it("skips the step on every rank and backs off when one rank's shard is non-finite: " .. config.name, function()
      local results = poisoned_step(config.size, config)
      assert.equal(config.size, #results)
      for rank, res in ipairs(results) do
        assert.is_true(res.skipped, ("rank %d stepped"):format(rank - 1))
        assert.equal((rank - 1 == config.bad_rank) and "string" or "nil", type(res.poked))
        assert.equal("nil", res.returned)
        assert.equal(512, res.scale)
        assert.is_true(res.moved_after)
        assert.equal(2, res.adam_step)
      end
    end)
  end

  it("all-reduces found_inf over a given process_group for plain (unsharded) parameters", function()
    local function run(with_group)
      return dist.spawn(2, function(rank)
        local p = ms.zeros(4, {requires_grad = true})
        local opt = optim.SGD({p}, {lr = 0.5})
        local scaler = amp.GradScaler({process_group = with_group and dist.new_group({0, 1}) or nil})
        scaler:scale((p * ms.tensor(W)):sum()):backward()
        if rank == 1 then poke(p.grad, 2, math.huge) end
        scaler:step(opt)
        scaler:update()
        return {moved = not ms.equal(p, ms.zeros(4)), scale = scaler:get_scale()}
      end)
    end
    assert.same({{moved = false, scale = 32768}, {moved = false, scale = 32768}}, run(true))
    -- without a group, plain parameters are checked where they are (PyTorch's GradScaler)
    assert.same({{moved = true, scale = 65536}, {moved = false, scale = 32768}}, run(false))
  end)
end)

describe("scaled training", function()
  -- Adam on the parity model over batches first..last, the loss times loss_factor (1 unless
  -- given); scaler_opts nil trains unscaled.
  local function train(scaler_opts, first, last, loss_factor)
    ms.manual_seed(0)
    local model = parity.Model()
    local opt = optim.Adam(model:parameters(), {lr = 0.01})
    local scaler = scaler_opts and amp.GradScaler(scaler_opts)
    local scales, stepped = {}, {}
    for step = first, last do
      opt:zero_grad()
      local tokens, targets = parity.batch(step)
      local loss = loss_of(model, tokens, targets) * (loss_factor or 1)
      if scaler then
        scaler:scale(loss):backward()
        local before = snapshot(model.head.weight)
        scaler:step(opt)
        stepped[#stepped + 1] = not ms.equal(before, model.head.weight)
        scaler:update()
        scales[#scales + 1] = scaler:get_scale()
      else
        loss:backward()
        opt:step()
      end
    end
    return model, scales, stepped
  end

  local function compare(reference, model, exact)
    local worst = 0
    for name, p in model:named_parameters() do
      local r = reference[name]
      if exact then
        assert.is_true(ms.equal(r, p), name .. " differs")
      else
        for i, v in ipairs(p:reshape(-1):table()) do
          local e = r:reshape(-1):table()[i]
          worst = math.max(worst, math.abs(v - e))
        end
      end
    end
    return worst
  end

  local function params_of(model)
    local out = {}
    for name, p in model:named_parameters() do out[name] = snapshot(p) end
    return out
  end

  it("matches the unscaled f32 run bitwise with power-of-two scales (scaling by 2^k is exact)", function()
    local reference = params_of(train(nil, 1, 6))
    local model, scales, stepped = train({growth_interval = 2}, 1, 6)
    assert.same({65536, 131072, 131072, 262144, 262144, 524288}, scales)
    assert.same({true, true, true, true, true, true}, stepped)
    compare(reference, model, true)
  end)

  it("matches the unscaled f32 run to rounding with a scale that is not a power of two", function()
    local reference = params_of(train(nil, 1, 6))
    local model = train({init_scale = 3.3, growth_factor = 1.7, growth_interval = 2}, 1, 6)
    -- each unscaled gradient is within 2 f32 roundings (2^-23 relative) of the unscaled run's;
    -- Adam's step moves a parameter by at most lr (0.01) per step, so over 6 steps the drift
    -- stays far below 1e-6
    local worst = compare(reference, model, false)
    assert.is_true(worst < 1e-6, ("parameters differ by %.3g"):format(worst))
  end)

  it("skips the steps whose scaled gradients overflow f32, then trains as the unscaled run", function()
    -- loss * 16 at scale 2^127: backward overflows f32 until the scale has backed off enough
    local model, scales, stepped = train({init_scale = 2 ^ 127, growth_interval = 1000}, 1, 8, 16)
    local skipped = 0
    while stepped[skipped + 1] == false do skipped = skipped + 1 end
    assert.is_true(skipped >= 1, "no step overflowed")
    assert.is_true(skipped < 8, "every step overflowed")
    for i = skipped + 1, 8 do assert.is_true(stepped[i]) end
    assert.equal(2 ^ (127 - skipped), scales[8])
    compare(params_of(train(nil, skipped + 1, 8, 16)), model, true)
  end)

  it("matches the unscaled FSDP run bitwise on 2 ranks, with clip_grad_norm_ between unscale_ and step", function()
    local function run(scaled)
      return dist.spawn(2, function(rank, size)
        ms.manual_seed(0)
        local model = fsdp.FSDP(parity.Model(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
        local opt = optim.Adam(model:parameters(), {lr = 0.01})
        local scaler = fsdp.ShardedGradScaler({init_scale = 2 ^ 20, growth_interval = 2, enabled = scaled})
        local norms = {}
        local per_rank = parity.GLOBAL_BATCH / size
        for step = 1, 4 do
          opt:zero_grad()
          local tokens, targets = parity.batch(step)
          local loss = loss_of(model, tokens:narrow(0, rank * per_rank, per_rank),
                               targets:narrow(0, rank * per_rank, per_rank))
          scaler:scale(loss):backward()
          scaler:unscale_(opt)
          norms[step] = fsdp.clip_grad_norm_(model, 0.05)
          scaler:step(opt)
          scaler:update()
        end
        local out = {scale = scaler:get_scale(), norms = norms}
        for name, p in model:named_parameters() do out[name] = p:full_tensor():reshape(-1):table() end
        return out
      end)
    end
    local plain, scaled = run(false), run(true)
    assert.equal(1, plain[1].scale)
    assert.equal(2 ^ 22, scaled[1].scale)
    assert.is_true(plain[1].norms[1] > 0.05, "clipping did nothing")
    plain[1].scale, scaled[1].scale = nil, nil
    assert.same(plain[1], scaled[1])
  end)
end)

describe("GradScaler state through dcp", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  local function iterate(scaler, p, opt, inject)
    opt:zero_grad()
    scaler:scale((p * ms.tensor(W)):sum()):backward()
    if inject then poke(p.grad, 0, math.huge) end
    scaler:step(opt)
    scaler:update()
    return scaler:get_scale()
  end

  -- one rank (under mpirun a plain dcp call would be a collective of the whole world)
  it("saves the scaler as a Stateful object and a fresh one continues the same sequence", function()
    dist.spawn(1, function()
      local opts = {init_scale = 3.3, growth_factor = 1.7, backoff_factor = 0.3, growth_interval = 3}
      local a = amp.GradScaler(opts)
      local pa = ms.zeros(4, {requires_grad = true})
      local oa = optim.SGD({pa}, {lr = 0.1})
      for _, inject in ipairs({false, true, false, false}) do iterate(a, pa, oa, inject) end
      local saved = a:state_dict()
      assert.equal(2, saved._growth_tracker)
      dcp.save({scaler = a}, dir)
      local b = amp.GradScaler()
      dcp.load({scaler = b}, dir)
      assert.same(saved, b:state_dict())
      local pb = ms.zeros(4, {requires_grad = true})
      local ob = optim.SGD({pb}, {lr = 0.1})
      for i, inject in ipairs({false, false, true, false, false, false}) do
        assert.equal(iterate(a, pa, oa, inject), iterate(b, pb, ob, inject), ("iteration %d"):format(i))
      end
      assert.same(a:state_dict(), b:state_dict())
    end)
  end)

  it("round-trips with an FSDP model and optimizer on 2 ranks", function()
    local results = dist.spawn(2, function(rank, size)
      local codes = {}
      for i = 1, 256 do codes[i] = i <= #dir and dir:byte(i) or 0 end
      local bytes = ms.tensor(codes, {dtype = "u8"})
      dist.broadcast(bytes, 0)
      local chars = {}
      for _, b in ipairs(bytes:table()) do
        if b == 0 then break end
        chars[#chars + 1] = string.char(b)
      end
      local path = table.concat(chars)
      local function build()
        ms.manual_seed(0)
        local model = fsdp.FSDP(parity.Model(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
        return model, optim.Adam(model:parameters(), {lr = 0.01})
      end
      local model, opt = build()
      local scaler = fsdp.ShardedGradScaler({init_scale = 2 ^ 10, growth_interval = 2})
      local per_rank = parity.GLOBAL_BATCH / size
      for step = 1, 3 do
        opt:zero_grad()
        local tokens, targets = parity.batch(step)
        scaler:scale(loss_of(model, tokens:narrow(0, rank * per_rank, per_rank),
                             targets:narrow(0, rank * per_rank, per_rank))):backward()
        scaler:step(opt)
        scaler:update()
      end
      local msd, osd = dcp.get_state_dict(model, opt)
      dcp.save({model = msd, optim = osd, scaler = scaler}, path)
      local model2, opt2 = build()
      local scaler2 = fsdp.ShardedGradScaler()
      local msd2, osd2 = dcp.get_state_dict(model2, opt2)
      dcp.load({model = msd2, optim = osd2, scaler = scaler2}, path)
      return {saved = scaler:state_dict(), loaded = scaler2:state_dict()}
    end)
    for _, res in ipairs(results) do
      assert.same({scale = 2048, growth_factor = 2, backoff_factor = 0.5, growth_interval = 2, _growth_tracker = 1},
                  res.saved)
      assert.same(res.saved, res.loaded)
    end
  end)

  it("saves a disabled scaler as an empty state and loads it as a no-op", function()
    dist.spawn(1, function()
      dcp.save({scaler = amp.GradScaler({enabled = false}), w = ms.ones(2)}, dir)
      local target = {scaler = amp.GradScaler({enabled = false}), w = ms.zeros(2)}
      dcp.load(target, dir)
      assert.same({}, target.scaler:state_dict())
      assert.same({1, 1}, target.w:table())
    end)
  end)
end)

describe("a disabled GradScaler", function()
  it("passes everything through", function()
    local p = ms.zeros(4, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1})
    local scaler = amp.GradScaler({enabled = false, init_scale = 8})
    assert.is_false(scaler:is_enabled())
    local loss = (p * ms.tensor(W)):sum()
    assert.is_true(rawequal(loss, scaler:scale(loss)))
    local outputs = {loss}
    assert.is_true(rawequal(outputs, scaler:scale(outputs)))
    loss:backward()
    scaler:unscale_(opt)
    assert_numbers(ms.tensor(W):table(), p.grad:table(), "grad")
    assert.equal("from closure", scaler:step(opt, function() return "from closure" end))
    assert_numbers(ms.tensor(W):neg():table(), p:table(), "params")
    scaler:update()
    assert.equal(1, scaler:get_scale())
    assert.same({}, scaler:state_dict())
    scaler:load_state_dict({})
    assert.equal(1, scaler:get_scale())
  end)
end)

describe("GradScaler bad input", function()
  local function expect_error(pattern, fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "no error for " .. pattern)
    assert.matches(pattern, tostring(err), 1, true)
  end

  local function setup_scaled(opts)
    local p = ms.zeros(4, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 0.5})
    local scaler = amp.GradScaler(opts)
    scaler:scale((p * ms.tensor(W)):sum()):backward()
    return scaler, opt, p
  end

  it("rejects bad options", function()
    expect_error("moonshard: GradScaler: unknown option 'init'", amp.GradScaler, {init = 1})
    expect_error("moonshard: GradScaler: growth_factor must be a finite number > 1, got 1", amp.GradScaler,
                 {growth_factor = 1})
    expect_error("moonshard: GradScaler: backoff_factor must be a number in (0, 1), got 1", amp.GradScaler,
                 {backoff_factor = 1})
    expect_error("moonshard: GradScaler: backoff_factor must be a number in (0, 1), got 0", amp.GradScaler,
                 {backoff_factor = 0})
    expect_error("moonshard: GradScaler: growth_interval must be a positive integer, got 0", amp.GradScaler,
                 {growth_interval = 0})
    expect_error("moonshard: GradScaler: growth_interval must be a positive integer, got 1.5", amp.GradScaler,
                 {growth_interval = 1.5})
    expect_error("moonshard: GradScaler: init_scale must be a positive number that fits in f32, got -1",
                 amp.GradScaler, {init_scale = -1})
    expect_error("moonshard: GradScaler: init_scale must be a positive number that fits in f32, got 1e+39",
                 amp.GradScaler, {init_scale = 1e39})
    expect_error("moonshard: GradScaler: enabled must be true or false, got yes", amp.GradScaler, {enabled = "yes"})
    expect_error("moonshard: GradScaler: options must be a table, got number", amp.GradScaler, 5)
    expect_error("moonshard: GradScaler: process_group must come from dist.new_group", amp.GradScaler,
                 {process_group = {}})
    local scaler = amp.GradScaler()
    expect_error("moonshard: GradScaler.set_growth_factor: growth_factor must be a finite number > 1, got 0.5",
                 scaler.set_growth_factor, scaler, 0.5)
    expect_error("moonshard: GradScaler.set_growth_interval: growth_interval must be a positive integer",
                 scaler.set_growth_interval, scaler, -3)
  end)

  it("rejects outputs that are not float tensors", function()
    local scaler = amp.GradScaler()
    expect_error("moonshard: GradScaler.scale: outputs must be floating-point tensors, got i64", scaler.scale,
                 scaler, ms.tensor({1, 2}, {dtype = "i64"}))
    expect_error("moonshard: GradScaler.scale: outputs must be a tensor or a table of tensors, got string",
                 scaler.scale, scaler, {ms.tensor({1}), "loss"})
    expect_error("moonshard: GradScaler.scale: call it as a method (scaler:scale(...))", scaler.scale, ms.tensor({1}))
    local two = scaler:scale({a = ms.tensor({1}), b = {ms.tensor({2})}})
    assert.same({a = {65536}, b = {{131072}}}, {a = two.a:table(), b = {two.b[1]:table()}})
  end)

  it("refuses to unscale, step or update before anything was scaled", function()
    local p = ms.zeros(4, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 0.5})
    local scaler = amp.GradScaler()
    ;(p * ms.tensor(W)):sum():backward()
    local hint = "This may indicate your script did not use scaler:scale(loss or outputs) earlier in the iteration."
    expect_error("moonshard: GradScaler.unscale_: Attempted unscale_ but _scale is None. " .. hint, scaler.unscale_,
                 scaler, opt)
    expect_error("moonshard: GradScaler.step: No inf checks were recorded for this optimizer: Attempted step but " ..
                 "_scale is None. " .. hint, scaler.step, scaler, opt)
    expect_error("moonshard: GradScaler.update: Attempted update but _scale is None.", scaler.update, scaler)
    assert.same({0, 0, 0, 0}, p:table())
  end)

  it("refuses a step on gradients that were not scaled since the last update", function()
    local scaler, opt, p = setup_scaled()
    scaler:step(opt)
    scaler:update()
    local before = snapshot(p)
    opt:zero_grad()
    ;(p * ms.tensor(W)):sum():backward()
    expect_error("moonshard: GradScaler.step: No inf checks were recorded for this optimizer: the gradients were " ..
                 "not scaled: no scaler:scale(loss) since the last update()", scaler.step, scaler, opt)
    expect_error("moonshard: GradScaler.unscale_: the gradients were not scaled", scaler.unscale_, scaler, opt)
    assert.is_true(ms.equal(before, p))
  end)

  it("refuses a step on an optimizer whose parameters have no gradients", function()
    local scaler = setup_scaled()
    local q = ms.zeros(3, {requires_grad = true})
    local other = optim.SGD({q}, {lr = 0.5})
    expect_error("moonshard: GradScaler.step: No inf checks were recorded for this optimizer", scaler.step, scaler,
                 other)
    expect_error("moonshard: GradScaler.update: No inf checks were recorded prior to update()", scaler.update, scaler)
  end)

  it("follows PyTorch's per-optimizer stages", function()
    local scaler, opt = setup_scaled()
    scaler:unscale_(opt)
    expect_error("moonshard: GradScaler.unscale_: unscale_() has already been called on this optimizer since the " ..
                 "last update().", scaler.unscale_, scaler, opt)
    scaler:step(opt)
    expect_error("moonshard: GradScaler.unscale_: unscale_() is being called after step().", scaler.unscale_, scaler,
                 opt)
    expect_error("moonshard: GradScaler.step: step() has already been called since the last update().", scaler.step,
                 scaler, opt)
    scaler:update()
    expect_error("moonshard: GradScaler.step: Closure use is not currently supported if GradScaler is enabled.",
                 scaler.step, scaler, opt, function() end)
    expect_error("moonshard: GradScaler.step: expected an optimizer (with param_groups and step), got string",
                 scaler.step, scaler, "adam")
  end)

  it("rejects a gradient that is not floating-point, before unscaling anything", function()
    local scaler, opt, p = setup_scaled()
    local q = ms.zeros(2)
    q.grad = ms.tensor({1, 2}, {dtype = "i32"})
    opt:add_param_group({params = {q}})
    local before = snapshot(p.grad)
    expect_error("moonshard: GradScaler.unscale_: parameter 1 has a i32 gradient; only floating-point gradients",
                 scaler.unscale_, scaler, opt)
    assert.is_true(ms.equal(before, p.grad))
  end)

  it("rejects a bad new_scale and bad state dicts", function()
    local scaler, opt = setup_scaled()
    scaler:step(opt)
    expect_error("moonshard: GradScaler.update: new_scale should be a number or a 1-element tensor with " ..
                 "requires_grad=false, got a tensor of 2 elements", scaler.update, scaler, ms.tensor({1, 2}))
    expect_error("moonshard: GradScaler.update: new_scale must be a positive number that fits in f32, got 0",
                 scaler.update, scaler, 0)
    scaler:update(ms.tensor({256}))
    assert.equal(256, scaler:get_scale())
    expect_error("moonshard: GradScaler.load_state_dict: The source state dict is empty, possibly because it was " ..
                 "saved from a disabled instance of GradScaler.", scaler.load_state_dict, scaler, {})
    expect_error("moonshard: GradScaler.load_state_dict: the state dict has no '_growth_tracker'",
                 scaler.load_state_dict, scaler, {scale = 2, growth_factor = 2, backoff_factor = 0.5,
                                                  growth_interval = 3})
    expect_error("moonshard: GradScaler.load_state_dict: _growth_tracker must be a non-negative integer, got -1",
                 scaler.load_state_dict, scaler, {scale = 2, growth_factor = 2, backoff_factor = 0.5,
                                                  growth_interval = 3, _growth_tracker = -1})
    assert.equal(256, scaler:get_scale())
  end)
end)
