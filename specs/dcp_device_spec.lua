-- dcp on device tensors: a load fills a device tensor through a host buffer and a save copies
-- a device chunk into host memory (dcp/host.lua). Host and CPU tensors need neither: the CPU
-- part checks that with the host pool's exact statistics. The #gpu part runs where a device
-- exists, or as a dry run on the host pool with MOONSHARD_SPEC_DEVICE=host.
local ms = require "moonshard"
local dcp = ms.dcp
local gpu = require "gpu.helpers"

local store_dirs = require "support.store_dirs"
local global_state = require "support.global_state"

local function state(seed, to)
  ms.manual_seed(seed)
  return {model = {w = to(ms.randn(64, 33)), b = to(ms.randn(33, {dtype = "f64"}))}, step = seed}
end

local function on_host(t) return t:to("host") end
local function on_cpu(t) return t end

before_each(global_state.save)
after_each(global_state.restore)

describe("dcp on host-pool tensors", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("loads into and saves from host tensors without a bounce buffer", function()
    local sd = state(1, on_host)
    local before = ms.memory_stats("host")
    dcp.save(sd, dir, {step = 1})
    local target = state(2, on_host)
    local loaded = ms.memory_stats("host")
    dcp.load(target, dir)
    local after = ms.memory_stats("host")
    assert.equal(before.allocs + 2, loaded.allocs) -- the two tensors of the target
    assert.equal(loaded.allocs, after.allocs)
    local expected = state(1, on_cpu)
    assert.is_true(ms.equal(expected.model.w, target.model.w:to("cpu")))
    assert.is_true(ms.equal(expected.model.b, target.model.b:to("cpu")))
  end)
end)

describe("dcp on device tensors #gpu", function()
  local missing = gpu.missing_devices(1)
  if missing then
    pending(missing)
    return
  end
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)
  local function on_device(t) return gpu.gpu(t) end

  it("loads a CPU checkpoint into device tensors", function()
    dcp.save(state(3, on_cpu), dir, {step = 1})
    local target = state(4, on_device)
    dcp.load(target, dir)
    local expected = state(3, on_cpu)
    gpu.assert_equal(target.model.w, expected.model.w, "w")
    gpu.assert_equal(target.model.b, expected.model.b, "b")
    assert.equal(3, target.step)
  end)

  it("saves device tensors, synchronously and asynchronously", function()
    dcp.save(state(5, on_device), dir, {step = 1})
    local h = dcp.async_save(state(6, on_device), dir, {step = 2})
    h:wait()
    for step, seed in pairs({[1] = 5, [2] = 6}) do
      local target = state(0, on_cpu)
      dcp.load(target, dir, {step = step})
      local expected = state(seed, on_cpu)
      assert.is_true(ms.equal(expected.model.w, target.model.w), "step " .. step)
      assert.is_true(ms.equal(expected.model.b, target.model.b), "step " .. step)
    end
  end)
end)
