-- Optimizers from Lua: SGD, Adam and AdamW trajectories over several steps against
-- references written here in plain Lua loops from PyTorch's documented update rules, param
-- groups, zero_grad, state dicts that continue bit-identically, and bad arguments.
local ms = require "moonshard"
local optim = ms.optim
local gradcheck = require "support.gradcheck"

local flat = gradcheck.flat

-- The objective of every trajectory: f(p) = sum_i c_i p_i^2 + e_i p_i, gradient 2 c_i p_i + e_i.
local initial = {0.8, -1.3, 0.05, 2.1, -0.4, 1.7}
local curvature = {0.5, 1.5, 3.0, 0.2, 0.9, 2.2}
local slope = {0.3, -0.7, 0.1, 0.0, 1.2, -0.25}

local function objective(p)
  local c = ms.tensor(curvature, {dtype = p:dtype()})
  local e = ms.tensor(slope, {dtype = p:dtype()})
  return (c * p * p + e * p):sum()
end

local function reference_gradient(values)
  local g = {}
  for i, v in ipairs(values) do g[i] = 2 * curvature[i] * v + slope[i] end
  return g
end

-- torch.optim.SGD. The gradient is negated first under maximize (what PyTorch's
-- implementation does), then weight decay is added, then momentum with dampening.
local function sgd_reference(o)
  local lr, momentum, dampening = o.lr, o.momentum or 0, o.dampening or 0
  local weight_decay, nesterov, maximize = o.weight_decay or 0, o.nesterov, o.maximize
  local buffer = {}
  return function(p, grad)
    for i = 1, #p do
      local g = maximize and -grad[i] or grad[i]
      if weight_decay ~= 0 then g = g + weight_decay * p[i] end
      if momentum ~= 0 then
        if buffer[i] == nil then
          buffer[i] = g
        else
          buffer[i] = momentum * buffer[i] + (1 - dampening) * g
        end
        if nesterov then g = g + momentum * buffer[i] else g = buffer[i] end
      end
      p[i] = p[i] - lr * g
    end
  end
end

-- torch.optim.Adam (L2 weight decay added to the gradient) and torch.optim.AdamW
-- (decoupled: the parameter shrinks by lr * weight_decay before the moment updates).
local function adam_reference(o, decoupled)
  local lr, eps = o.lr or 1e-3, o.eps or 1e-8
  local beta1, beta2 = (o.betas or {0.9, 0.999})[1], (o.betas or {0.9, 0.999})[2]
  local weight_decay = o.weight_decay or (decoupled and 1e-2 or 0)
  local m, v, t = {}, {}, 0
  return function(p, grad)
    t = t + 1
    for i = 1, #p do
      local g = o.maximize and -grad[i] or grad[i]
      if decoupled then
        p[i] = p[i] - lr * weight_decay * p[i]
      elseif weight_decay ~= 0 then
        g = g + weight_decay * p[i]
      end
      m[i] = beta1 * (m[i] or 0) + (1 - beta1) * g
      v[i] = beta2 * (v[i] or 0) + (1 - beta2) * g * g
      local m_hat = m[i] / (1 - beta1 ^ t)
      local v_hat = v[i] / (1 - beta2 ^ t)
      p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    end
  end
end

local function assert_close(expected, actual, rtol, what)
  for i = 1, #expected do
    local e, a = expected[i], actual[i]
    assert.is_true(math.abs(e - a) <= rtol * (1e-3 + math.abs(e)),
                   string.format("%s element %d: %.17g, reference %.17g", what or "", i - 1, a, e))
  end
end

local function param(values, dtype)
  return ms.tensor(values, {dtype = dtype or "f64"}):requires_grad_(true)
end

