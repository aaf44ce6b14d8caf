-- dcp's state-dict helpers (torch.distributed.checkpoint.state_dict): a run saved through
-- get_state_dict and resumed into a fresh model and a fresh optimizer with set_state_dict
-- gives bitwise the uninterrupted losses on a plain module, FSDP and HSDP; the optimizer
-- state reads like PyTorch's (FQN keys, 0-based param_groups, betas a list); full state dicts,
-- resharding, strict = false reports, and state dicts from another model.
local ms = require "moonshard"
local parity = require "support.parity"
local store_dirs = require "support.store_dirs"
local nn, optim, dist, fsdp, dcp = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.dcp

local SAVE_AT, LAST = 3, 6

-- config: {wrap = nil | "FSDP" | "HSDP"}; seed changes the initial weights.
local function build(config, seed)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  local model = parity.Model()
  if config.wrap == "FSDP" then
    fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
  elseif config.wrap == "HSDP" then
    fsdp.FSDP(model, {sharding_strategy = "HYBRID_SHARD", auto_wrap_policy = fsdp.wrap_policy({parity.Block}),
                      device_mesh = dist.init_device_mesh({2, 2}, {mesh_dim_names = {"replicate", "shard"}})})
  end
  return model, optim.AdamW(model:parameters(), {lr = 0.01, betas = {0.8, 0.95}})
end

local function world()
  if dist.is_initialized() then return dist.get_rank(), dist.get_world_size() end
  return 0, 1
end

-- One step on this rank's slice of the global batch; returns the global mean loss.
local function train_step(model, opt, step)
  local rank, size = world()
  local per_rank = parity.GLOBAL_BATCH / size
  local tokens, targets = parity.batch(step)
  opt:zero_grad()
  local logits = model(tokens:narrow(0, rank * per_rank, per_rank))
  local loss = nn.F.cross_entropy(logits:view(-1, parity.VOCAB), targets:narrow(0, rank * per_rank, per_rank):reshape(-1))
  loss:backward()
  opt:step()
  local total = loss:detach():clone()
  if size > 1 then dist.all_reduce(total, "avg") end
  return total:item()
end

-- Run fn on size ranks (or in this process for a plain module) and return rank 0's result.
local function on_ranks(size, fn)
  if size == 0 then return fn() end
  return dist.spawn(size, fn)[1]
end

-- Every parameter and optimizer state gathered whole, by name.
local function gathered(model, opt)
  local msd, osd = dcp.get_state_dict(model, opt, {full_state_dict = true})
  local out = {}
  for name, t in pairs(msd) do out[name] = t:reshape(-1):table() end
  for name, s in pairs(osd.state) do
    out[name .. ".exp_avg"] = s.exp_avg:reshape(-1):table()
    out[name .. ".exp_avg_sq"] = s.exp_avg_sq:reshape(-1):table()
    out[name .. ".step"] = s.step
  end
  return out
end

