-- Every argument moonshard calls back takes any callable, as Python takes any callable:
-- a function, a table whose metatable has __call, a Module instance.
local ms = require "moonshard"
local nn, optim, data, ac, dist = ms.nn, ms.optim, ms.data, ms.ac, ms.dist

-- A callable table that counts its calls and answers answer(...).
local function callable(answer)
  local calls = {n = 0}
  return setmetatable(calls, {__call = function(self, ...)
    self.n = self.n + 1
    return answer(...)
  end})
end

describe("callables", function()
  it("DataLoader takes a callable collate_fn", function()
    local collate = callable(function(xs) return #xs end)
    local sizes = {}
    for b in data.DataLoader({10, 20, 30}, {batch_size = 2, collate_fn = collate}):iter() do sizes[#sizes + 1] = b end
    assert.are.same({2, 1}, sizes)
    assert.are.equal(2, collate.n)
    local Count = nn.Module:extend("Count")
    function Count:forward(xs) return #xs * 100 end
    local counted = {}
    for b in data.DataLoader({1, 2, 3}, {batch_size = 2, collate_fn = Count()}):iter() do counted[#counted + 1] = b end
    assert.are.same({200, 100}, counted)
  end)

  it("LambdaLR takes a callable lr_lambda, alone or one per group", function()
    local p = nn.Parameter(ms.zeros(2))
    local opt = optim.SGD({p}, {lr = 1})
    local half = callable(function(epoch) return 0.5 ^ epoch end)
    local sched = optim.lr_scheduler.LambdaLR(opt, half)
    opt:step(); sched:step(); opt:step(); sched:step()
    assert.are.equal(0.25, opt.param_groups[1].lr)
    assert.is_true(half.n >= 3)
    local opt2 = optim.SGD({p}, {lr = 1})
    optim.lr_scheduler.LambdaLR(opt2, {callable(function(epoch) return 3 + epoch end)})
    assert.are.equal(3, opt2.param_groups[1].lr)
  end)

  it("an optimizer's step takes a callable closure and returns its loss", function()
    local p = nn.Parameter(ms.tensor{1, 2})
    local opt = optim.SGD({p}, {lr = 0.5})
    local closure = callable(function()
      opt:zero_grad()
      local loss = (p * p):sum()
      loss:backward()
      return loss
    end)
    local loss = opt:step(closure)
    assert.are.equal(5, loss:item())
    assert.are.same({0, 0}, p:table()) -- p - 0.5 * 2p
    assert.are.equal(1, closure.n)
  end)

  it("checkpoint takes a callable policy and asks it about the ops it runs", function()
    local policy = callable(function() return "save" end)
    local lin = nn.Linear(3, 3)
    local x = ms.randn(2, 3, {requires_grad = true})
    ac.checkpoint(lin, x, {policy = policy}):sum():backward()
    assert.is_true(policy.n > 0)
    assert.is_not_nil(rawget(x, "grad"))
  end)

  it("dist.spawn runs callable tables on every rank", function()
    local results = dist.spawn(2, callable(function(rank, size) return rank * 10 + size end))
    assert.are.same({2, 12}, results)
    local Echo = nn.Module:extend("Echo")
    function Echo:__init(rank) self.rank = rank end
    local built = dist.spawn(2, setmetatable({}, {__call = function(_, rank) return Echo(rank).rank end}))
    assert.are.same({0, 1}, built)
  end)

  it("a table without __call is refused by each, naming the argument", function()
    local plain = {}
    assert.matches("collate_fn must be callable", select(2, pcall(data.DataLoader, {1}, {collate_fn = plain})))
    local opt = optim.SGD({nn.Parameter(ms.zeros(1))}, {lr = 1})
    assert.matches("lr_lambda 1 is a table, not callable",
                   select(2, pcall(optim.lr_scheduler.LambdaLR, opt, {plain})))
    assert.matches("closure must be callable", select(2, pcall(opt.step, opt, 5)))
    assert.matches("policy must be callable", select(2, pcall(ac.checkpoint_wrapper, nn.Linear(2, 2), {policy = plain})))
    assert.matches("fn must be callable", select(2, pcall(dist.spawn, 1, plain)))
  end)
end)
