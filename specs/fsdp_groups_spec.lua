-- process_group decides FSDP's sharding: on 4 ranks, two groups of 2 each train the whole
-- model over their own pair (matching the unsharded run), a (shard, replicate) pair drives
-- HYBRID_SHARD; ignored modules and states stay whole and unreduced; options are checked.
local ms = require "moonshard"
local parity = require "specs.support.parity"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local STEPS, TOLERANCE = 3, 1e-9

local function flat(t) return t:reshape(-1):table() end

-- Each rank trains on slice `index` of `count` of the global batch with the options
-- make_opts() returns (called inside the rank, after every rank made the same groups).
local function sharded(make_opts)
  return dist.spawn(4, function(rank)
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    local opts, index, count = make_opts(rank)
    local model = fsdp.FSDP(parity.Model(), opts)
    local opt = optim.Adam(model:parameters(), {lr = 0.01})
    local per_rank = parity.GLOBAL_BATCH / count
    local losses = {}
    for step = 1, STEPS do
      local tokens, targets = parity.batch(step)
      opt:zero_grad()
      local logits = model(tokens:narrow(0, index * per_rank, per_rank))
      local loss = nn.F.cross_entropy(logits:view(-1, parity.VOCAB), targets:narrow(0, index * per_rank, per_rank):reshape(-1))
      loss:backward()
      losses[step] = loss:item()
      if step < STEPS then opt:step() end
    end
    local params, rows = {}, {}
    for name, p in model:named_parameters() do
      params[name] = flat(p:full_tensor())
      rows[name] = p:to_local():size(0)
    end
    return {losses = losses, params = params, rows = rows, mesh = tostring(model.head.weight.device_mesh)}
  end)
end


-- Under mpirun the ranks are this process: collect what the tests left, so later spec
-- files measure memory from a clean pool.
after_each(function() collectgarbage(); collectgarbage() end)
describe("FSDP process_group", function()
  local reference
  setup(function() reference = parity.reference(STEPS) end)

  local function expect_params_match(runs)
    for rank, run in ipairs(runs) do
      for name, values in pairs(reference.params) do
        local err = parity.max_relative_error(run.params[name], values)
        assert.is_true(err < TOLERANCE, ("rank %d %s differs by %.3g"):format(rank - 1, name, err))
      end
    end
  end

  it("shards over the caller's group: two groups of 2 on 4 ranks each match unsharded training", function()
    local runs = sharded(function(rank)
      local low, high = dist.new_group({0, 1}), dist.new_group({2, 3})
      local group = rank < 2 and low or high
      return {process_group = group}, group:rank(), 2
    end)
    expect_params_match(runs)
    for rank, run in ipairs(runs) do
      -- 11 rows over a group of 2: 6 and 5 (over the world of 4 it would be 3, 3, 3, 2)
      assert.are.equal((rank - 1) % 2 == 0 and 6 or 5, run.rows["head.weight"], "rank " .. (rank - 1))
      assert.are.equal(rank <= 2 and "DeviceMesh('cpu', [0, 1])" or "DeviceMesh('cpu', [2, 3])", run.mesh)
    end
  end)

  it("takes a (shard group, replicate group) pair for HYBRID_SHARD", function()
    local runs = sharded(function(rank)
      local shard = {dist.new_group({0, 1}), dist.new_group({2, 3})}
      local replicate = {dist.new_group({0, 2}), dist.new_group({1, 3})}
      return {sharding_strategy = "HYBRID_SHARD", process_group = {shard[math.floor(rank / 2) + 1], replicate[rank % 2 + 1]}},
             rank, 4
    end)
    expect_params_match(runs)
    for rank, run in ipairs(runs) do
      assert.are.equal((rank - 1) % 2 == 0 and 6 or 5, run.rows["head.weight"])
      assert.are.equal("DeviceMesh('cpu', [[0, 1], [2, 3]], mesh_dim_names=('replicate', 'shard'))", run.mesh)
    end
  end)

  it("raises when the group does not contain the caller, wrapping nothing", function()
    local results = dist.spawn(4, function(rank)
      local group = dist.new_group({0, 1})
      local model = parity.Model()
      local ok, err = pcall(fsdp.FSDP, model, {process_group = group})
      return {ok = ok, err = not ok and err or nil, wrapped = rawget(model, "_fsdp_unit") ~= nil}
    end)
    assert.is_true(results[1].ok and results[2].ok)
    for rank = 3, 4 do
      assert.is_false(results[rank].ok)
      assert.are.equal(("moonshard: FSDP: process_group: ProcessGroup(%s, ranks {0, 1}) does not contain " ..
                        "this rank (%d)"):format(dist.is_initialized() and dist.get_backend() or "local", rank - 1),
                       results[rank].err)
      assert.is_false(results[rank].wrapped)
    end
  end)
end)