describe("dcp state-dict helpers", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  for _, config in ipairs({{name = "a plain module", size = 0}, {name = "FSDP on 2 ranks", size = 2, wrap = "FSDP"},
                           {name = "HSDP on a 2x2 mesh", size = 4, wrap = "HSDP"}}) do
    it("resume a fresh model and a fresh optimizer to bitwise the uninterrupted losses: " .. config.name, function()
      local uninterrupted = on_ranks(config.size, function()
        local model, opt = build(config, 0)
        local losses = {}
        for step = 1, LAST do losses[step] = train_step(model, opt, step) end
        return losses
      end)
      on_ranks(config.size, function()
        local model, opt = build(config, 0)
        for step = 1, SAVE_AT do train_step(model, opt, step) end
        local msd, osd = dcp.get_state_dict(model, opt)
        dcp.save({model = msd, optim = osd, step = SAVE_AT}, dir)
        return true
      end)
      local resumed = on_ranks(config.size, function()
        local model, opt = build(config, 7) -- other weights, an optimizer that never stepped
        local msd, osd = dcp.get_state_dict(model, opt)
        local sd = {model = msd, optim = osd, step = 0}
        dcp.load(sd, dir)
        dcp.set_state_dict(model, opt, {model_state_dict = sd.model, optim_state_dict = sd.optim})
        local losses = {}
        for step = sd.step + 1, LAST do losses[step] = train_step(model, opt, step) end
        return losses
      end)
      for step = SAVE_AT + 1, LAST do assert.equal(uninterrupted[step], resumed[step], "step " .. step) end
    end)
  end

  it("gives the optimizer state PyTorch's layout: FQN keys, 0-based param_groups, betas a list", function()
    local model, opt = build({}, 0)
    train_step(model, opt, 1)
    local _, osd = dcp.get_state_dict(model, opt)
    local group = osd.param_groups[0]
    assert.is_nil(osd.param_groups[1])
    assert.are.same({[0] = 0.8, [1] = 0.95}, group.betas)
    assert.equal("embed.weight", group.params[0])
    assert.equal("head.bias", group.params[14])
    assert.is_nil(group.params[15])
    assert.equal(0.01, group.lr)
    local state = osd.state["blocks.1.fc2.weight"]
    assert.equal(1, state.step)
    assert.is_true(ms.equal(state.exp_avg, opt.state[model.blocks[2].fc2.weight].exp_avg))
    dcp.save({optim = osd}, dir)
    local store = dcp.open(dir)
    local keys = {}
    for _, e in ipairs(store:entries()) do keys[e.fqn] = e.kind end
    store:close()
    assert.equal("number", keys["optim.param_groups.0.betas.1"])
    assert.equal("string", keys["optim.param_groups.0.params.0"])
    assert.equal("tensor", keys["optim.state.blocks.1.fc2.weight.exp_avg_sq"])
  end)

  it("materialises a fresh optimizer's state without changing its first step", function()
    local model, opt = build({}, 0)
    local _, osd = dcp.get_state_dict(model, opt)
    assert.equal(0, osd.state["head.weight"].step)
    assert.is_true(ms.equal(osd.state["head.weight"].exp_avg, ms.zeros(parity.VOCAB, parity.DIM, {dtype = "f64"})))
    local with_template = train_step(model, opt, 1)
    local plain_model, plain_opt = build({}, 0)
    assert.equal(train_step(plain_model, plain_opt, 1), with_template)
    assert.are.same(gathered(plain_model, plain_opt), gathered(model, opt))
  end)

  it("full_state_dict gathers plain tensors, loads into any layout, and equals a sharded save loaded elsewhere", function()
    local reference = on_ranks(0, function()
      local model, opt = build({}, 0)
      for step = 1, SAVE_AT do train_step(model, opt, step) end
      return gathered(model, opt)
    end)
    local results = dist.spawn(2, function()
      local model, opt = build({wrap = "FSDP"}, 0)
      for step = 1, SAVE_AT do train_step(model, opt, step) end
      local msd, osd = dcp.get_state_dict(model, opt, {full_state_dict = true, cpu_offload = true})
      assert.is_true(ms.is_tensor(msd["head.weight"]))
      assert.is_true(ms.is_tensor(osd.state["head.weight"].exp_avg))
      dcp.save({model = msd, optim = osd}, dir)
      -- a full state dict straight into a differently initialised FSDP model and fresh optimizer
      local other, other_opt = build({wrap = "FSDP"}, 3)
      dcp.set_state_dict(other, other_opt, {model_state_dict = msd, optim_state_dict = osd})
      return gathered(other, other_opt)
    end)[1]
    for name, values in pairs(reference) do
      local got = results[name]
      if type(values) == "number" then
        assert.equal(values, got, name)
      else
        assert.is_true(parity.max_relative_error(got, values) < 1e-9, name)
      end
    end
    local resharded = dist.spawn(4, function()
      local model, opt = build({wrap = "HSDP"}, 5)
      local msd, osd = dcp.get_state_dict(model, opt)
      local sd = {model = msd, optim = osd}
      dcp.load(sd, dir)
      dcp.set_state_dict(model, opt, {model_state_dict = sd.model, optim_state_dict = sd.optim})
      return gathered(model, opt)
    end)
    assert.are.same(results, resharded[1])
  end)

  describe("another model's state dict", function()
    local Other = nn.Module:extend("Other")
    function Other:__init()
      self.embed = nn.Embedding(parity.VOCAB, parity.DIM)
      self.proj = nn.Linear(parity.DIM, parity.VOCAB)
    end
    function Other:forward(x) return self.proj(self.embed(x)) end

    local function snapshot(model)
      local out = {}
      for name, p in model:named_parameters() do out[name] = p:reshape(-1):table() end
      return out
    end

    it("is refused whole, listing the missing and the unexpected FQNs", function()
      ms.set_default_dtype("f64")
      ms.manual_seed(1)
      local other = Other()
      local other_opt = optim.AdamW(other:parameters(), {lr = 0.01})
      local msd, osd = dcp.get_state_dict(other, other_opt)
      local model, opt = build({}, 0)
      local before = snapshot(model)
      local ok, err = pcall(dcp.set_state_dict, model, opt, {model_state_dict = msd, optim_state_dict = osd})
      assert.is_false(ok)
      assert.matches("moonshard: set_state_dict: the model state dict does not match the model %(nothing was loaded", err)
      assert.matches("missing keys: blocks.0.fc1.bias, blocks.0.fc1.weight, ", err)
      assert.matches("unexpected keys: proj.bias, proj.weight", err)
      assert.are.same(before, snapshot(model))
      ok, err = pcall(dcp.set_optimizer_state_dict, model, opt, osd)
      assert.is_false(ok)
      assert.matches("set_optimizer_state_dict: the optimizer state dict does not match the optimizers' " ..
                     "parameters %(nothing was loaded.*missing keys: blocks.0.fc1.bias.*unexpected keys: " ..
                     "proj.bias, proj.weight", err)
      ms.set_default_dtype("f32")
    end)

    it("with strict = false loads the keys that match and reports the rest", function()
      ms.set_default_dtype("f64")
      ms.manual_seed(1)
      local other = Other()
      local model = build({}, 0)
      local before = snapshot(model)
      local report = dcp.set_model_state_dict(model, dcp.get_model_state_dict(other), {strict = false})
      assert.are.same({"proj.bias", "proj.weight"}, report.unexpected_keys)
      assert.equal(14, #report.missing_keys)
      assert.equal("blocks.0.fc1.bias", report.missing_keys[1])
      assert.are.same(snapshot(other)["embed.weight"], snapshot(model)["embed.weight"])
      assert.are.same(before["head.weight"], snapshot(model)["head.weight"])
      ms.set_default_dtype("f32")
    end)

    it("names a shape mismatch before copying anything", function()
      local model, opt = build({}, 0)
      local msd = dcp.get_model_state_dict(model)
      local before = snapshot(model)
      msd["embed.weight"] = ms.zeros(parity.VOCAB, parity.DIM, {dtype = "f64"})
      msd["head.weight"] = ms.zeros(3, 3, {dtype = "f64"})
      local ok, err = pcall(dcp.set_state_dict, model, opt, {model_state_dict = msd})
      assert.is_false(ok)
      assert.matches("shape mismatch for 'head.weight': the state dict has %[3, 3%], the model has %[11, 6%]", err)
      assert.are.same(before, snapshot(model))
    end)

    it("names bad arguments", function()
      local model, opt = build({}, 0)
      assert.matches("get_state_dict: expected an nn.Module as the model, got table",
                     select(2, pcall(dcp.get_state_dict, {}, opt)))
      assert.matches("get_optimizer_state_dict: optimizer 1 is a number, not an optimizer",
                     select(2, pcall(dcp.get_optimizer_state_dict, model, {5})))
      assert.matches("get_model_state_dict: unknown option 'full'",
                     select(2, pcall(dcp.get_model_state_dict, model, {full = true})))
      assert.matches("set_state_dict: expected {model_state_dict = ..., optim_state_dict = ...}",
                     select(2, pcall(dcp.set_state_dict, model, opt, dcp.get_model_state_dict(model))))
    end)

    it("names the FQN of a meta tensor on either side, and offloads a meta model's entries as they are", function()
      local meta = ms.device("meta", function() return ms.nn.Sequential(ms.nn.Linear(3, 2)) end)
      local full = ms.nn.Sequential(ms.nn.Linear(3, 2))
      local tail = " is a meta tensor ([2, 3] " .. meta[1].weight:dtype() .. ", no data); materialise it first (fsdp.FSDP with " ..
                   "param_init_fn, or module:to_empty() and an initialiser)"
      assert.are.equal("moonshard: set_model_state_dict: '0.weight' of the model" .. tail,
                       select(2, pcall(dcp.set_model_state_dict, meta, full:state_dict())))
      assert.are.equal("moonshard: set_model_state_dict: '0.weight' of the state dict" .. tail,
                       select(2, pcall(dcp.set_model_state_dict, full, meta:state_dict())))
      local sd = dcp.get_model_state_dict(meta, {cpu_offload = true})
      assert.are.equal("meta", sd["0.weight"]:device())
    end)

    it("checks every option of every helper, naming the function called", function()
      local model, opt = build({}, 0)
      local msd, osd = dcp.get_state_dict(model, opt)
      local calls = {
        get_state_dict = function(o) return dcp.get_state_dict(model, opt, o) end,
        get_model_state_dict = function(o) return dcp.get_model_state_dict(model, o) end,
        get_optimizer_state_dict = function(o) return dcp.get_optimizer_state_dict(model, opt, o) end,
        set_state_dict = function(o) return dcp.set_state_dict(model, opt, {model_state_dict = msd, optim_state_dict = osd}, o) end,
        set_model_state_dict = function(o) return dcp.set_model_state_dict(model, msd, o) end,
        set_optimizer_state_dict = function(o) return dcp.set_optimizer_state_dict(model, opt, osd, o) end,
      }
      for name, call in pairs(calls) do
        local function err(o) return select(2, pcall(call, o)) end
        assert.are.equal("moonshard: " .. name .. ": unknown option 'fooo' (expected full_state_dict, cpu_offload, strict)",
                         err({fooo = 1}))
        assert.are.equal("moonshard: " .. name .. ": option 'full_state_dict' must be a boolean, got 'yes'",
                         err({full_state_dict = "yes"}))
        assert.are.equal("moonshard: " .. name .. ": option 'cpu_offload' must be a boolean, got number",
                         err({cpu_offload = 1}))
        assert.are.equal("moonshard: " .. name .. ": option 'strict' must be a boolean, got number", err({strict = 0}))
        assert.are.equal("moonshard: " .. name .. ": options must be a table, got string", err("full"))
        assert.is_true((pcall(call, {full_state_dict = false, cpu_offload = false, strict = true})), name)
      end
      assert.are.equal("moonshard: set_state_dict: unknown key 'optim' in the third argument (expected " ..
                       "model_state_dict, optim_state_dict)",
                       select(2, pcall(dcp.set_state_dict, model, opt, {model_state_dict = msd, optim = osd})))
    end)
  end)
end)