-- Run `steps` steps of make_optimizer over the objective and of the reference; compare after
-- every step.
local function follows(make_optimizer, reference, opts)
  opts = opts or {}
  local p = param(initial, opts.dtype)
  local opt = make_optimizer({p})
  local expected = {unpack(initial)}
  for step = 1, opts.steps or 6 do
    opt:zero_grad()
    objective(p):backward()
    opt:step()
    reference(expected, reference_gradient(expected))
    assert_close(expected, flat(p), opts.rtol or 1e-12, "step " .. step)
  end
  -- the trajectory moved: a reference that ignored the update would not pass
  assert.is_true(math.abs(flat(p)[1] - initial[1]) > 1e-4)
end

local function raises(name, needle, fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "nothing was raised")
  local prefix = "moonshard: " .. name .. ":"
  assert.are.equal(prefix, tostring(err):sub(1, #prefix), tostring(err))
  if needle then assert.is_truthy(tostring(err):find(needle, 1, true), tostring(err)) end
end

describe("optim", function()
  describe("SGD", function()
    local cases = {
      {"plain", {lr = 0.1}},
      {"with momentum", {lr = 0.05, momentum = 0.9}},
      {"with momentum and dampening", {lr = 0.05, momentum = 0.9, dampening = 0.3}},
      {"with weight decay", {lr = 0.1, weight_decay = 0.2}},
      {"with nesterov momentum", {lr = 0.05, momentum = 0.8, nesterov = true}},
      {"maximizing with weight decay and momentum", {lr = 0.02, momentum = 0.5, weight_decay = 0.1, maximize = true}},
      {"with everything", {lr = 0.03, momentum = 0.7, weight_decay = 0.05, nesterov = true}},
    }
    for _, case in ipairs(cases) do
      local name, o = case[1], case[2]
      it(name .. " follows the reference over several steps", function()
        follows(function(params) return optim.SGD(params, o) end, sgd_reference(o))
      end)
    end

    it("with momentum in f32 follows the f64 reference to f32 precision", function()
      local o = {lr = 0.05, momentum = 0.9, weight_decay = 0.01}
      follows(function(params) return optim.SGD(params, o) end, sgd_reference(o), {dtype = "f32", rtol = 2e-5})
    end)
  end)

  describe("Adam", function()
    local cases = {
      {"with the defaults", {}},
      {"with a larger lr and other betas", {lr = 0.05, betas = {0.8, 0.99}, eps = 1e-6}},
      {"with L2 weight decay", {lr = 0.02, weight_decay = 0.3}},
      {"maximizing", {lr = 0.01, maximize = true}},
    }
    for _, case in ipairs(cases) do
      local name, o = case[1], case[2]
      it(name .. " follows the reference over several steps", function()
        follows(function(params) return optim.Adam(params, o) end, adam_reference(o, false), {rtol = 1e-10})
      end)
    end

    it("in f32 follows the f64 reference to f32 precision", function()
      local o = {lr = 0.01}
      follows(function(params) return optim.Adam(params, o) end, adam_reference(o, false),
              {dtype = "f32", rtol = 2e-5})
    end)

    it("rejects an amsgrad that is not a boolean", function()
      raises("Adam", "amsgrad must be true or false", function() optim.Adam({param(initial)}, {amsgrad = 1}) end)
    end)
  end)

  describe("AdamW", function()
    local cases = {
      {"with the defaults (weight decay 1e-2)", {}},
      {"with a strong decoupled weight decay", {lr = 0.05, weight_decay = 0.5}},
      {"maximizing", {lr = 0.02, weight_decay = 0.1, maximize = true}},
    }
    for _, case in ipairs(cases) do
      local name, o = case[1], case[2]
      it(name .. " follows the reference over several steps", function()
        follows(function(params) return optim.AdamW(params, o) end, adam_reference(o, true), {rtol = 1e-10})
      end)
    end

    it("differs from Adam with the same weight decay", function()
      local a, b = param(initial), param(initial)
      local adam, adamw = optim.Adam({a}, {lr = 0.05, weight_decay = 0.5}), optim.AdamW({b}, {lr = 0.05, weight_decay = 0.5})
      for _ = 1, 3 do
        for _, pair in ipairs({{a, adam}, {b, adamw}}) do
          pair[2]:zero_grad()
          objective(pair[1]):backward()
          pair[2]:step()
        end
      end
      assert.is_false(ms.allclose(a, b, {rtol = 1e-6, atol = 0}))
    end)
  end)

  describe("non-contiguous parameters", function()
    -- a [3, 2] parameter stored transposed: its elements in row-major order are initial's
    local function transposed_param()
      local stored = ms.tensor({{initial[1], initial[3], initial[5]}, {initial[2], initial[4], initial[6]}},
                               {dtype = "f64"})
      return stored:t():detach():requires_grad_(true)
    end

    for _, case in ipairs({
      {"SGD with momentum", function(params) return optim.SGD(params, {lr = 0.05, momentum = 0.9}) end,
       sgd_reference({lr = 0.05, momentum = 0.9})},
      {"AdamW", function(params) return optim.AdamW(params, {lr = 0.05}) end, adam_reference({lr = 0.05}, true)},
    }) do
      it(case[1] .. " steps a transposed view element by element like a dense one", function()
        local p = transposed_param()
        assert.is_false(p:is_contiguous())
        local opt = case[2]({p})
        local expected = {unpack(initial)}
        for _ = 1, 4 do
          opt:zero_grad()
          objective(p:reshape(6)):backward()
          opt:step()
          case[3](expected, reference_gradient(expected))
        end
        assert_close(expected, flat(p), 1e-10)
      end)
    end
  end)

  describe("several parameters in one step", function()
    local ffi = require "ffi"
    local lib = require("moonshard.ffi").lib
    local function tensor_array(ctype, list)
      local a = ffi.new(ctype .. "[?]", #list)
      for i, t in ipairs(list) do a[i - 1] = t._c end
      return a
    end

    -- a group of dense parameters of several sizes (the elements split between threads
    -- across parameters), one without a gradient at step 2 (so it falls a step behind), and a
    -- second group with a transposed view (stepped one parameter at a time)
    it("AdamW steps them like one ms_adam_step each, bit for bit", function()
      ms.manual_seed(5)
      local shapes = {{300, 400}, {7}, {1}, {513, 129}, {64}}
      local params, copies, moments = {}, {}, {}
      for i, shape in ipairs(shapes) do
        params[i] = ms.randn(unpack(shape)):requires_grad_()
        copies[i] = params[i]:detach():clone()
        moments[i] = {ms.zeros(unpack(shape)), ms.zeros(unpack(shape)), 0}
      end
      local dense = {unpack(params)}
      local stored = ms.randn(5, 3)
      params[#params + 1] = stored:t():detach():requires_grad_()
      copies[#copies + 1] = params[#params]:detach():clone()
      moments[#moments + 1] = {ms.zeros(3, 5), ms.zeros(3, 5), 0}
      params[#params + 1] = ms.randn(9):requires_grad_()
      copies[#copies + 1] = params[#params]:detach():clone()
      moments[#moments + 1] = {ms.zeros(9), ms.zeros(9), 0}
      local opt = optim.AdamW({{params = dense}, {params = {params[#params - 1], params[#params]}}},
                              {lr = 0.01, weight_decay = 0.1})
      for step = 1, 3 do
        opt:zero_grad()
        for i, p in ipairs(params) do
          if not (step == 2 and i == 2) then
            local g = ms.randn(unpack(p:shape()))
            p.grad = g
            local m = moments[i]
            m[3] = m[3] + 1
            assert.are.equal(0, lib.ms_adam_step(copies[i]._c, m[1]._c, m[2]._c, g._c, m[3], 0.01, 0.9, 0.999,
                                                 1e-8, 0.1, 1, 0))
          end
        end
        opt:step()
      end
      for i, p in ipairs(params) do assert.is_true(ms.equal(p, copies[i]), "parameter " .. i) end
    end)

    it("refuses a negative count, a missing operand and a mismatched state, naming the parameter", function()
      local a, b = ms.zeros(4), ms.zeros(3)
      local function fails(pattern, status)
        assert.are_not.equal(0, status)
        local message = ffi.string(lib.ms_last_error())
        assert.is_truthy(message:find(pattern, 1, true), message)
      end
      local ps, gs = tensor_array("ms_tensor *", {a, b}), tensor_array("const ms_tensor *", {a, b})
      fails("count -1", lib.ms_adam_step_many(-1, ps, ps, ps, gs, 1, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0))
      local holes = ffi.new("ms_tensor *[2]") -- zero-filled: entry 1 stays NULL
      holes[0] = a._c
      fails("parameter 1 has a NULL operand", lib.ms_adam_step_many(2, ps, holes, ps, gs, 1, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0))
      local states = tensor_array("ms_tensor *", {ms.zeros(4), ms.zeros(5)})
      fails("(parameter 1)", lib.ms_adam_step_many(2, ps, states, states, gs, 1, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0))
      fails("step 0 must be >= 1", lib.ms_adam_step_many(2, ps, ps, ps, gs, 0, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0))
    end)
  end)

  describe("param groups", function()
    it("step each group with its own lr and momentum", function()
      local a, b = param({1.0, -2.0, 0.5}), param({0.3, 0.7})
      local opt = optim.SGD({{params = {a}, lr = 0.1}, {params = {b}, momentum = 0.9}}, {lr = 0.01})
      assert.are.equal(0.1, opt.param_groups[1].lr)
      assert.are.equal(0.01, opt.param_groups[2].lr)
      local ref_a, ref_b = sgd_reference({lr = 0.1}), sgd_reference({lr = 0.01, momentum = 0.9})
      local expected_a, expected_b = {1.0, -2.0, 0.5}, {0.3, 0.7}
      for _ = 1, 4 do
        opt:zero_grad()
        local loss = (a * a):sum() + (b * b * b):sum()
        loss:backward()
        opt:step()
        local ga, gb = {}, {}
        for i, v in ipairs(expected_a) do ga[i] = 2 * v end
        for i, v in ipairs(expected_b) do gb[i] = 3 * v * v end
        ref_a(expected_a, ga)
        ref_b(expected_b, gb)
      end
      assert_close(expected_a, flat(a), 1e-12, "group 0")
      assert_close(expected_b, flat(b), 1e-12, "group 1")
    end)

    it("add_param_group adds a group with the defaults filled in", function()
      local opt = optim.Adam({param(initial)}, {lr = 0.02})
      opt:add_param_group({params = {param({1, 2})}, eps = 1e-4})
      assert.are.equal(2, #opt.param_groups)
      assert.are.equal(0.02, opt.param_groups[2].lr)
      assert.are.equal(1e-4, opt.param_groups[2].eps)
    end)
  end)

  describe("zero_grad and step", function()
    it("zero_grad sets gradients to none by default", function()
      local p = param(initial)
      local opt = optim.SGD({p}, {lr = 0.1})
      objective(p):backward()
      assert.is_not_nil(p.grad)
      opt:zero_grad()
      assert.is_nil(p.grad)
    end)

    it("zero_grad returns the gradients' memory to the pool at once", function()
      local p = ms.zeros(1000, {dtype = "f64", requires_grad = true})
      local opt = optim.SGD({p}, {lr = 0.1})
      p:sum():backward()
      local before = ms.memory_stats("cpu").allocated
      opt:zero_grad()
      assert.are.equal(before - 8000, ms.memory_stats("cpu").allocated)
    end)

    it("zero_grad(false) keeps the gradients as zeros", function()
      local p = param(initial)
      local opt = optim.SGD({p}, {lr = 0.1})
      objective(p):backward()
      opt:zero_grad(false)
      assert.are.same({0, 0, 0, 0, 0, 0}, flat(p.grad))
    end)

    it("step skips parameters without a gradient and makes no state for them", function()
      local a, b = param({1, 2}), param({3, 4})
      local opt = optim.Adam({a, b}, {lr = 0.1})
      ms.sum(a * a):backward()
      opt:step()
      assert.are.same({3, 4}, flat(b))
      assert.is_nil(opt.state[b])
      assert.are.equal(1, opt.state[a].step)
    end)

    it("step calls the closure and returns its loss", function()
      local p = param(initial)
      local opt = optim.SGD({p}, {lr = 0.1})
      local loss = opt:step(function()
        opt:zero_grad()
        local l = objective(p)
        l:backward()
        return l
      end)
      assert.is_true(ms.is_tensor(loss))
      local expected = {unpack(initial)}
      sgd_reference({lr = 0.1})(expected, reference_gradient(expected))
      assert_close(expected, flat(p), 1e-12)
    end)
  end)

  describe("state_dict and load_state_dict", function()
    local function train(p, opt, steps)
      for _ = 1, steps do
        opt:zero_grad()
        objective(p):backward()
        opt:step()
      end
    end

    local makers = {
      {"SGD with momentum", function(params) return optim.SGD(params, {lr = 0.05, momentum = 0.9}) end},
      {"Adam", function(params) return optim.Adam(params, {lr = 0.05}) end},
      {"AdamW", function(params) return optim.AdamW(params, {lr = 0.05, weight_decay = 0.1}) end},
    }
    for _, maker in ipairs(makers) do
      it(maker[1] .. ": a fresh optimizer loaded from the state dict continues bit-identically", function()
        local p = param(initial)
        local opt = maker[2]({p})
        train(p, opt, 3)
        local sd = opt:state_dict()
        local q = param(flat(p))
        local restored = maker[2]({q})
        restored:load_state_dict(sd)
        train(p, opt, 3)
        train(q, restored, 3)
        assert.is_true(ms.equal(p, q))
        assert.is_false(ms.equal(q, param(initial)))
      end)
    end

    it("a fresh optimizer without the state dict does not continue identically", function()
      local p = param(initial)
      local opt = optim.Adam({p}, {lr = 0.05})
      train(p, opt, 3)
      local q = param(flat(p))
      local fresh = optim.Adam({q}, {lr = 0.05})
      train(p, opt, 3)
      train(q, fresh, 3)
      assert.is_false(ms.equal(p, q))
    end)

    it("has PyTorch's layout: state by 0-based parameter index, groups with their hyper-parameters", function()
      local a, b, c = param({1, 2}), param({3}), param({4, 5, 6})
      local opt = optim.Adam({{params = {a, b}}, {params = {c}, lr = 0.5}}, {lr = 0.01})
      local loss = (a * a):sum() + (c * c):sum()
      loss:backward()
      opt:step()
      local sd = opt:state_dict()
      assert.are.same({0, 1}, sd.param_groups[1].params)
      assert.are.same({2}, sd.param_groups[2].params)
      assert.are.equal(0.01, sd.param_groups[1].lr)
      assert.are.equal(0.5, sd.param_groups[2].lr)
      assert.are.same({0.9, 0.999}, sd.param_groups[1].betas)
      assert.are.equal(1, sd.state[0].step)
      assert.is_nil(sd.state[1])
      assert.are.same({3}, sd.state[2].exp_avg:shape())
    end)

    it("loads hyper-parameters saved in the state dict", function()
      local p = param(initial)
      local opt = optim.SGD({p}, {lr = 0.1})
      local sd = opt:state_dict()
      sd.param_groups[1].lr = 0.25
      local restored = optim.SGD({param(initial)}, {lr = 0.1})
      restored:load_state_dict(sd)
      assert.are.equal(0.25, restored.param_groups[1].lr)
    end)

    it("copies the state: stepping the source afterwards leaves the loaded copy alone", function()
      local p = param(initial)
      local opt = optim.SGD({p}, {lr = 0.05, momentum = 0.9})
      train(p, opt, 2)
      local restored = optim.SGD({param(initial)}, {lr = 0.05, momentum = 0.9})
      restored:load_state_dict(opt:state_dict())
      local before = flat(restored.state[restored.param_groups[1].params[1]].momentum_buffer)
      train(p, opt, 1)
      assert.are.same(before, flat(restored.state[restored.param_groups[1].params[1]].momentum_buffer))
    end)

    it("rejects a state dict with another number of groups or parameters", function()
      local opt = optim.SGD({param(initial)}, {lr = 0.1})
      local two = optim.SGD({{params = {param({1})}}, {params = {param({2})}}}, {lr = 0.1})
      raises("load_state_dict", "param groups", function() opt:load_state_dict(two:state_dict()) end)
      local pair = optim.SGD({param({1}), param({2})}, {lr = 0.1})
      raises("load_state_dict", "params", function() opt:load_state_dict(pair:state_dict()) end)
      raises("load_state_dict", nil, function() opt:load_state_dict("state") end)
    end)
  end)

  describe("bad arguments", function()
    it("a negative lr", function()
      raises("SGD", "lr", function() optim.SGD({param(initial)}, {lr = -0.1}) end)
      raises("Adam", "lr", function() optim.Adam({param(initial)}, {lr = -1}) end)
      raises("AdamW", "lr", function() optim.AdamW({param(initial)}, {lr = -1}) end)
    end)
    it("an lr that is not a number, or none for SGD", function()
      raises("SGD", "lr", function() optim.SGD({param(initial)}, {lr = "fast"}) end)
      raises("SGD", "lr", function() optim.SGD({param(initial)}) end)
    end)
    it("betas outside [0, 1) or not a pair", function()
      raises("Adam", "betas", function() optim.Adam({param(initial)}, {betas = {1.0, 0.999}}) end)
      raises("Adam", "betas", function() optim.Adam({param(initial)}, {betas = {0.9, -0.1}}) end)
      raises("AdamW", "betas", function() optim.AdamW({param(initial)}, {betas = 0.9}) end)
    end)
    it("a negative eps, momentum or weight decay", function()
      raises("Adam", "eps", function() optim.Adam({param(initial)}, {eps = -1e-8}) end)
      raises("SGD", "momentum", function() optim.SGD({param(initial)}, {lr = 0.1, momentum = -0.5}) end)
      raises("SGD", "weight_decay", function() optim.SGD({param(initial)}, {lr = 0.1, weight_decay = -1}) end)
      raises("AdamW", "weight_decay", function() optim.AdamW({param(initial)}, {weight_decay = -1}) end)
    end)
    it("nesterov without momentum", function()
      raises("SGD", "nesterov", function() optim.SGD({param(initial)}, {lr = 0.1, nesterov = true}) end)
    end)
    it("an unknown option", function()
      raises("SGD", "momentun", function() optim.SGD({param(initial)}, {lr = 0.1, momentun = 0.9}) end)
    end)
    it("params that are not tensors", function()
      raises("SGD", "parameter 2", function() optim.SGD({param(initial), 3}, {lr = 0.1}) end)
      raises("Adam", "non-empty", function() optim.Adam({}, {}) end)
      raises("Adam", "non-empty", function() optim.Adam(param(initial), {}) end)
      raises("SGD", "params", function() optim.SGD({{params = 5}}, {lr = 0.1}) end)
    end)
    it("a parameter given twice", function()
      local p = param(initial)
      raises("SGD", "more than once", function() optim.SGD({{params = {p}}, {params = {p}}}, {lr = 0.1}) end)
    end)
    it("a group added later with bad hyper-parameters", function()
      local opt = optim.Adam({param(initial)})
      raises("Adam", "betas", function() opt:add_param_group({params = {param({1})}, betas = {2, 0}}) end)
    end)
    it("a closure that is not a function", function()
      raises("SGD", "closure", function() optim.SGD({param(initial)}, {lr = 0.1}):step(5) end)
    end)
    it("a gradient of another dtype than its parameter", function()
      local p = param(initial)
      local opt = optim.SGD({p}, {lr = 0.1})
      p.grad = ms.zeros(6)
      raises("SGD.step", "dtype", function() opt:step() end)
    end)
  end)
end)
