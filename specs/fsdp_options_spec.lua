-- FSDP options: sync_module_states broadcasts rank 0's values, use_orig_params changes no
-- names, cpu_offload keeps sharded parameters, gradients and optimizer state in the host
-- pool, and nested units own their parameters while the root owns the rest.
local ms = require "moonshard"
local parity = require "support.parity"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local function flat(t) return t:reshape(-1):table() end

local function loss_of(model, tokens, targets)
  return nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
end

before_each(global_state.save)
after_each(global_state.restore)

describe("FSDP options", function()
  it("sync_module_states makes every rank start from rank 0's parameters", function()
    local results = dist.spawn(3, function(rank)
      ms.set_default_dtype("f64")
      ms.manual_seed(100 + rank)
      local model = fsdp.FSDP(parity.Model(), {sync_module_states = true})
      local out = {}
      for name, p in model:named_parameters() do out[name] = flat(p:full_tensor()) end
      return out
    end)
    ms.set_default_dtype("f64")
    ms.manual_seed(100)
    local expected = {}
    for name, p in parity.Model():named_parameters() do expected[name] = flat(p) end
    ms.set_default_dtype("f32")
    for _, res in ipairs(results) do assert.same(expected, res) end
  end)

  it("use_orig_params true and false give the same names, parameters and results", function()
    local results = dist.spawn(2, function(rank, size)
      local function run(use_orig_params)
        ms.set_default_dtype("f64")
        ms.manual_seed(0)
        local model = fsdp.FSDP(parity.Model(), {use_orig_params = use_orig_params,
                                                 auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
        local names = {}
        for name in model:named_parameters() do names[#names + 1] = name end
        local opt = optim.Adam(model:parameters(), {lr = 0.01})
        local tokens, targets = parity.batch(1)
        local per_rank = parity.GLOBAL_BATCH / size
        loss_of(model, tokens:narrow(0, rank * per_rank, per_rank), targets:narrow(0, rank * per_rank, per_rank)):backward()
        opt:step()
        local values = {}
        for name, p in model:named_parameters() do values[name] = flat(p:full_tensor()) end
        return {names = names, count = #model:parameters(), values = values}
      end
      return {orig = run(true), flat = run(false)}
    end)
    local unwrapped = {}
    ms.manual_seed(0)
    for name in parity.Model():named_parameters() do unwrapped[#unwrapped + 1] = name end
    for _, res in ipairs(results) do
      assert.same(unwrapped, res.orig.names)
      assert.same(res.orig, res.flat)
      assert.equal(#unwrapped, res.orig.count)
    end
  end)

  it("cpu_offload keeps shards, gradients and optimizer state in the host pool", function()
    local results = dist.spawn(2, function(rank, size)
      ms.set_default_dtype("f64")
      ms.manual_seed(0)
      local model = fsdp.FSDP(parity.Model(), {cpu_offload = {offload_params = true}})
      local opt = optim.Adam(model:parameters(), {lr = 0.01})
      local tokens, targets = parity.batch(1)
      local per_rank = parity.GLOBAL_BATCH / size
      loss_of(model, tokens:narrow(0, rank * per_rank, per_rank), targets:narrow(0, rank * per_rank, per_rank)):backward()
      opt:step()
      local devices = {}
      for name, p in model:named_parameters() do
        devices[name] = {p:to_local():device(), p.grad:to_local():device(), opt.state[p].exp_avg:device()}
      end
      return {devices = devices, host_bytes = ms.memory_stats("host").allocated}
    end)
    for _, res in ipairs(results) do
      for name, d in pairs(res.devices) do assert.same({"host", "host", "host"}, d, name) end
      assert.is_true(res.host_bytes > 0)
    end
  end)

  it("nested units own their parameters and the root owns the rest", function()
    local results = dist.spawn(2, function()
      ms.set_default_dtype("f64")
      ms.manual_seed(0)
      local model = parity.Model()
      for _, block in model.blocks:ipairs() do fsdp.FSDP(block) end
      fsdp.FSDP(model)
      local owned = {}
      for _, unit in ipairs(fsdp.units_under(model)) do
        local names = {}
        for _, p in ipairs(unit.params) do names[#names + 1] = p.fqn end
        owned[#owned + 1] = table.concat(names, " ")
      end
      return owned
    end)
    assert.same({"embed.weight head.weight head.bias",
                 "norm.weight norm.bias fc1.weight fc1.bias fc2.weight fc2.bias",
                 "norm.weight norm.bias fc1.weight fc1.bias fc2.weight fc2.bias"}, results[1])
  end)
end)
