-- Parity harness: trains the same small model unsharded in this process and sharded on
-- forked ranks over one global batch, and returns both runs' losses, parameters and
-- gradients as plain Lua arrays for comparison.
local ms = require "moonshard"
local assert = require "luassert"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local M = {}

M.VOCAB, M.DIM, M.HIDDEN, M.SEQ, M.GLOBAL_BATCH = 11, 6, 10, 3, 12

-- Embedding -> LayerNorm -> Linear -> GELU -> Linear over tokens [B, T].
local Block = nn.Module:extend("Block")
function Block:__init(dim, hidden)
  self.norm = nn.LayerNorm(dim)
  self.fc1 = nn.Linear(dim, hidden)
  self.act = nn.GELU()
  self.fc2 = nn.Linear(hidden, dim)
end
function Block:forward(x) return x + self.fc2(self.act(self.fc1(self.norm(x)))) end
M.Block = Block

local Model = nn.Module:extend("ParityModel")
function Model:__init(hidden)
  hidden = hidden or M.HIDDEN
  self.embed = nn.Embedding(M.VOCAB, M.DIM)
  self.blocks = nn.ModuleList({Block(M.DIM, hidden), Block(M.DIM, hidden)})
  self.head = nn.Linear(M.DIM, M.VOCAB)
end
function Model:forward(tokens)
  local x = self.embed(tokens)
  for _, block in self.blocks:ipairs() do x = block(x) end
  return self.head(x)
end
M.Model = Model

-- Deterministic batch for a step: tokens and targets [GLOBAL_BATCH, SEQ].
function M.batch(step)
  local tokens, targets = {}, {}
  for b = 1, M.GLOBAL_BATCH do
    tokens[b], targets[b] = {}, {}
    for t = 1, M.SEQ do
      tokens[b][t] = (b * 7 + t * 3 + step * 5) % M.VOCAB
      targets[b][t] = (b * 5 + t * 11 + step * 3) % M.VOCAB
    end
  end
  return ms.tensor(tokens, {dtype = "i64"}), ms.tensor(targets, {dtype = "i64"})
end

local function loss_of(model, tokens, targets)
  local logits = model(tokens)
  return nn.F.cross_entropy(logits:view(-1, M.VOCAB), targets:reshape(-1))
end

local function flat(t) return t:reshape(-1):table() end

local function reference(steps, hidden)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local model = Model(hidden)
  local opt = optim.Adam(model:parameters(), {lr = 0.01})
  local losses = {}
  for step = 1, steps do
    local tokens, targets = M.batch(step)
    opt:zero_grad()
    local loss = loss_of(model, tokens, targets)
    loss:backward()
    losses[step] = loss:item()
    if step < steps then opt:step() end
  end
  local params, grads = {}, {}
  for name, p in model:named_parameters() do
    params[name], grads[name] = flat(p), flat(p.grad)
  end
  return {losses = losses, params = params, grads = grads}
end

-- Unsharded run: {losses = {...}, params = {fqn = {...}}, grads = {fqn = {...}}}, in this
-- process; the default dtype and random state are as before afterwards. hidden: the
-- blocks' hidden width (default M.HIDDEN).
function M.reference(steps, hidden) return global_state.preserving(reference, steps, hidden) end

-- Sharded run on world_size ranks. config: {strategy, wrap = "root"|"layer"|"nested",
-- offload = bool, mesh_shape = {..}, forward_prefetch, backward_prefetch, hidden}. Each
-- rank's result also holds its fsdp.stats() of the last step (stats).
function M.sharded(steps, world_size, config)
  local results = dist.spawn(world_size, function(rank, size)
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    local model = Model(config.hidden)
    local opts = {sharding_strategy = config.strategy, cpu_offload = {offload_params = config.offload},
                  forward_prefetch = config.forward_prefetch, backward_prefetch = config.backward_prefetch}
    if config.mesh_shape then
      opts.device_mesh = dist.init_device_mesh(config.mesh_shape, {mesh_dim_names = {"replicate", "shard"}})
    end
    if config.wrap == "layer" then
      opts.auto_wrap_policy = fsdp.wrap_policy({Block})
    elseif config.wrap == "nested" then
      for _, block in model.blocks:ipairs() do
        fsdp.FSDP(block.fc1, {sharding_strategy = config.strategy, device_mesh = opts.device_mesh,
                              cpu_offload = opts.cpu_offload})
        fsdp.FSDP(block, {sharding_strategy = config.strategy, device_mesh = opts.device_mesh,
                          cpu_offload = opts.cpu_offload})
      end
    end
    model = fsdp.FSDP(model, opts)
    local opt = optim.Adam(model:parameters(), {lr = 0.01})
    local per_rank = M.GLOBAL_BATCH / size
    local losses, stats = {}, nil
    for step = 1, steps do
      local tokens, targets = M.batch(step)
      local mine = tokens:narrow(0, rank * per_rank, per_rank)
      local my_targets = targets:narrow(0, rank * per_rank, per_rank)
      opt:zero_grad()
      fsdp.reset_stats()
      local loss = loss_of(model, mine, my_targets)
      loss:backward()
      stats = fsdp.stats()
      local global = loss:detach():clone()
      dist.all_reduce(global, "avg")
      losses[step] = global:item()
      if step < steps then opt:step() end
    end
    local params, grads = {}, {}
    for name, p in model:named_parameters() do
      params[name] = flat(p:full_tensor())
      grads[name] = flat(p.grad:full_tensor())
    end
    return {losses = losses, params = params, grads = grads, stats = stats}
  end)
  return results
end

-- Every rank's losses, parameters and gradients of a sharded run are within tolerance of
-- the reference run's (relative error, see max_relative_error).
function M.expect_match(runs, reference, tolerance)
  for rank, run in ipairs(runs) do
    for step = 1, #reference.losses do
      assert.is_true(M.max_relative_error({run.losses[step]}, {reference.losses[step]}) < tolerance,
                     ("rank %d step %d loss %.10g vs %.10g"):format(rank - 1, step, run.losses[step], reference.losses[step]))
    end
    for name, values in pairs(reference.params) do
      assert.is_not_nil(run.params[name], "missing parameter " .. name)
      local err = M.max_relative_error(run.params[name], values)
      assert.is_true(err < tolerance, ("rank %d parameter %s differs by %.3g"):format(rank - 1, name, err))
      err = M.max_relative_error(run.grads[name], reference.grads[name])
      assert.is_true(err < tolerance, ("rank %d gradient %s differs by %.3g"):format(rank - 1, name, err))
    end
  end
end

-- Largest relative difference between two arrays (relative to max(|b|, 1e-3)).
function M.max_relative_error(a, b)
  assert(#a == #b, "lengths differ: " .. #a .. " vs " .. #b)
  local worst = 0
  for i = 1, #a do
    local scale = math.max(math.abs(b[i]), 1e-3)
    worst = math.max(worst, math.abs(a[i] - b[i]) / scale)
  end
  return worst
end

return M
