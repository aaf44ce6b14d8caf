-- FSDP training features: clip_grad_norm_ (global norm over shards and replicas, also with
-- offload), no_sync gradient accumulation, summon_full_params, and run-to-run determinism,
-- each against the unwrapped model on the same global batch.
local ms = require "moonshard"
local parity = require "support.parity"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local function flat(t) return t:reshape(-1):table() end

local function loss_of(model, tokens, targets)
  return nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
end

-- Gradients of the unwrapped model after backward over the global batches of the steps.
local function reference_grads(steps)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local model = parity.Model()
  for _, step in ipairs(steps) do
    local tokens, targets = parity.batch(step)
    loss_of(model, tokens, targets):backward()
  end
  local grads, sq = {}, 0
  for name, p in model:named_parameters() do
    grads[name] = flat(p.grad)
    for _, v in ipairs(grads[name]) do sq = sq + v * v end
  end
  ms.set_default_dtype("f32")
  return grads, math.sqrt(sq)
end

-- Build the FSDP model on this rank; config: {strategy, offload, mesh_shape}.
local function wrapped(config)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local opts = {sharding_strategy = config.strategy or "FULL_SHARD",
                cpu_offload = {offload_params = config.offload or false},
                auto_wrap_policy = fsdp.wrap_policy({parity.Block})}
  if config.mesh_shape then
    opts.device_mesh = dist.init_device_mesh(config.mesh_shape, {mesh_dim_names = {"replicate", "shard"}})
  end
  return fsdp.FSDP(parity.Model(), opts)
end

local function local_backward(model, step, rank, size)
  local tokens, targets = parity.batch(step)
  local per_rank = parity.GLOBAL_BATCH / size
  local loss = loss_of(model, tokens:narrow(0, rank * per_rank, per_rank), targets:narrow(0, rank * per_rank, per_rank))
  loss:backward()
  return loss
end

local function full_grads(model)
  local out = {}
  for name, p in model:named_parameters() do out[name] = flat(p.grad:full_tensor()) end
  return out
end

local function expect_close(expected, got, scale, tolerance)
  for name, values in pairs(expected) do
    local scaled = {}
    for i, v in ipairs(values) do scaled[i] = v * scale end
    local err = parity.max_relative_error(got[name], scaled)
    assert.is_true(err < tolerance, ("%s differs by %.3g"):format(name, err))
  end
end

before_each(global_state.save)
after_each(global_state.restore)

describe("fsdp.clip_grad_norm_", function()
  local grads, norm

  setup(function() grads, norm = reference_grads({1}) end)

  for _, config in ipairs({
    {name = "FULL_SHARD on 3 ranks", size = 3, strategy = "FULL_SHARD"},
    {name = "FULL_SHARD on 2 ranks with offload", size = 2, strategy = "FULL_SHARD", offload = true},
    {name = "NO_SHARD on 2 ranks", size = 2, strategy = "NO_SHARD"},
    {name = "HYBRID_SHARD on a 2x2 mesh", size = 4, strategy = "HYBRID_SHARD", mesh_shape = {2, 2}},
  }) do
    it("returns the global norm and scales every shard by one factor: " .. config.name, function()
      local max_norm = norm / 2
      local results = dist.spawn(config.size, function(rank, size)
        local model = wrapped(config)
        local_backward(model, 1, rank, size)
        local total = fsdp.clip_grad_norm_(model, max_norm)
        return {norm = total, grads = full_grads(model)}
      end)
      for _, res in ipairs(results) do
        assert.is_true(math.abs(res.norm - norm) / norm < 1e-9, ("norm %.12g vs %.12g"):format(res.norm, norm))
        expect_close(grads, res.grads, max_norm / (norm + 1e-6), 1e-9)
      end
    end)
  end

  it("leaves gradients alone when the norm is already below max_norm", function()
    local results = dist.spawn(2, function(rank, size)
      local model = wrapped({})
      local_backward(model, 1, rank, size)
      fsdp.clip_grad_norm_(model, norm * 10)
      return full_grads(model)
    end)
    expect_close(grads, results[1], 1, 1e-9)
  end)

  it("rejects a negative max_norm", function()
    local results = dist.spawn(1, function()
      local ok, err = pcall(fsdp.clip_grad_norm_, wrapped({}), -1)
      return {ok = ok, err = tostring(err)}
    end)
    assert.is_false(results[1].ok)
    assert.matches("clip_grad_norm_: max_norm must be a non%-negative number", results[1].err)
  end)
end)

describe("model:no_sync", function()
  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
    it("accumulates gradients locally and reduces them once afterwards: " .. strategy, function()
      local grads = reference_grads({1, 2, 3})
      local results = dist.spawn(2, function(rank, size)
        local model = wrapped({strategy = strategy})
        local reduced_inside = false
        model:no_sync(function()
          for step = 1, 2 do
            local_backward(model, step, rank, size)
            for _, p in model:named_parameters() do
              if rawget(p, "grad") then reduced_inside = true end
            end
          end
        end)
        local_backward(model, 3, rank, size)
        return {grads = full_grads(model), reduced_inside = reduced_inside}
      end)
      for _, res in ipairs(results) do
        assert.is_false(res.reduced_inside)
        expect_close(grads, res.grads, 1, 1e-9)
      end
    end)
  end
end)

describe("fsdp.summon_full_params", function()
  it("exposes whole parameters and writes changes back into the shards", function()
    local initial = {}
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    for name, p in parity.Model():named_parameters() do initial[name] = flat(p) end
    ms.set_default_dtype("f32")
    local results = dist.spawn(3, function()
      local model = wrapped({})
      local inside = {}
      fsdp.summon_full_params(model, function()
        for name, p in model:named_parameters() do inside[name] = flat(p) end
        ms.no_grad(function() model.head.bias:fill_(3) end)
      end)
      local after = flat(model.head.bias:full_tensor())
      fsdp.summon_full_params(model, function()
        ms.no_grad(function() model.head.bias:fill_(5) end)
      end, {writeback = false})
      return {inside = inside, after = after, not_written = flat(model.head.bias:full_tensor()),
              sharded_again = ms.is_dtensor(model.head.weight)}
    end)
    for _, res in ipairs(results) do
      assert.same(initial, res.inside)
      for _, v in ipairs(res.after) do assert.equal(3, v) end
      for _, v in ipairs(res.not_written) do assert.equal(3, v) end
      assert.is_true(res.sharded_again)
    end
  end)
end)

describe("FSDP determinism", function()
  it("gives bitwise identical losses and parameters for two runs of one configuration", function()
    local function run()
      return dist.spawn(3, function(rank, size)
        local model = wrapped({})
        local opt = optim.Adam(model:parameters(), {lr = 0.01})
        local losses = {}
        for step = 1, 3 do
          opt:zero_grad()
          losses[step] = local_backward(model, step, rank, size):item()
          opt:step()
        end
        local params = {}
        for name, p in model:named_parameters() do params[name] = flat(p:full_tensor()) end
        return {losses = losses, params = params}
      end)
    end
    local first, second = run(), run()
    assert.same(first, second)
  end)
end)