describe("FSDP ignored_modules and ignored_states", function()
  it("leave those parameters whole and their gradients unreduced", function()
    local results = dist.spawn(2, function(rank)
      ms.manual_seed(0)
      local model = parity.Model()
      local other = parity.Model()
      local ignored_block = model.blocks[2]
      fsdp.FSDP(model, {ignored_modules = {ignored_block}})
      fsdp.FSDP(other, {ignored_states = {other.head.weight}})
      local tokens, targets = parity.batch(rank + 1) -- different data on each rank
      for _, m in ipairs({model, other}) do
        nn.F.cross_entropy(m(tokens):view(-1, parity.VOCAB), targets:reshape(-1)):backward()
      end
      return {plain = ms.is_tensor(ignored_block.fc1.weight) and not ms.is_dtensor(ignored_block.fc1.weight),
              sharded = ms.is_dtensor(model.blocks[1].fc1.weight),
              grad = flat(ignored_block.fc1.weight.grad), head_plain = not ms.is_dtensor(other.head.weight),
              head_grad = flat(other.head.weight.grad), head_bias = ms.is_dtensor(other.head.bias),
              shape = ignored_block.fc1.weight:shape()}
    end)
    for _, r in ipairs(results) do
      assert.is_true(r.plain)
      assert.is_true(r.sharded)
      assert.is_true(r.head_plain)
      assert.is_true(r.head_bias)
      assert.are.same({parity.HIDDEN, parity.DIM}, r.shape)
    end
    assert.is_true(parity.max_relative_error(results[1].grad, results[2].grad) > 1e-3)
    assert.is_true(parity.max_relative_error(results[1].head_grad, results[2].head_grad) > 1e-3)
  end)
end)

describe("FSDP options", function()
  it("places shards on device_id and accepts limit_all_gathers", function()
    local r = dist.spawn(2, function()
      local model = fsdp.FSDP(parity.Model(), {device_id = "host", limit_all_gathers = false})
      local ok, err = pcall(fsdp.FSDP, parity.Model(), {device_id = "cuda:0"})
      local ok2, err2 = pcall(fsdp.FSDP, parity.Model(), {limit_all_gathers = "yes"})
      return {device = model.head.weight:device(), err = not ok and err, err2 = not ok2 and err2}
    end)[1]
    assert.are.equal("host", r.device)
    assert.matches("^moonshard: FSDP: device_id: .*cuda:0 is not available", r.err)
    assert.are.equal("moonshard: FSDP: limit_all_gathers must be true or false, got yes", r.err2)
  end)

  it("rejects options it does not implement, in FSDP and in the state-dict settings", function()
    local errors = dist.spawn(1, function()
      local out = {}
      local function try(fn, ...) local ok, err = pcall(fn, ...); out[#out + 1] = not ok and err or "no error" end
      try(fsdp.FSDP, parity.Model(), {mixed_precision = {param_dtype = "bf16", keep_low_precision_grads = true}})
      try(fsdp.FSDP, parity.Model(), {cpu_offload = {offload_params = true, pin_memory = true}})
      try(fsdp.FSDP, parity.Model(), {process_group = dist.new_group({0}), device_mesh = dist.init_device_mesh({1})})
      local model = fsdp.FSDP(parity.Model())
      try(fsdp.set_state_dict_type, model, "SHARDED_STATE_DICT", {rank0_only = true})
      try(fsdp.set_state_dict_type, model, "FULL_STATE_DICT", {rank0_only = true, keep_vars = true})
      try(fsdp.set_state_dict_type, model, "FULL_STATE_DICT", nil, {offload_to_cpu = 1})
      return out
    end)[1]
    assert.are.same({
      "moonshard: FSDP: mixed_precision.keep_low_precision_grads = true is not supported: gradients land on " ..
        "the full-precision shards the optimizer steps",
      "moonshard: FSDP: unknown cpu_offload option 'pin_memory' (expected offload_params)",
      "moonshard: FSDP: give either device_mesh or process_group, not both",
      "moonshard: set_state_dict_type: unknown state_dict_config option 'rank0_only' for SHARDED_STATE_DICT " ..
        "(expected offload_to_cpu)",
      "moonshard: set_state_dict_type: unknown state_dict_config option 'keep_vars' for FULL_STATE_DICT " ..
        "(expected offload_to_cpu or rank0_only)",
      "moonshard: set_state_dict_type: optim_state_dict_config.offload_to_cpu must be true or false, got 1",
    }, errors)
  end)
end)
