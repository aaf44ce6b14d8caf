-- dcp.save / dcp.load / dcp.async_save / dcp.open: nested state dicts of tensors, DTensors
-- and plain values round-trip exactly; async saves stage a copy and commit on wait; a later
-- save waits for an earlier one; retention; loads allocate nothing but the destination.
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp

local store_dirs = require "support.store_dirs"
local global_state = require "support.global_state"

local function nested(seed)
  ms.manual_seed(seed)
  return {
    model = {["net1.weight"] = ms.randn(4, 3), ["net1.bias"] = ms.randn(4, {dtype = "f64"}),
             counts = ms.arange(6, {dtype = "i64"}), scalar = ms.tensor(2.5), empty = ms.zeros(0, 3)},
    optim = {param_groups = {{lr = 0.1 * seed, betas = {0.9, 0.999}, amsgrad = false, params = {"net1.weight"}}}},
    step = seed, name = "run-" .. seed, huge = 2 ^ 60 + seed * 2 ^ 10, tiny = 1e-300, inf = math.huge,
  }
end

-- Rank 0's directory on every rank (processes under mpirun each made their own).
local function agreed_dir(path)
  local codes = {}
  for i = 1, 256 do codes[i] = i <= #path and path:byte(i) or 0 end
  local bytes = ms.tensor(codes, {dtype = "u8"})
  dist.broadcast(bytes, 0)
  local chars = {}
  for _, b in ipairs(bytes:table()) do
    if b == 0 then break end
    chars[#chars + 1] = string.char(b)
  end
  return table.concat(chars)
end

local function assert_same_state(expected, got)
  for k, v in pairs(expected) do
    if ms.is_tensor(v) then
      assert.equal(v:dtype(), got[k]:dtype(), k)
      assert.is_true(ms.equal(v, got[k]), k)
    elseif type(v) == "table" then
      assert_same_state(v, got[k])
    else
      assert.equal(v, got[k], k)
    end
  end
end

before_each(global_state.save)
after_each(global_state.restore)

describe("dcp save and load", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("round-trips nested tensors, numbers, strings and booleans bit for bit", function()
    assert.equal(4, dcp.save(nested(4), dir, {step = 4}))
    local target = nested(9)
    local report = dcp.load(target, dir)
    assert.equal(4, report.step)
    assert.same({}, report.unexpected_keys)
    assert_same_state(nested(4), target)
  end)

  it("lists steps and entries with dotted keys, and reads single values", function()
    dcp.save(nested(1), dir)
    dcp.save(nested(2), dir)
    local store = dcp.open(dir)
    assert.same({0, 1}, store:steps())
    local kinds = {}
    for _, e in ipairs(store:entries(1)) do kinds[e.fqn] = e end
    assert.equal("tensor", kinds["model.net1.weight"].kind)
    assert.equal("f32", kinds["model.net1.weight"].dtype)
    assert.same({4, 3}, {unpack(kinds["model.net1.weight"].shape)})
    assert.equal("i64", kinds["model.counts"].dtype)
    assert.same({0, 3}, {unpack(kinds["model.empty"].shape)})
    assert.equal("number", kinds["optim.param_groups.1.lr"].kind)
    assert.equal("boolean", kinds["optim.param_groups.1.amsgrad"].kind)
    assert.equal("string", kinds["optim.param_groups.1.params.1"].kind)
    assert.is_true(ms.equal(nested(1).model["net1.weight"], store:read("model.net1.weight", 0)))
    assert.equal(0.2, store:read("optim.param_groups.1.lr"))
    assert.equal("run-2", store:read("name"))
    assert.equal(0.999, store:read("optim.param_groups.1.betas.2", 0))
    assert.same({}, store:verify())
    store:close()
  end)

  it("keeps the newest steps with keep_last", function()
    for step = 1, 4 do dcp.save(nested(step), dir, {step = step * 10, keep_last = 2}) end
    local store = dcp.open(dir)
    assert.same({30, 40}, store:steps())
    store:close()
  end)

  it("deletes a step, naming a step that is not committed", function()
    for step = 1, 3 do dcp.save(nested(step), dir, {step = step}) end
    dcp.delete(dir, 2)
    local store = dcp.open(dir)
    assert.same({1, 3}, store:steps())
    store:close()
    local ok, err = pcall(dcp.delete, dir, 2)
    assert.is_false(ok)
    assert.matches("^moonshard: dcp.delete: .*step 2 is not committed", err)
    local target = nested(9)
    dcp.load(target, dir, {step = 3})
    assert_same_state(nested(3), target)
  end)

  it("saves asynchronously from a staging copy and commits the step on wait", function()
    local sd = nested(3)
    local h = dcp.async_save(sd, dir, {step = 3})
    ms.no_grad(function() sd.model["net1.weight"]:fill_(0) end)
    sd.step = 99
    local store = dcp.open(dir)
    assert.same({}, store:steps())
    assert.equal(3, h:wait())
    assert.equal(3, h:wait())
    assert.same({3}, store:steps())
    local target = nested(8)
    dcp.load(target, dir)
    assert_same_state(nested(3), target)
    store:close()
  end)

  it("keeps the values of the call when every tensor changes right after async_save returns", function()
    ms.manual_seed(11)
    -- 4 MiB tensors are staged copy-on-write, the small ones with a plain copy.
    local sd = {model = {big = ms.randn(1024, 1024), wide = ms.randn(3, 700001), small = ms.randn(5, 7)},
                optim = {state = {exp_avg = ms.randn(1024, 1024, {dtype = "f64"})}}}
    local before = {big = sd.model.big:clone(), wide = sd.model.wide:clone(), small = sd.model.small:clone(),
                    exp_avg = sd.optim.state.exp_avg:clone()}
    local h = dcp.async_save(sd, dir, {step = 4})
    ms.no_grad(function()
      -- The ends first, before the writer thread can have copied them.
      sd.model.big:narrow(0, 1023, 1):fill_(7)
      sd.optim.state.exp_avg:narrow(0, 1023, 1):fill_(7)
      sd.model.big:add_(1)
      sd.model.wide:fill_(-2)
      sd.model.small:mul_(3)
      sd.optim.state.exp_avg:zero_()
    end)
    assert.equal(4, h:wait())
    local target = {model = {big = ms.zeros(1024, 1024), wide = ms.zeros(3, 700001), small = ms.zeros(5, 7)},
                    optim = {state = {exp_avg = ms.zeros(1024, 1024, {dtype = "f64"})}}}
    dcp.load(target, dir)
    assert.is_true(ms.equal(before.big, target.model.big))
    assert.is_true(ms.equal(before.wide, target.model.wide))
    assert.is_true(ms.equal(before.small, target.model.small))
    assert.is_true(ms.equal(before.exp_avg, target.optim.state.exp_avg))
  end)

  it("keeps the values of the call when peer ranks write into the tensors right after async_save #mpi", function()
    -- all_reduce on the local backend has peers write their pieces of the result straight
    -- into this rank's tensor, where no write fault of this process sees them
    local results = dist.spawn(2, function(rank)
      local mesh = dist.init_device_mesh({2})
      local dir = agreed_dir(dir)
      ms.manual_seed(20 + rank)
      local shard = ms.randn(4096, 4096)
      local sd = {w = ms.DTensor.from_local(shard, mesh, {ms.Shard(0)})}
      local before = shard:clone()
      local h = dcp.async_save(sd, dir, {step = 1})
      dist.all_reduce(shard)
      h:wait()
      local target = {w = ms.DTensor.from_local(ms.zeros(4096, 4096), mesh, {ms.Shard(0)})}
      dcp.load(target, dir)
      return ms.equal(before, target.w:to_local()) and not ms.equal(before, shard)
    end)
    assert.same({true, true}, results)
  end)

  it("makes a later save wait for the earlier async save", function()
    local first = dcp.async_save(nested(1), dir, {step = 1})
    dcp.save(nested(2), dir, {step = 2})
    local store = dcp.open(dir)
    assert.same({1, 2}, store:steps())
    assert.equal(1, first:wait())
    local target = nested(7)
    dcp.load(target, dir, {step = 1})
    assert_same_state(nested(1), target)
    store:close()
  end)

  it("stages an async save in the host pool and reuses the buffers for the next one", function()
    local sd = nested(5)
    local bytes = 0
    for _, t in pairs(sd.model) do bytes = bytes + t:nbytes() end
    local before = ms.memory_stats("host").allocated
    dcp.async_save(sd, dir, {step = 1}):wait()
    local staged = ms.memory_stats("host")
    assert.equal(bytes, staged.allocated - before)
    dcp.async_save(sd, dir, {step = 2}):wait()
    local again = ms.memory_stats("host")
    assert.equal(staged.allocated, again.allocated)
    assert.equal(staged.allocs, again.allocs)
  end)

  it("loads straight into the destination without allocating tensors", function()
    dcp.save(nested(6), dir)
    local target = nested(1)
    ms.reset_peak_memory_stats("cpu")
    local before = ms.memory_stats("cpu")
    dcp.load(target, dir)
    local after = ms.memory_stats("cpu")
    assert.equal(before.allocs, after.allocs)
    assert.equal(before.allocated, after.peak)
    assert_same_state(nested(6), target)
  end)

  it("saves and loads DTensors and values asynchronously on forked ranks", function()
    local results = dist.spawn(2, function(rank)
      local mesh = dist.init_device_mesh({2})
      local function state(seed)
        ms.manual_seed(seed)
        return {w = ms.distribute_tensor(ms.randn(5, 4), mesh, {ms.Shard(0)}),
                r = ms.distribute_tensor(ms.randn(3), mesh, {ms.Replicate()}), epoch = seed}
      end
      local h = dcp.async_save(state(1), dir, {step = 1})
      local step = h:wait()
      local target = state(2)
      dcp.load(target, dir)
      ms.manual_seed(1)
      local w, r = ms.randn(5, 4), ms.randn(3)
      return {step = step, rank = rank, epoch = target.epoch, w = ms.equal(w, target.w:full_tensor()),
              r = ms.equal(r, target.r:to_local()), rows = target.w:to_local():size(0)}
    end)
    assert.same({step = 1, rank = 0, epoch = 1, w = true, r = true, rows = 3}, results[1])
    assert.same({step = 1, rank = 1, epoch = 1, w = true, r = true, rows = 2}, results[2])
    local store = dcp.open(dir)
    assert.equal(1, #store:chunks("r"))
    assert.equal(0, store:chunks("r")[1].rank)
    store:close()
  end)
end)
