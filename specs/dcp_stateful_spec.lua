-- Stateful values in dcp state dicts: schedulers, samplers and user objects are saved
-- through state_dict() and restored in place through load_state_dict() (nested ones too);
-- floats load into tensors of another float dtype by casting; bad Stateful objects and
-- integer targets get clear errors.
local ms = require "moonshard"
local store_dirs = require "support.store_dirs"
local dcp, optim = ms.dcp, ms.optim

local Counter = {}
Counter.__index = Counter
local function counter(n) return setmetatable({n = n, loads = 0}, Counter) end
function Counter:state_dict() return {n = self.n, history = {self.n - 1, self.n - 2}} end
function Counter:load_state_dict(sd)
  self.n = sd.n
  self.loads = self.loads + 1
end

local function schedule()
  local opt = optim.SGD({ms.zeros(2, {requires_grad = true})}, {lr = 0.1})
  return opt, optim.lr_scheduler.CosineAnnealingLR(opt, {T_max = 10})
end

describe("dcp Stateful values", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("restore a scheduler, a sampler and a user object in place", function()
    local opt, sched = schedule()
    for _ = 1, 4 do sched:step() end
    local sampler = ms.data.DistributedSampler(20, {seed = 2})
    sampler:set_epoch(3)
    local it = sampler:iter()
    for _ = 1, 5 do it() end
    local tree = {opt = opt, sched = sched, sampler = sampler, user = counter(42), n = 1}
    dcp.save(tree, dir)
    assert.equal(sched, tree.sched) -- the caller's tree is as it was
    assert.equal(42, tree.user.n)

    local opt2, sched2 = schedule()
    local sampler2 = ms.data.DistributedSampler(20, {seed = 2})
    local user2 = counter(0)
    local target = {opt = opt2, sched = sched2, sampler = sampler2, user = user2, n = 0}
    dcp.load(target, dir)
    assert.equal(sched2, target.sched)
    assert.equal(user2, target.user)
    assert.equal(4, sched2.last_epoch)
    assert.are.same(sched:get_last_lr(), sched2:get_last_lr())
    assert.are.same({epoch = 3, consumed = 5, seed = 2, n = 20}, sampler2:state_dict())
    assert.equal(42, user2.n)
    assert.equal(1, user2.loads)
    assert.equal(1, target.n)
    assert.equal(opt.param_groups[1].lr, opt2.param_groups[1].lr) -- the optimizer is Stateful too
    sched:step(); sched2:step()
    assert.are.same(sched:get_last_lr(), sched2:get_last_lr())
    local store = dcp.open(dir)
    local keys = {}
    for _, e in ipairs(store:entries()) do keys[e.fqn] = true end
    store:close()
    assert.is_true(keys["sched.last_epoch"] and keys["sampler.consumed"] and keys["user.history.2"])
  end)

  it("restore Stateful objects nested in a Stateful's state dict", function()
    local order = {}
    local Outer = {}
    Outer.__index = Outer
    function Outer:state_dict() return {inner = self.inner, k = self.k} end
    function Outer:load_state_dict(sd)
      order[#order + 1] = "outer"
      assert.equal(self.inner, sd.inner) -- handed back as the object it returned
      self.k = sd.k
    end
    local inner = counter(9)
    local saved = setmetatable({inner = inner, k = 5}, Outer)
    dcp.save({o = saved}, dir)
    local inner2 = counter(0)
    local loaded = setmetatable({inner = inner2, k = 0}, Outer)
    dcp.load({o = loaded}, dir)
    assert.equal(9, inner2.n)
    assert.equal(1, inner2.loads)
    assert.equal(5, loaded.k)
    assert.are.same({"outer"}, order)
  end)

  it("recognise any table with callable state_dict and load_state_dict, metatable or not", function()
    local function plain(n)
      local obj = {n = n}
      obj.state_dict = function() return {n = obj.n} end
      obj.load_state_dict = function(_, sd) obj.n = sd.n end
      return obj
    end
    local Call = setmetatable({}, {__call = function(_, self) return {n = self.n} end})
    local Load = setmetatable({}, {__call = function(_, self, sd) self.n = sd.n end})
    local callable = {n = 11, state_dict = Call, load_state_dict = Load}
    dcp.save({bad = plain(6), c = callable}, dir)
    local target = {bad = plain(0), c = {n = 0, state_dict = Call, load_state_dict = Load}}
    local bad, c = target.bad, target.c
    dcp.load(target, dir)
    assert.equal(bad, target.bad)
    assert.equal(6, bad.n)
    assert.equal(c, target.c)
    assert.equal(11, c.n)
    local half = {state_dict = function() return {} end}
    assert.are.equal("moonshard: dcp.save: 'x.half' has a callable state_dict but no load_state_dict; a Stateful " ..
                     "needs both", select(2, pcall(dcp.save, {x = {half = half}}, dir)))
  end)

  it("refuse a Stateful whose state_dict() returns something other than a table", function()
    local bad = setmetatable({}, {__index = {state_dict = function() return 7 end, load_state_dict = function() end}})
    local ok, err = pcall(dcp.save, {train = {thing = bad}}, dir)
    assert.is_false(ok)
    assert.matches("moonshard: dcp.save: 'train.thing' is a Stateful whose state_dict%(%) returned a number, not a table", err)
    ok, err = pcall(dcp.load, {thing = bad}, dir)
    assert.matches("moonshard: dcp.load: 'thing' is a Stateful whose state_dict%(%) returned a number", err)
    local object = setmetatable({}, {__index = {state_dict = function() return setmetatable({}, {}) end,
                                                load_state_dict = function() end}})
    ok, err = pcall(dcp.save, {thing = object}, dir)
    assert.matches("'thing' is a Stateful whose state_dict%(%) returned an object, not a table", err)
  end)

  it("do not load any object when the checkpoint does not match", function()
    dcp.save({user = counter(3)}, dir)
    local user = counter(0)
    local ok, err = pcall(dcp.load, {user = user, extra = 1}, dir)
    assert.is_false(ok)
    assert.matches("missing keys .*: extra", err)
    assert.equal(0, user.loads)
    assert.equal(0, user.n)
  end)
end)

describe("dcp loads into another dtype", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("casts floats to the target's float dtype, as PyTorch's copy_ does", function()
    local values = {1.5, -2.25, 1 / 3, 1e-3}
    dcp.save({w = ms.tensor(values, {dtype = "f64"}), v = ms.tensor(values)}, dir)
    local as_f32, as_bf16, as_f64 = ms.zeros(4), ms.zeros(4, {dtype = "bf16"}), ms.zeros(4, {dtype = "f64"})
    dcp.load({w = as_f32, v = as_f64}, dir)
    assert.is_true(ms.equal(ms.tensor(values, {dtype = "f64"}):to("f32"), as_f32))
    assert.is_true(ms.equal(ms.tensor(values):to("f64"), as_f64))
    dcp.load({w = as_bf16, v = ms.zeros(4)}, dir)
    assert.is_true(ms.equal(ms.tensor(values, {dtype = "f64"}):to("bf16"), as_bf16))
  end)

  it("refuses to load a float into an integer tensor", function()
    dcp.save({w = ms.tensor({1.5, 2})}, dir)
    local target = ms.zeros(2, {dtype = "i32"})
    local ok, err = pcall(dcp.load, {w = target}, dir)
    assert.is_false(ok)
    assert.matches("dtype mismatch for 'w': the checkpoint has f32, the state dict has i32 %(only floating%-point " ..
                   "values cast on load%)", err)
    assert.are.same({0, 0}, target:table())
  end)
end)
