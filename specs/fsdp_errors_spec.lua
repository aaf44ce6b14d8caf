-- FSDP bad input: each mistake raises an error that names it and says what to do instead.
local ms = require "moonshard"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

-- Run fn on 2 ranks and return rank 0's error message (nil when fn succeeded).
local function error_on_ranks(fn)
  local results = dist.spawn(2, function()
    local ok, err = pcall(fn)
    return ok and false or tostring(err)
  end)
  return results[1] or nil
end

local function model() return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)) end

describe("FSDP errors", function()
  it("rejects a strategy name that does not exist", function()
    local err = error_on_ranks(function() fsdp.FSDP(model(), {sharding_strategy = "FULLSHARD"}) end)
    assert.matches("FSDP: unknown sharding_strategy 'FULLSHARD' %(expected FULL_SHARD", err)
  end)

  it("rejects a hybrid strategy without a 2-D mesh", function()
    local err = error_on_ranks(function() fsdp.FSDP(model(), {sharding_strategy = "HYBRID_SHARD"}) end)
    assert.matches("HYBRID_SHARD needs a 2%-D device_mesh", err)
    err = error_on_ranks(function()
      fsdp.FSDP(model(), {sharding_strategy = "HYBRID_SHARD", device_mesh = dist.init_device_mesh({2})})
    end)
    assert.matches("HYBRID_SHARD needs a 2%-D device_mesh %(replicate, shard%), got a 1%-D mesh", err)
  end)

  it("rejects a 2-D mesh for a strategy that shards on one dim", function()
    local results = dist.spawn(4, function()
      local mesh = dist.init_device_mesh({2, 2})
      local ok, err = pcall(fsdp.FSDP, model(), {device_mesh = mesh})
      return tostring(err)
    end)
    assert.matches("FULL_SHARD takes a 1%-D device_mesh, got a 2%-D mesh", results[1])
  end)

  it("rejects a mesh that does not match the world size", function()
    local err = error_on_ranks(function() dist.init_device_mesh({3}) end)
    assert.is_not_nil(err)
    assert.matches("init_device_mesh", err)
    assert.matches("3", err)
    assert.matches("2", err)
  end)

  it("rejects wrapping a module twice", function()
    local err = error_on_ranks(function()
      local m = model()
      fsdp.FSDP(m)
      fsdp.FSDP(m)
    end)
    assert.matches("already wrapped by FSDP; wrap each module once", err)
  end)

  it("rejects an optimizer built over the parameters before wrapping", function()
    local err = error_on_ranks(function()
      local m = model()
      local opt = optim.Adam(m:parameters(), {lr = 0.1})
      fsdp.FSDP(m)
      m(ms.randn(2, 4)):sum():backward()
      opt:step()
    end)
    assert.matches("build the optimizer over the wrapped model's parameters", err)
    err = error_on_ranks(function()
      local m = model()
      local params = m:parameters()
      fsdp.FSDP(m)
      optim.SGD(params, {lr = 0.1})
    end)
    assert.matches("build the optimizer after wrapping", err)
  end)

  it("rejects options it does not know and a wrap policy that is not a function", function()
    local err = error_on_ranks(function() fsdp.FSDP(model(), {shard_strategy = "FULL_SHARD"}) end)
    assert.matches("FSDP: unknown option 'shard_strategy'", err)
    err = error_on_ranks(function() fsdp.FSDP(model(), {auto_wrap_policy = {nn.Linear}}) end)
    assert.matches("auto_wrap_policy must be a function", err)
  end)

  it("rejects a state dict type that does not exist", function()
    local err = error_on_ranks(function() fsdp.set_state_dict_type(fsdp.FSDP(model()), "FULL") end)
    assert.matches("unknown state dict type 'FULL'", err)
  end)
end)
