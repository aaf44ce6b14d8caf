-- Distributed checkpoints move between layouts: model and Adam state saved under HSDP (2x2)
-- load into FSDP on 4 and 2 ranks, FSDP 4 -> 3 (uneven rows) -> 1, sharded -> one unwrapped
-- process and back. Expected values are all-gathered from the saving ranks, not read back.
local ms = require "moonshard"
local parity = require "support.parity"
local nn, optim, dist, fsdp, dcp = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.dcp

local function flat(t) return t:reshape(-1):table() end

local store_dirs = require "support.store_dirs"
local global_state = require "support.global_state"

local function wrap(seed, strategy, mesh)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  local model = parity.Model()
  if strategy then
    model = fsdp.FSDP(model, {sharding_strategy = strategy, device_mesh = mesh,
                              auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
  end
  return model, optim.Adam(model:parameters(), {lr = 0.01})
end

local function train(model, opt, rank, size, step)
  local per_rank = parity.GLOBAL_BATCH / size
  local tokens, targets = parity.batch(step)
  opt:zero_grad()
  local logits = model(tokens:narrow(0, rank * per_rank, per_rank))
  nn.F.cross_entropy(logits:view(-1, parity.VOCAB),
                     targets:narrow(0, rank * per_rank, per_rank):reshape(-1)):backward()
  opt:step()
end

local function whole(t) return ms.is_dtensor(t) and t:full_tensor() or t end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- Every parameter and Adam state value as plain arrays (a collective on sharded models, so
-- every rank gathers in the same order).
local function snapshot(model, opt)
  local out = {params = {}, state = {}}
  for name, p in model:named_parameters() do out.params[name] = flat(whole(p)) end
  local state = fsdp.optim_state_dict(model, opt).state
  for _, name in ipairs(sorted_keys(state)) do
    local s = state[name]
    out.state[name] = {step = s.step, exp_avg = flat(whole(s.exp_avg)), exp_avg_sq = flat(whole(s.exp_avg_sq))}
  end
  return out
end

local function state_dict_of(model, opt)
  return {model = model:state_dict(), optim = fsdp.optim_state_dict(model, opt)}
end

-- Load dir into model and opt through their own state dicts, as a user would.
local function load_into(model, opt, dir)
  local sd = state_dict_of(model, opt)
  dcp.load(sd, dir)
  model:load_state_dict(sd.model)
  opt:load_state_dict(fsdp.optim_state_dict_to_load(model, opt, sd.optim))
end

-- A destination that starts from other values: seed 5, trained one step on another batch.
local function load_fresh(rank, size, strategy, mesh, dir)
  local model, opt = wrap(5, strategy, mesh)
  train(model, opt, rank, size, 9)
  local before = snapshot(model, opt)
  load_into(model, opt, dir)
  return {before = before, after = snapshot(model, opt)}
end

local function save_trained(rank, size, strategy, mesh, dir, step)
  local model, opt = wrap(0, strategy, mesh)
  train(model, opt, rank, size, 1)
  train(model, opt, rank, size, 2)
  dcp.save(state_dict_of(model, opt), dir, {step = step})
  return snapshot(model, opt)
end

local function assert_loaded(saved, results)
  for _, res in ipairs(results) do
    assert.are_not.same(saved.params, res.before.params)
    assert.same(saved, res.after)
  end
end

local function hsdp_mesh() return dist.init_device_mesh({2, 2}, {mesh_dim_names = {"replicate", "shard"}}) end

before_each(global_state.save)
after_each(global_state.restore)

describe("dcp resharding", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("loads an HSDP (2x2) checkpoint into FSDP on 4 ranks and on 2 ranks", function()
    local saved = dist.spawn(4, function(rank, size)
      return save_trained(rank, size, "HYBRID_SHARD", hsdp_mesh(), dir, 10)
    end)[1]
    for _, world in ipairs({4, 2}) do
      assert_loaded(saved, dist.spawn(world, function(rank, size)
        return load_fresh(rank, size, "FULL_SHARD", nil, dir)
      end))
    end
  end)

  it("writes each HSDP replica's chunk once, from the first replica group", function()
    dist.spawn(4, function(rank, size) save_trained(rank, size, "HYBRID_SHARD", hsdp_mesh(), dir, 1) end)
    local store = dcp.open(dir)
    for _, e in ipairs(store:entries()) do
      if e.kind == "tensor" and #e.shape > 0 then
        local bytes = 0
        for _, c in ipairs(store:chunks(e.fqn)) do
          assert.is_true(c.rank == 0 or c.rank == 1, e.fqn .. " has a chunk from rank " .. c.rank)
          bytes = bytes + c.nbytes
        end
        assert.equal(e.nbytes, bytes, e.fqn)
      end
    end
    store:close()
  end)

  it("moves an FSDP checkpoint from 4 ranks to 3 (uneven rows) and from 3 ranks to 1", function()
    local saved = dist.spawn(4, function(rank, size)
      return save_trained(rank, size, "FULL_SHARD", nil, dir, 1)
    end)[1]
    local on_three = dist.spawn(3, function(rank, size)
      local result = load_fresh(rank, size, "FULL_SHARD", nil, dir)
      return result
    end)
    assert_loaded(saved, on_three)
    local resaved = dist.spawn(3, function(rank, size)
      local model, opt = wrap(5, "FULL_SHARD")
      train(model, opt, rank, size, 9)
      load_into(model, opt, dir)
      dcp.save(state_dict_of(model, opt), dir, {step = 2})
      return snapshot(model, opt)
    end)[1]
    assert.same(saved, resaved)
    assert_loaded(saved, dist.spawn(1, function(rank, size)
      return load_fresh(rank, size, "FULL_SHARD", nil, dir)
    end))
  end)

  it("loads a sharded checkpoint into an unwrapped model in one process, and saves it back to 4 ranks", function()
    local saved = dist.spawn(4, function(rank, size)
      return save_trained(rank, size, "FULL_SHARD", nil, dir, 1)
    end)[1]
    local full = load_fresh(0, 1, nil, nil, dir)
    ms.set_default_dtype("f32")
    assert_loaded(saved, {full})
    local model, opt = wrap(0)
    train(model, opt, 0, 1, 9)
    load_into(model, opt, dir)
    dcp.save(state_dict_of(model, opt), dir, {step = 2})
    ms.set_default_dtype("f32")
    local store = dcp.open(dir)
    assert.same({1, 2}, store:steps())
    store:close()
    assert_loaded(saved, dist.spawn(4, function(rank, size)
      return load_fresh(rank, size, "FULL_SHARD", nil, dir)
    end))
  end)
end)
