-- FSDP flat buffers: a unit whose rows split evenly over the ranks fills its all-gather and
-- reduce-scatter buffers completely, so they are not zeroed first; a frozen parameter leaves
-- its slots of the reduce-scatter buffer unwritten. Gradients and updated parameters are
-- checked against the unwrapped model computed in f64 on the whole batch.
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local WORLD, DIM, BATCH, STEPS = 2, 6, 4, 2

local function build(freeze_bias)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local model = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
  if freeze_bias then model:get(3).bias.requires_grad = false end
  return model
end

local function batch(step)
  ms.manual_seed(100 + step)
  return ms.randn(BATCH, DIM), ms.randn(BATCH, DIM)
end

local function flat(t) return t:reshape(-1):table() end

-- Gradients after the last step and parameters after every step's update.
local function train(model, rank, size)
  local opt = optim.SGD(model:parameters(), {lr = 0.1})
  local grads = {}
  for step = 1, STEPS do
    opt:zero_grad()
    local x, y = batch(step)
    local per_rank = BATCH / size
    x, y = x:narrow(0, rank * per_rank, per_rank), y:narrow(0, rank * per_rank, per_rank)
    nn.F.mse_loss(model(x), y):backward()
    for name, p in model:named_parameters() do
      local g = p.grad
      if g and g.full_tensor then g = g:full_tensor() end
      grads[name] = g and flat(g) or "none"
    end
    opt:step()
  end
  local params = {}
  for name, p in model:named_parameters() do params[name] = flat(p.full_tensor and p:full_tensor() or p) end
  return {grads = grads, params = params}
end

local function expect_close(expected, got, label)
  assert.are.equal(#expected, #got, label)
  for i = 1, #expected do
    assert.is_true(math.abs(expected[i] - got[i]) <= 1e-12 * (1 + math.abs(expected[i])),
                   ("%s[%d]: %.17g against %.17g"):format(label, i, got[i], expected[i]))
  end
end

before_each(global_state.save)
after_each(global_state.restore)

describe("FSDP flat buffers of evenly split units", function()
  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP"}) do
    for _, freeze in ipairs({false, true}) do
      it(("%s, %s"):format(strategy, freeze and "a frozen bias in one unit" or "every parameter trained"), function()
        local expected = train(build(freeze), 0, 1)
        local runs = dist.spawn(WORLD, function(rank, size)
          local model = fsdp.FSDP(build(freeze), {sharding_strategy = strategy,
                                                  auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
          return train(model, rank, size)
        end)
        for rank, run in ipairs(runs) do
          for name, values in pairs(expected.grads) do
            local label = ("rank %d grad %s"):format(rank - 1, name)
            if values == "none" then assert.are.equal("none", run.grads[name], label)
            else expect_close(values, run.grads[name], label) end
          end
          for name, values in pairs(expected.params) do
            expect_close(values, run.params[name], ("rank %d param %s"):format(rank - 1, name))
          end
        end
      end)
    end
  end
end)
