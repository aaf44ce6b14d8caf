-- The autograd engine: backward and gradient accumulation, retain_graph, no_grad, tensor and
-- post-accumulate-grad hooks, saved-tensor hooks, queued callbacks, reentrant backward,
-- autograd.grad and detection of in-place changes to saved tensors.
local ms = require "moonshard"
local global_state = require "support.global_state"

local function f64(values, requires_grad)
  return ms.tensor(values, {dtype = "f64", requires_grad = requires_grad})
end

local function errors_with(fn, pattern)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error matching " .. pattern)
  assert.is_truthy(tostring(err):find(pattern), tostring(err))
end

before_each(global_state.save)
after_each(global_state.restore)

describe("autograd", function()
  describe("backward", function()
    it("fills .grad of the leaves with the gradient of a scalar", function()
      local x = f64({-1, 0.5, 2}, true)
      local y = (x * 2 + 1):relu():sum()
      y:backward()
      -- d/dx relu(2x + 1) = 2 where 2x + 1 > 0
      assert.are.same({0, 2, 2}, x.grad:table())
    end)

    it("records a grad_fn on results and none on leaves", function()
      local x = f64({1, 2}, true)
      local y = x * 3
      assert.is_true(y.requires_grad)
      assert.is_not_nil(y.grad_fn)
      assert.is_false(y:is_leaf())
      assert.is_nil(x.grad_fn)
      assert.is_true(x:is_leaf())
    end)

    it("does not record anything when no input requires grad", function()
      local y = f64({1, 2}) * 3
      assert.is_falsy(y.requires_grad)
      assert.is_nil(y.grad_fn)
    end)

    it("sums the gradients of a tensor used twice", function()
      local x = f64({3, -1}, true)
      local y = (x * x + x):sum()
      y:backward()
      assert.are.same({7, -1}, x.grad:table())
    end)

    it("sends gradients along both branches of a diamond", function()
      local x = f64({1, 2}, true)
      local h = x * 2
      local y = (h:exp() + h * 3):sum()
      y:backward()
      local grads = x.grad:table()
      for i, v in ipairs({1, 2}) do
        assert.is_true(math.abs(grads[i] - (2 * math.exp(2 * v) + 6)) < 1e-9)
      end
    end)

    it("takes an explicit gradient for a non-scalar output", function()
      local x = f64({1, 2, 3}, true)
      local y = x * 2
      y:backward(f64({1, 10, 100}))
      assert.are.same({2, 20, 200}, x.grad:table())
    end)

    it("works from a leaf", function()
      local x = f64({5}, true)
      x:backward()
      assert.are.same({1}, x.grad:table())
    end)

    it("leaves .grad of leaves that do not require grad nil", function()
      local x, w = f64({1, 2}, true), f64({3, 4})
      ;(x * w):sum():backward()
      assert.is_nil(w.grad)
      assert.are.same({3, 4}, x.grad:table())
    end)

    it("gives gradients of the leaves' shape through broadcasting", function()
      local x, b = f64({{1, 2, 3}, {4, 5, 6}}, true), f64({1, 1, 1}, true)
      ;(x + b):sum():backward()
      assert.are.same({2, 2, 2}, b.grad:table())
      assert.are.same({{1, 1, 1}, {1, 1, 1}}, x.grad:table())
    end)

    it("ms.autograd.backward takes several roots with their gradients", function()
      local x = f64({1, 2}, true)
      local a, b = x * 2, x * 3
      ms.autograd.backward({a, b}, {f64({1, 1}), f64({10, 10})})
      assert.are.same({32, 32}, x.grad:table())
    end)

    it("retain_grad keeps the gradient of an intermediate", function()
      local x = f64({1, 2}, true)
      local h = (x * 3):retain_grad()
      ;(h * h):sum():backward()
      assert.are.same({6, 12}, h.grad:table())
      assert.are.same({18, 36}, x.grad:table())
    end)

    it("retain_grad accumulates over backward passes, as a leaf's grad does, and once per call", function()
      local x = f64({1, 2, 3}, true)
      local h = x + 1
      h:retain_grad()
      h:retain_grad()
      assert.is_true(h.retains_grad)
      local y = (h + h):sum()
      y:backward(nil, {retain_graph = true})
      y:backward()
      assert.are.same({4, 4, 4}, h.grad:table()) -- PyTorch 2.15 gives [4, 4, 4]
    end)

    it("casts a root gradient of another dtype to the tensor's, as PyTorch does", function()
      local z = ms.tensor({1, 2}, {requires_grad = true})
      ;(z * 2):backward(ms.ones(2, {dtype = "f64"}))
      assert.are.equal("f32", z.grad:dtype())
      assert.are.same({2, 2}, z.grad:table())
    end)
  end)

  describe("gradient accumulation", function()
    it("adds the gradients of two backward passes", function()
      local x = f64({1, 2}, true)
      ;(x * 3):sum():backward()
      ;(x * x):sum():backward()
      assert.are.same({5, 7}, x.grad:table())
    end)

    it("a leaf's first gradient is the one backward made when nothing else holds it (no copy)", function()
      local x = ms.randn(64, 256)
      local w = ms.randn(256, 256, {requires_grad = true})
      local y = ms.matmul(x, w):sum()
      collectgarbage("collect")
      collectgarbage("stop")
      local base = ms.memory_stats().allocated
      ms.reset_peak_memory_stats()
      y:backward()
      local peak = ms.memory_stats().peak - base
      collectgarbage("restart")
      -- backward holds the output's gradient [64, 256] and makes w's [256, 256]; a copy of
      -- the latter would add another w:nbytes() at the peak
      assert.is_true(peak < 2 * w:nbytes(), ("peak %d bytes for a %d-byte gradient"):format(peak, w:nbytes()))
      -- and it is w's own gradient, equal to x^T @ ones
      local want = ms.matmul(x:t(), ms.ones(64, 256))
      assert.is_true(ms.equal(w.grad, want))
    end)

    it("a gradient two inputs share is copied for the first and handed to the second", function()
      local a = f64({1, 2}, true)
      local b = f64({3, 4}, true)
      ;(a + b):sum():backward()
      assert.are.same({1, 1}, a.grad:table())
      assert.are.same({1, 1}, b.grad:table())
      a.grad:add_(1)
      assert.are.same({1, 1}, b.grad:table())
    end)

    it("starts again after .grad is cleared", function()
      local x = f64({1, 2}, true)
      ;(x * 3):sum():backward()
      x.grad = nil
      ;(x * 5):sum():backward()
      assert.are.same({5, 5}, x.grad:table())
    end)
  end)

  describe("retain_graph", function()
    it("lets backward run twice over the same graph", function()
      local x = f64({1, 2}, true)
      local y = (x * x):sum()
      y:backward({retain_graph = true})
      y:backward()
      assert.are.same({4, 8}, x.grad:table())
    end)

    it("is needed for a second backward through saved tensors", function()
      local x = f64({1, 2}, true)
      local y = (x * x):sum()
      y:backward()
      errors_with(function() y:backward() end, "^moonshard: backward: .*second time")
    end)

    it("can be passed with an explicit gradient", function()
      local x = f64({1, 2}, true)
      local y = x:exp()
      y:backward(f64({1, 1}), {retain_graph = true})
      y:backward(f64({1, 1}))
      for i, v in ipairs({1, 2}) do
        assert.is_true(math.abs(x.grad:table()[i] - 2 * math.exp(v)) < 1e-9)
      end
    end)
  end)

  describe("no_grad", function()
    it("records no graph inside", function()
      local x = f64({1, 2}, true)
      local y = ms.no_grad(function() return x * 2 end)
      assert.is_falsy(y.requires_grad)
      assert.is_nil(y.grad_fn)
    end)

    it("returns every result of the function", function()
      local a, b = ms.no_grad(function() return 1, 2 end)
      assert.are.equal(1, a)
      assert.are.equal(2, b)
    end)

    it("turns grad mode off inside and back on after", function()
      assert.is_true(ms.is_grad_enabled())
      local inside = ms.no_grad(function() return ms.is_grad_enabled() end)
      assert.is_false(inside)
      assert.is_true(ms.is_grad_enabled())
    end)

    it("restores grad mode when the function raises", function()
      pcall(ms.no_grad, function() error("boom") end)
      assert.is_true(ms.is_grad_enabled())
    end)

    it("passes the error of the function on", function()
      errors_with(function() ms.no_grad(function() error("boom", 0) end) end, "^boom$")
    end)

    it("enable_grad records a graph inside no_grad", function()
      local x = f64({1, 2}, true)
      local y = ms.no_grad(function()
        return ms.enable_grad(function() return x * 2 end)
      end)
      assert.is_not_nil(y.grad_fn)
    end)

    it("set_grad_enabled switches grad mode", function()
      ms.set_grad_enabled(false)
      local y = f64({1}, true) * 2
      ms.set_grad_enabled(true)
      assert.is_nil(y.grad_fn)
      assert.is_true(ms.is_grad_enabled())
    end)

    it("backward runs with grad mode off", function()
      local x = f64({1, 2}, true)
      local seen
      local h = x * 2
      h:register_hook(function() seen = ms.is_grad_enabled() end)
      h:sum():backward()
      assert.is_false(seen)
      assert.is_true(ms.is_grad_enabled())
    end)
  end)

  describe("tensor hooks", function()
    it("see the gradient of an intermediate", function()
      local x = f64({1, 2}, true)
      local h = x * 3
      local seen
      h:register_hook(function(g) seen = g:table() end)
      ;(h * f64({5, 7})):sum():backward()
      assert.are.same({5, 7}, seen)
    end)

    it("replace the gradient when they return a tensor", function()
      local x = f64({1, 2}, true)
      local h = x * 3
      h:register_hook(function(g) return g * 10 end)
      h:sum():backward()
      assert.are.same({30, 30}, x.grad:table())
    end)

    it("may not change the gradient's shape or dtype, or return what is not a tensor", function()
      local x = f64({1, 2}, true)
      x:register_hook(function() return ms.ones(5, {dtype = "f64"}) end)
      errors_with(function() (x * 2):sum():backward() end,
                  "backward: a tensor hook replaced a gradient of shape %[2%] and dtype f64 with one of shape %[5%]")
      local h = f64({1, 2}, true) * 2
      h:register_hook(function() return 3 end)
      errors_with(function() h:sum():backward() end, "backward: a tensor hook returned number")
    end)

    it("on a leaf run before the gradient is accumulated and can replace it", function()
      local x = f64({1, 2}, true)
      local grad_when_called = "unset"
      x:register_hook(function(g)
        grad_when_called = x.grad
        return g + 1
      end)
      ;(x * 2):sum():backward()
      assert.is_nil(grad_when_called)
      assert.are.same({3, 3}, x.grad:table())
    end)

    it("run once per backward pass", function()
      local x = f64({1, 2}, true)
      local h = x * 2
      local calls = 0
      h:register_hook(function() calls = calls + 1 end)
      local y = (h * h + h):sum()
      y:backward()
      assert.are.equal(1, calls)
    end)

    it("several hooks run in registration order, each seeing the last one's result", function()
      local x = f64({1}, true)
      local h = x * 1
      local order = {}
      h:register_hook(function(g) order[#order + 1] = g:item(); return g * 2 end)
      h:register_hook(function(g) order[#order + 1] = g:item(); return g + 1 end)
      h:sum():backward()
      assert.are.same({1, 2}, order)
      assert.are.same({3}, x.grad:table())
    end)

    it("stop running once removed", function()
      local x = f64({1}, true)
      local calls = 0
      local handle = x:register_hook(function() calls = calls + 1 end)
      ;(x * 2):sum():backward()
      handle.remove()
      ;(x * 2):sum():backward()
      assert.are.equal(1, calls)
    end)
  end)

  describe("post-accumulate-grad hooks", function()
    it("run after the leaf's .grad is accumulated, with the leaf", function()
      local x = f64({1, 2}, true)
      local seen_tensor, seen_grad
      x:register_post_accumulate_grad_hook(function(t)
        seen_tensor = t
        seen_grad = t.grad:table()
      end)
      ;(x * 4):sum():backward()
      assert.is_true(rawequal(x, seen_tensor))
      assert.are.same({4, 4}, seen_grad)
    end)

    it("see the accumulated total on the second backward", function()
      local x = f64({1}, true)
      local seen = {}
      x:register_post_accumulate_grad_hook(function(t) seen[#seen + 1] = t.grad:item() end)
      ;(x * 2):sum():backward()
      ;(x * 3):sum():backward()
      assert.are.same({2, 5}, seen)
    end)

    it("run once per backward even when the leaf is used twice", function()
      local x = f64({1}, true)
      local calls = 0
      x:register_post_accumulate_grad_hook(function() calls = calls + 1 end)
      ;(x * 2 + x * 3):sum():backward()
      assert.are.equal(1, calls)
      assert.are.same({5}, x.grad:table())
    end)

    it("stop running once removed", function()
      local x = f64({1}, true)
      local calls = 0
      local handle = x:register_post_accumulate_grad_hook(function() calls = calls + 1 end)
      handle.remove()
      ;(x * 2):sum():backward()
      assert.are.equal(0, calls)
    end)
  end)

  describe("saved_tensors_hooks", function()
    it("packs each saved tensor once and unpacks it once in backward", function()
      local a, b = f64({1, 2}, true), f64({3, 4}, true)
      local packs, unpacks = 0, 0
      local y = ms.autograd.saved_tensors_hooks(
        function(t) packs = packs + 1; return t end,
        function(t) unpacks = unpacks + 1; return t end,
        function() return (a * b):sum() end)
      -- a * b saves a (for b's gradient) and b (for a's gradient); sum saves nothing
      assert.are.equal(2, packs)
      assert.are.equal(0, unpacks)
      y:backward()
      assert.are.equal(2, unpacks)
      assert.are.same({3, 4}, a.grad:table())
      assert.are.same({1, 2}, b.grad:table())
    end)

    it("packs only what the gradients need", function()
      local a, b = f64({1, 2}, true), f64({3, 4})
      local packs = 0
      ms.autograd.saved_tensors_hooks(function(t) packs = packs + 1; return t end,
                                      function(t) return t end,
                                      function() return a * b end)
      -- only a requires grad, so only b is needed
      assert.are.equal(1, packs)
    end)

    it("packs nothing for ops that save nothing", function()
      local x = f64({1, 2}, true)
      local packs = 0
      ms.autograd.saved_tensors_hooks(function(t) packs = packs + 1; return t end,
                                      function(t) return t end,
                                      function() return ((x + 1) * 2 - x):sum() end)
      assert.are.equal(0, packs)
    end)

    it("unpack may rebuild the tensor from anything pack returned", function()
      local x = f64({1, 2}, true)
      local store = {}
      local y = ms.autograd.saved_tensors_hooks(
        function(t) store[#store + 1] = t:detach():clone(); return #store end,
        function(key) return store[key] end,
        function() return x:exp():sum() end)
      assert.are.equal(1, #store)
      y:backward()
      for i, v in ipairs({1, 2}) do
        assert.is_true(math.abs(x.grad:table()[i] - math.exp(v)) < 1e-12)
      end
    end)

    it("unpack runs again for each backward with retain_graph", function()
      local x = f64({1, 2}, true)
      local unpacks = 0
      local y = ms.autograd.saved_tensors_hooks(function(t) return t end,
                                                function(t) unpacks = unpacks + 1; return t end,
                                                function() return (x * x):sum() end)
      y:backward({retain_graph = true})
      y:backward()
      -- x * x saves x twice; each backward unpacks both
      assert.are.equal(4, unpacks)
    end)

    it("are not active outside their function", function()
      local x = f64({1, 2}, true)
      local packs = 0
      ms.autograd.saved_tensors_hooks(function(t) packs = packs + 1; return t end,
                                      function(t) return t end,
                                      function() return nil end)
      local _ = x * x
      assert.are.equal(0, packs)
    end)

    it("the innermost hooks win when nested", function()
      local x = f64({1, 2}, true)
      local outer, inner = 0, 0
      ms.autograd.saved_tensors_hooks(function(t) outer = outer + 1; return t end, function(t) return t end,
        function()
          ms.autograd.saved_tensors_hooks(function(t) inner = inner + 1; return t end, function(t) return t end,
            function() return x:exp() end)
          return x:sin()
        end)
      assert.are.equal(1, inner)
      assert.are.equal(1, outer)
    end)

    it("are removed when the function raises", function()
      local x = f64({1, 2}, true)
      local packs = 0
      pcall(ms.autograd.saved_tensors_hooks, function(t) packs = packs + 1; return t end,
            function(t) return t end, function() error("boom") end)
      local _ = x:exp()
      assert.are.equal(0, packs)
    end)
  end)

  describe("queue_callback", function()
    it("runs a callback once at the end of backward, after every gradient is accumulated", function()
      local x, w = f64({1, 2}, true), f64({3, 4}, true)
      local h = x * w
      local calls, grads_at_callback = 0, nil
      h:register_hook(function()
        ms.autograd.queue_callback(function()
          calls = calls + 1
          grads_at_callback = {x.grad and x.grad:table(), w.grad and w.grad:table()}
        end)
      end)
      h:sum():backward()
      assert.are.equal(1, calls)
      assert.are.same({{3, 4}, {1, 2}}, grads_at_callback)
    end)

    it("runs callbacks in the order they were queued", function()
      local x = f64({1}, true)
      local order = {}
      x:register_hook(function()
        ms.autograd.queue_callback(function() order[#order + 1] = "first" end)
        ms.autograd.queue_callback(function() order[#order + 1] = "second" end)
      end)
      ;(x * 2):sum():backward()
      assert.are.same({"first", "second"}, order)
    end)

    it("runs callbacks queued by a callback in the same pass", function()
      local x = f64({1}, true)
      local order = {}
      x:register_hook(function()
        ms.autograd.queue_callback(function()
          order[#order + 1] = "outer"
          ms.autograd.queue_callback(function() order[#order + 1] = "inner" end)
        end)
      end)
      ;(x * 2):sum():backward()
      assert.are.same({"outer", "inner"}, order)
    end)

    it("does not run a callback again in the next backward", function()
      local x = f64({1}, true)
      local calls = 0
      local queued = false
      x:register_hook(function()
        if not queued then
          queued = true
          ms.autograd.queue_callback(function() calls = calls + 1 end)
        end
      end)
      ;(x * 2):sum():backward()
      ;(x * 2):sum():backward()
      assert.are.equal(1, calls)
    end)

    it("raises outside backward", function()
      errors_with(function() ms.autograd.queue_callback(function() end) end,
                  "^moonshard: queue_callback:")
    end)
  end)

  describe("reentrant backward", function()
    it("a hook may run a whole backward pass of its own", function()
      local x, w = f64({1, 2}, true), f64({5}, true)
      local h = x * 2
      h:register_hook(function()
        local inner = ms.enable_grad(function() return (w * w):sum() end)
        ms.autograd.backward({inner})
      end)
      ;(h * 3):sum():backward()
      assert.are.same({10}, w.grad:table())
      assert.are.same({6, 6}, x.grad:table())
    end)

    it("a custom node may call backward inside its own backward", function()
      -- out = x * 2 computed without grad, the gradient recomputed inside backward like
      -- reentrant checkpointing does
      local x = f64({1, 2, 3}, true)
      local function recomputing(input)
        local out = ms.no_grad(function() return input * 2 end)
        ms.autograd.record(out, "Recompute", function(_, grad)
          local detached = input:detach():requires_grad_(true)
          local again = ms.enable_grad(function() return detached * 2 end)
          ms.autograd.backward({again}, {grad})
          return detached.grad
        end, input)
        return out
      end
      local y = (recomputing(x) * f64({1, 10, 100})):sum()
      y:backward()
      assert.are.same({2, 20, 200}, x.grad:table())
    end)

    it("callbacks queued in the inner pass run at its end, the outer ones at the outer end", function()
      local x, w = f64({1}, true), f64({1}, true)
      local events = {}
      local h = x * 2
      h:register_hook(function()
        ms.autograd.queue_callback(function() events[#events + 1] = "outer callback" end)
        local inner = ms.enable_grad(function() return (w * 3):sum() end)
        w:register_hook(function()
          ms.autograd.queue_callback(function() events[#events + 1] = "inner callback" end)
        end)
        ms.autograd.backward({inner})
        events[#events + 1] = "inner done"
      end)
      h:sum():backward()
      assert.are.same({"inner callback", "inner done", "outer callback"}, events)
    end)

    it("reports its depth while running", function()
      local x, w = f64({1}, true), f64({1}, true)
      local depths = {}
      x:register_hook(function()
        depths[#depths + 1] = ms.autograd.backward_depth()
        local inner = ms.enable_grad(function() return (w * 3):sum() end)
        w:register_hook(function() depths[#depths + 1] = ms.autograd.backward_depth() end)
        ms.autograd.backward({inner})
      end)
      ;(x * 2):sum():backward()
      assert.are.same({1, 2}, depths)
      assert.are.equal(0, ms.autograd.backward_depth())
    end)

    it("an error in the inner pass leaves the engine usable", function()
      local x = f64({1}, true)
      local h = x * 2
      h:register_hook(function() error("inner failure", 0) end)
      errors_with(function() h:sum():backward() end, "inner failure")
      assert.are.equal(0, ms.autograd.backward_depth())
      assert.is_true(ms.is_grad_enabled())
      local z = f64({2}, true)
      ;(z * 5):sum():backward()
      assert.are.same({5}, z.grad:table())
    end)
  end)

  describe("gradients at the points PyTorch defines", function()
    -- PyTorch 2.15: (x ** 0).sum() at [0, 1, 2] gives 0s; maximum / minimum of [1, 2, 3] and
    -- [1, 3, 2] split a tie in halves; maximum(x, tensor(1.)) at [0, 1, 2] gives [0, 0.5, 1]
    -- PyTorch 2.15: [1, 3, 3, 2].max() gives [0, 0.5, 0.5, 0]; [1, nan, 2].max() gives [0, 1, 0]
    it("max() and min() of a whole tensor spread the gradient over the ties, as PyTorch", function()
      local x = f64({1, 3, 3, 2}, true)
      x:max():backward()
      assert.are.same({0, 0.5, 0.5, 0}, x.grad:table())
      x.grad = nil
      ;(x:min() * 3):backward()
      assert.are.same({3, 0, 0, 0}, x.grad:table())
      local n = f64({1, 0 / 0, 2}, true)
      n:max():backward()
      assert.are.same({0, 1, 0}, n.grad:table())
    end)

    it("x ^ 0 has gradient 0, 0 included", function()
      local x = f64({0, 1, 2}, true)
      ;(x ^ 0):sum():backward()
      assert.are.same({0, 0, 0}, x.grad:table())
    end)

    it("maximum and minimum split a tie in halves, with a tensor or a number", function()
      local a, b = f64({1, 2, 3}, true), f64({1, 3, 2}, true)
      ms.maximum(a, b):sum():backward()
      assert.are.same({0.5, 0, 1}, a.grad:table())
      assert.are.same({0.5, 1, 0}, b.grad:table())
      local x = f64({0, 1, 2}, true)
      ms.maximum(x, 1):sum():backward()
      assert.are.same({0, 0.5, 1}, x.grad:table())
      x.grad = nil
      ms.minimum(x, 1):sum():backward()
      assert.are.same({1, 0.5, 0}, x.grad:table())
    end)
  end)

  describe("autograd.grad", function()
    it("returns the gradients without touching .grad", function()
      local x = f64({1, 2}, true)
      local grads = ms.autograd.grad((x * x):sum(), {x})
      assert.are.same({2, 4}, grads[1]:table())
      assert.is_nil(x.grad)
    end)

    it("takes single tensors as well as arrays", function()
      local x = f64({3}, true)
      local grads = ms.autograd.grad((x * 5):sum(), x)
      assert.are.same({5}, grads[1]:table())
    end)

    it("gives gradients for several inputs, intermediates included", function()
      local x = f64({1, 2}, true)
      local h = x * 3
      local grads = ms.autograd.grad((h * h):sum(), {x, h})
      assert.are.same({18, 36}, grads[1]:table())
      assert.are.same({6, 12}, grads[2]:table())
    end)

    it("keeps an existing .grad as it was", function()
      local x = f64({1, 2}, true)
      ;(x * 7):sum():backward()
      ms.autograd.grad((x * 3):sum(), {x})
      assert.are.same({7, 7}, x.grad:table())
    end)

    it("leaves .grad of other leaves in the graph untouched", function()
      local x, w = f64({1, 2}, true), f64({3, 4}, true)
      local grads = ms.autograd.grad((x * w):sum(), {x})
      assert.are.same({3, 4}, grads[1]:table())
      assert.is_nil(w.grad)
    end)

    it("runs no post-accumulate-grad hooks", function()
      local x = f64({1, 2}, true)
      local calls = 0
      x:register_post_accumulate_grad_hook(function() calls = calls + 1 end)
      ms.autograd.grad((x * x):sum(), {x})
      assert.are.equal(0, calls)
    end)

    it("takes output gradients", function()
      local x = f64({1, 2}, true)
      local grads = ms.autograd.grad(x * 2, {x}, {f64({1, -1})})
      assert.are.same({2, -2}, grads[1]:table())
    end)

    it("hands back the gradient the backward made, not a copy of it", function()
      local x = ms.randn(4096):requires_grad_(true)
      local w, g = ms.randn(4096), ms.randn(4096)
      local y = x * w
      local base = ms.memory_stats("cpu").allocated
      ms.reset_peak_memory_stats("cpu")
      local grads = ms.autograd.grad(y, {x}, {g})
      -- mul's backward makes g * w and nothing else: one gradient's bytes at the peak
      assert.are.equal(4096 * 4, ms.memory_stats("cpu").peak - base)
      assert.is_true(ms.equal(grads[1], g * w))
    end)

    it("returns an output's own gradient, as PyTorch does (the same storage)", function()
      local x = f64({1, 2, 3}, true)
      local z, go = x * 1, f64({1, -1, 2})
      local grads = ms.autograd.grad(z, {z, x}, {go})
      assert.are.equal(go:data_ptr(), grads[1]:data_ptr())
      assert.are.same({1, -1, 2}, grads[2]:table())
    end)

    it("runs only the part of the graph between the outputs and the inputs", function()
      local x, w = f64({1, 2, 3}, true), f64({2, 2, 2}, true)
      local h = x * w
      local grads = ms.autograd.grad((h * h):sum(), {h})
      assert.are.same({4, 8, 12}, grads[1]:table())
      -- x * w's node did not run: its saved tensors serve a later backward
      ;(h * 3):sum():backward()
      assert.are.same({6, 6, 6}, x.grad:table())
      assert.are.same({3, 6, 9}, w.grad:table())
    end)

    it("names outputs or inputs that are not tensors", function()
      local x = f64({1}, true)
      errors_with(function() ms.autograd.grad("a", {x}) end, "grad: outputs must be a tensor or an array of tensors, got string")
      errors_with(function() ms.autograd.grad((x * 2):sum(), {x, 3}) end, "grad: inputs%[2%] is not a tensor %(number%)")
    end)

    it("keeps the implicit gradient of a scalar output when it is asked for", function()
      local x = f64({1, 2}, true)
      local y = (x * 2):sum()
      local grads = ms.autograd.grad(y, {y, x})
      collectgarbage()
      assert.are.same(1, grads[1]:item())
      assert.are.same({2, 2}, grads[2]:table())
    end)
  end)

  describe("in-place changes to saved tensors", function()
    it("are detected when backward needs the saved input", function()
      local x, w = f64({1, 2}, true), f64({3, 4}, true)
      local y = (x * w):sum()
      ms.no_grad(function() w:mul_(2) end)
      errors_with(function() y:backward() end, "^moonshard: backward: .*modified in place")
    end)

    it("are detected when backward needs the saved output", function()
      local x = f64({1, 2}, true)
      local e = x:exp()
      local y = e:sum()
      ms.no_grad(function() e:add_(1) end)
      errors_with(function() y:backward() end, "^moonshard: backward: .*modified in place")
    end)

    it("are detected through a view of the saved tensor", function()
      local x = f64({1, 2}, true)
      local w = f64({3, 4})
      local y = (x * w):sum()
      w:narrow(0, 0, 1):fill_(0)
      errors_with(function() y:backward() end, "modified in place")
    end)

    it("are harmless when the changed tensor was not saved", function()
      local x = f64({1, 2}, true)
      local b = f64({3, 4})
      local y = (x + b):sum()
      b:add_(1)
      y:backward()
      assert.are.same({1, 1}, x.grad:table())
    end)

    it("bump the version counter", function()
      local t = f64({1, 2})
      local before = t:_version()
      t:add_(1)
      t:view(2, 1):mul_(2)
      assert.are.equal(before + 2, t:_version())
    end)
  end)

  describe("leaves and detach", function()
    it("requires_grad_ turns a tensor into a leaf that requires grad", function()
      local x = f64({1, 2}):requires_grad_()
      ;(x * 2):sum():backward()
      assert.are.same({2, 2}, x.grad:table())
    end)

    it("detach stops gradients", function()
      local x = f64({1, 2}, true)
      local y = (x:detach() * x):sum()
      y:backward()
      assert.are.same({1, 2}, x.grad:table())
    end)
  end)
end)
