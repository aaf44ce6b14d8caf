-- Resuming training from a distributed checkpoint: a run saved at step N and resumed in new
-- processes gives bitwise the losses of the uninterrupted run on the same world size, and a
-- resume on another world size starts from bitwise the same parameters and Adam state. An
-- async save taken while training goes on changes no loss and holds the state of its call.
local ms = require "moonshard"
local parity = require "support.parity"
local nn, optim, dist, fsdp, dcp = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.dcp

local SAVE_AT, LAST = 3, 6

local store_dirs = require "support.store_dirs"
local global_state = require "support.global_state"

local function build(seed)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  local model = fsdp.FSDP(parity.Model(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
  return model, optim.Adam(model:parameters(), {lr = 0.01})
end

-- Backward and optimizer step for this rank's loss; returns the mean loss over ranks.
local function finish_step(loss, opt)
  loss:backward()
  opt:step()
  local total = loss:detach():clone()
  dist.all_reduce(total, "avg")
  return total:item()
end

-- One step on this rank's slice of the global batch; returns the global mean loss.
local function train_step(model, opt, rank, size, step)
  local per_rank = parity.GLOBAL_BATCH / size
  local tokens, targets = parity.batch(step)
  opt:zero_grad()
  local logits = model(tokens:narrow(0, rank * per_rank, per_rank))
  local loss = nn.F.cross_entropy(logits:view(-1, parity.VOCAB),
                                  targets:narrow(0, rank * per_rank, per_rank):reshape(-1))
  return finish_step(loss, opt)
end

local function checkpoint_of(model, opt, step)
  return {model = model:state_dict(), optim = fsdp.optim_state_dict(model, opt), step = step,
          rng = ms.get_rng_state()}
end

local function resume(model, opt, dir)
  local sd = checkpoint_of(model, opt, 0)
  dcp.load(sd, dir)
  model:load_state_dict(sd.model)
  opt:load_state_dict(fsdp.optim_state_dict_to_load(model, opt, sd.optim))
  ms.set_rng_state(sd.rng)
  return sd.step
end

-- Every parameter and Adam state gathered whole, in the same order on every rank, as
-- convert(whole tensor); step counts as they are.
local function gathered_state(model, opt, convert)
  local out = {}
  for name, p in model:named_parameters() do out[name] = convert(p:full_tensor()) end
  local state = fsdp.optim_state_dict(model, opt).state
  local names = {}
  for name in pairs(state) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local s = state[name]
    out[name .. ".exp_avg"] = convert(s.exp_avg:full_tensor())
    out[name .. ".exp_avg_sq"] = convert(s.exp_avg_sq:full_tensor())
    out[name .. ".step"] = s.step
  end
  return out
end

local function full_state(model, opt)
  return gathered_state(model, opt, function(t) return t:reshape(-1):table() end)
end

-- The same as raw bytes (cheap to compare for large tensors).
local function state_bytes(model, opt)
  local ffi = require "ffi"
  return gathered_state(model, opt, function(t)
    local whole = t:contiguous()
    return ffi.string(whole:data_ptr(), whole:numel() * 8)
  end)
end

-- Two Linear(1024, 1024) layers in f64: each rank's shards and Adam states are 4 MiB, large
-- enough for an async save to stage them copy-on-write.
local WIDE = 1024
local function build_wide()
  ms.set_default_dtype("f64")
  ms.manual_seed(5)
  local model = fsdp.FSDP(nn.Sequential(nn.Linear(WIDE, WIDE), nn.GELU(), nn.Linear(WIDE, WIDE)),
                          {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
  return model, optim.Adam(model:parameters(), {lr = 1e-3})
end

local function wide_step(model, opt, rank, step)
  ms.manual_seed(100 + 10 * step + rank)
  local x, y = ms.randn(4, WIDE), ms.randn(4, WIDE)
  opt:zero_grad()
  local diff = model(x) - y
  return finish_step((diff * diff):mean(), opt)
end

before_each(global_state.save)
after_each(global_state.restore)

describe("dcp resume", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("gives bitwise the uninterrupted losses after resuming on the same world size", function()
    local uninterrupted = dist.spawn(2, function(rank, size)
      local model, opt = build(0)
      local losses = {}
      for step = 1, LAST do losses[step] = train_step(model, opt, rank, size, step) end
      return losses
    end)[1]
    local first_part = dist.spawn(2, function(rank, size)
      local model, opt = build(0)
      local losses = {}
      for step = 1, SAVE_AT do losses[step] = train_step(model, opt, rank, size, step) end
      dcp.save(checkpoint_of(model, opt, SAVE_AT), dir, {step = SAVE_AT})
      return losses
    end)[1]
    local second_part = dist.spawn(2, function(rank, size)
      local model, opt = build(11)
      train_step(model, opt, rank, size, 1)
      local start = resume(model, opt, dir)
      local losses = {}
      for step = start + 1, LAST do losses[step] = train_step(model, opt, rank, size, step) end
      return losses
    end)[1]
    for step = 1, SAVE_AT do assert.equal(uninterrupted[step], first_part[step], "step " .. step) end
    for step = SAVE_AT + 1, LAST do assert.equal(uninterrupted[step], second_part[step], "step " .. step) end
    assert.are_not.equal(uninterrupted[LAST], uninterrupted[SAVE_AT])
  end)

  it("keeps training bitwise unchanged while an async save runs, and the save holds the state of its call", function()
    local uninterrupted = dist.spawn(2, function(rank)
      local model, opt = build_wide()
      local losses, at_save = {}, nil
      for step = 1, LAST do
        losses[step] = wide_step(model, opt, rank, step)
        if step == SAVE_AT then at_save = state_bytes(model, opt) end
      end
      return {losses = losses, at_save = at_save}
    end)[1]
    local overlapped = dist.spawn(2, function(rank)
      local model, opt = build_wide()
      local losses = {}
      for step = 1, SAVE_AT do losses[step] = wide_step(model, opt, rank, step) end
      local h = dcp.async_save(checkpoint_of(model, opt, SAVE_AT), dir, {step = SAVE_AT})
      for step = SAVE_AT + 1, LAST do losses[step] = wide_step(model, opt, rank, step) end
      h:wait()
      return losses
    end)[1]
    local loaded = dist.spawn(2, function(rank)
      local model, opt = build_wide()
      wide_step(model, opt, rank, 1)
      assert.equal(SAVE_AT, resume(model, opt, dir))
      return state_bytes(model, opt)
    end)[1]
    assert.same(uninterrupted.losses, overlapped)
    local names = 0
    for name, value in pairs(uninterrupted.at_save) do
      names = names + 1
      assert.is_true(value == loaded[name], name .. " differs from the state at the call")
    end
    assert.equal(16, names) -- 2 weights and 2 biases, each with exp_avg, exp_avg_sq and step

  end)

  it("resumes on 3 ranks from a 2-rank checkpoint with bitwise the same parameters and Adam state", function()
    local saved = dist.spawn(2, function(rank, size)
      local model, opt = build(0)
      for step = 1, SAVE_AT do train_step(model, opt, rank, size, step) end
      dcp.save(checkpoint_of(model, opt, SAVE_AT), dir)
      return full_state(model, opt)
    end)[1]
    local results = dist.spawn(3, function(rank, size)
      local model, opt = build(11)
      train_step(model, opt, rank, size, 1)
      local start = resume(model, opt, dir)
      local state = full_state(model, opt)
      local loss = train_step(model, opt, rank, size, start + 1)
      return {start = start, state = state, loss = loss}
    end)
    for _, res in ipairs(results) do
      assert.equal(SAVE_AT, res.start)
      assert.same(saved, res.state)
      assert.is_true(res.loss == res.loss and res.loss > 0)
    end
  end)
end)
