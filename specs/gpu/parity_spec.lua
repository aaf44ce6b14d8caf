-- Parity on device: the small transformer-like model of specs/support/parity.lua trained on
-- cuda:0 matches the same training on the CPU, and FSDP over nccl (one GPU per rank)
-- matches the unsharded CPU run, for every sharding strategy that needs no 2-D mesh.
local ms = require "moonshard"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp
local gpu = require "gpu.helpers"
local parity = require "support.parity"

local STEPS = 3

local function loss_of(model, tokens, targets)
  local logits = model(tokens)
  return nn.F.cross_entropy(logits:view(-1, parity.VOCAB), targets:reshape(-1))
end

-- Losses and final parameters of STEPS Adam steps on device (f32).
local function train(device)
  ms.manual_seed(0)
  local model = parity.Model()
  model:to(device)
  local opt = optim.Adam(model:parameters(), {lr = 0.01})
  local losses = {}
  for step = 1, STEPS do
    local tokens, targets = parity.batch(step)
    opt:zero_grad()
    local loss = loss_of(model, tokens:to(device), targets:to(device))
    loss:backward()
    opt:step()
    losses[step] = loss:to("cpu"):item()
  end
  local params = {}
  for name, p in model:named_parameters() do params[name] = ms.keep(p:detach():to("cpu")) end
  return losses, params
end

describe("parity on a device #gpu", function()
  local missing = gpu.missing_devices(1)
  if missing then
    pending(missing)
    return
  end

  it("trains the parity model on the device like on the CPU", function()
    local cpu_losses, cpu_params = train("cpu")
    local device_losses, device_params = train(gpu.device)
    for step = 1, STEPS do
      assert.is_true(math.abs(cpu_losses[step] - device_losses[step]) < 1e-4,
                     string.format("step %d: %g vs %g", step, cpu_losses[step], device_losses[step]))
    end
    for name, p in pairs(cpu_params) do
      assert.is_true(ms.allclose(device_params[name], p, {rtol = 1e-4, atol = 1e-5}), name)
    end
  end)
end)

describe("FSDP over nccl #gpu", function()
  local size = gpu.world_size()
  local missing = gpu.missing_devices(2)
  if missing then
    pending(missing)
    return
  end

  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
    it("matches the unsharded run with " .. strategy, function()
      local reference = parity.reference(STEPS)
      local results = dist.spawn(size, function(rank)
        return gpu.with_nccl(function()
          local device = gpu.rank_device(rank)
          ms.set_default_dtype("f64")
          ms.manual_seed(0)
          local model = parity.Model()
          model:to(device)
          fsdp.FSDP(model, {sharding_strategy = strategy,
                            auto_wrap_policy = fsdp.wrap_policy{parity.Block}})
          local opt = optim.Adam(model:parameters(), {lr = 0.01})
          local losses = {}
          local per_rank = parity.GLOBAL_BATCH / size
          for step = 1, STEPS do
            local tokens, targets = parity.batch(step)
            tokens = tokens:narrow(0, rank * per_rank, per_rank):contiguous():to(device)
            targets = targets:narrow(0, rank * per_rank, per_rank):contiguous():to(device)
            opt:zero_grad()
            local loss = loss_of(model, tokens, targets)
            loss:backward()
            opt:step()
            local global = loss:detach():clone()
            dist.all_reduce(global, "avg")
            losses[step] = global:to("cpu"):item()
          end
          return losses
        end)
      end)
      for r = 1, size do
        for step = 1, STEPS do
          assert.is_true(math.abs(results[r][step] - reference.losses[step]) < 1e-6,
                         string.format("rank %d step %d: %g vs %g", r - 1, step, results[r][step],
                                       reference.losses[step]))
        end
      end
    end)
  end
end)
