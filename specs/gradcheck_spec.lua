-- Gradient checks in f64: the backward of every differentiable op agrees with central
-- finite differences of the forward (dropout also against its closed-form gradient).
local ms = require "moonshard"
local F = ms.nn.F
local gradcheck = require "support.gradcheck"
local global_state = require "support.global_state"

-- An f64 leaf requiring grad; seed picks the values, opts narrows their range.
local function leaf(shape, seed, opts)
  opts = opts or {}
  return gradcheck.input(shape, {seed = seed, low = opts.low, high = opts.high, margin = opts.margin})
end

local function positive(shape, seed) return leaf(shape, seed, {low = 0.5, high = 2}) end
local function away_from_zero(shape, seed) return leaf(shape, seed, {margin = 0.1}) end

local function passes(fn, inputs, opts)
  local ok, message = gradcheck.check(fn, inputs, opts)
  assert.is_true(ok, message)
end

local function targets(values) return ms.tensor(values, {dtype = "i64"}) end

before_each(global_state.save)
after_each(global_state.restore)

describe("gradcheck", function()
  describe("the checker", function()
    -- out = 3x with a hand-written backward of the given slope
    local function with_slope(slope)
      return function(x)
        local out = ms.no_grad(function() return x * 3 end)
        ms.autograd.record(out, "Custom", function(_, g) return g * slope end, x)
        return out
      end
    end

    it("accepts a backward that matches the forward", function()
      assert.is_true(gradcheck.check(with_slope(3), {leaf({3}, 1)}))
    end)

    it("rejects a backward that is off by a factor, naming the element", function()
      local ok, message = gradcheck.check(with_slope(2), {leaf({3}, 1)})
      assert.is_false(ok)
      assert.is_truthy(message:find("input 1 element 0", 1, true))
    end)

    it("rejects a backward that is off by less than a thousandth", function()
      assert.is_false(gradcheck.check(with_slope(3.001), {leaf({3}, 1)}))
    end)

    it("rejects an op whose output does not require grad", function()
      assert.is_false(gradcheck.check(function(x) return x:detach() * 2 end, {leaf({3}, 1)}))
    end)
  end)

  describe("add", function()
    it("matches finite differences for equal shapes", function()
      passes(function(a, b) return a + b end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
    end)
    it("matches finite differences broadcasting a row over a matrix", function()
      passes(function(a, b) return a + b end, {leaf({2, 3}, 1), leaf({3}, 2)})
    end)
    it("matches finite differences broadcasting a column against a row", function()
      passes(function(a, b) return a + b end, {leaf({2, 1}, 1), leaf({1, 3}, 2)})
    end)
    it("matches finite differences with the smaller tensor on the left", function()
      passes(function(a, b) return ms.add(a, b) end, {leaf({3}, 1), leaf({2, 3}, 2)})
    end)
    it("matches finite differences with a scalar on the right", function()
      passes(function(a) return a + 2.5 end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with a scalar on the left", function()
      passes(function(a) return 2.5 + a end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with alpha", function()
      passes(function(a, b) return ms.add(a, b, 3) end, {leaf({2, 3}, 1), leaf({3}, 2)})
    end)
  end)

  describe("sub", function()
    it("matches finite differences for equal shapes", function()
      passes(function(a, b) return a - b end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
    end)
    it("matches finite differences broadcasting the right operand", function()
      passes(function(a, b) return a - b end, {leaf({2, 3}, 1), leaf({2, 1}, 2)})
    end)
    it("matches finite differences broadcasting the left operand", function()
      passes(function(a, b) return a - b end, {leaf({3}, 1), leaf({2, 3}, 2)})
    end)
    it("matches finite differences with a scalar on the right", function()
      passes(function(a) return a - 1.5 end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with a scalar on the left", function()
      passes(function(a) return 1.5 - a end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with alpha", function()
      passes(function(a, b) return ms.sub(a, b, 2) end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
    end)
  end)

  describe("mul", function()
    it("matches finite differences for equal shapes", function()
      passes(function(a, b) return a * b end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
    end)
    it("matches finite differences broadcasting both operands", function()
      passes(function(a, b) return a * b end, {leaf({2, 1, 3}, 1), leaf({4, 1}, 2)})
    end)
    it("matches finite differences when only the left operand requires grad", function()
      passes(function(a, b) return a * b end, {leaf({2, 3}, 1), gradcheck.tensor({3}, {0.5, -2, 3})})
    end)
    it("matches finite differences when only the right operand requires grad", function()
      passes(function(a, b) return a * b end, {gradcheck.tensor({3}, {0.5, -2, 3}), leaf({2, 3}, 2)})
    end)
    it("matches finite differences for a tensor times itself", function()
      passes(function(a) return a * a end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with a scalar on the right", function()
      passes(function(a) return a * -3 end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with a scalar on the left", function()
      passes(function(a) return 0.5 * a end, {leaf({2, 3}, 1)})
    end)
  end)

  describe("div", function()
    it("matches finite differences for equal shapes", function()
      passes(function(a, b) return a / b end, {leaf({2, 3}, 1), positive({2, 3}, 2)})
    end)
    it("matches finite differences broadcasting the divisor", function()
      passes(function(a, b) return a / b end, {leaf({2, 3}, 1), positive({3}, 2)})
    end)
    it("matches finite differences broadcasting the dividend", function()
      passes(function(a, b) return a / b end, {leaf({2, 1}, 1), positive({2, 3}, 2)})
    end)
    it("matches finite differences when only the dividend requires grad", function()
      passes(function(a, b) return a / b end, {leaf({2, 3}, 1), gradcheck.tensor({3}, {0.5, -2, 3})})
    end)
    it("matches finite differences when only the divisor requires grad", function()
      passes(function(a, b) return a / b end, {gradcheck.tensor({3}, {0.5, -2, 3}), positive({2, 3}, 2)})
    end)
    it("matches finite differences with a scalar on the right", function()
      passes(function(a) return a / 4 end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences with a scalar on the left", function()
      passes(function(a) return 3 / a end, {positive({2, 3}, 1)})
    end)
  end)

  describe("pow", function()
    it("matches finite differences for an integer exponent", function()
      passes(function(a) return a ^ 3 end, {leaf({2, 3}, 1)})
    end)
    it("matches finite differences for a fractional exponent", function()
      passes(function(a) return a:pow(0.5) end, {positive({2, 3}, 1)})
    end)
    it("matches finite differences for a negative exponent", function()
      passes(function(a) return ms.pow(a, -2) end, {positive({2, 3}, 1)})
    end)
    it("matches finite differences for a number raised to a tensor", function()
      passes(function(a) return ms.pow(2.5, a) end, {leaf({2, 3}, 1)})
    end)
  end)

  describe("unary", function()
    local cases = {
      {"neg", function(a) return -a end, leaf},
      {"exp", function(a) return a:exp() end, leaf},
      {"log", function(a) return a:log() end, positive},
      {"sqrt", function(a) return a:sqrt() end, positive},
      {"rsqrt", function(a) return a:rsqrt() end, positive},
      {"abs", function(a) return a:abs() end, away_from_zero},
      {"sin", function(a) return a:sin() end, leaf},
      {"cos", function(a) return a:cos() end, leaf},
      {"square", function(a) return a:square() end, leaf},
      {"reciprocal", function(a) return a:reciprocal() end, positive},
      {"tanh", function(a) return a:tanh() end, leaf},
      {"sigmoid", function(a) return a:sigmoid() end, leaf},
      {"relu", function(a) return a:relu() end, away_from_zero},
      {"gelu", function(a) return ms.gelu(a) end, leaf},
      {"gelu with approximate = 'tanh'", function(a) return ms.gelu(a, {approximate = "tanh"}) end, leaf},
      {"gelu_tanh", function(a) return a:gelu_tanh() end, leaf},
    }
    for _, case in ipairs(cases) do
      local name, fn, make = case[1], case[2], case[3]
      it(name .. " matches finite differences", function()
        passes(fn, {make({2, 3}, 3)})
      end)
    end

    it("the functional forms match finite differences", function()
      passes(function(a) return ms.tanh(ms.exp(ms.neg(a))) end, {leaf({4}, 5)})
    end)

    it("gelu matches finite differences over a wide range", function()
      passes(function(a) return ms.gelu(a) end, {leaf({8}, 6, {low = -4, high = 4})})
    end)
  end)

  describe("maximum and minimum", function()
    -- b differs from a by at least 0.2 everywhere, so no element sits on a tie.
    local function pair(shape)
      local a = leaf(shape, 11)
      local offsets = gradcheck.values(a:numel(), -1, 1, 12, 0.2)
      local flat = gradcheck.flat(a)
      for i = 1, #flat do flat[i] = flat[i] + offsets[i] end
      return a, gradcheck.tensor(shape, flat, {requires_grad = true})
    end

    it("maximum matches finite differences", function()
      local a, b = pair({2, 3})
      passes(function(x, y) return ms.maximum(x, y) end, {a, b})
    end)
    it("minimum matches finite differences", function()
      local a, b = pair({2, 3})
      passes(function(x, y) return ms.minimum(x, y) end, {a, b})
    end)
    it("maximum matches finite differences when broadcasting", function()
      local a = gradcheck.tensor({2, 3}, {-0.9, 0.4, 1.3, 0.2, -1.1, 0.7}, {requires_grad = true})
      local b = gradcheck.tensor({3}, {0.1, -0.3, 0.9}, {requires_grad = true})
      passes(function(x, y) return ms.maximum(x, y) end, {a, b})
    end)
    it("minimum matches finite differences when broadcasting", function()
      local a = gradcheck.tensor({2, 3}, {-0.9, 0.4, 1.3, 0.2, -1.1, 0.7}, {requires_grad = true})
      local b = gradcheck.tensor({2, 1}, {0.1, -0.3}, {requires_grad = true})
      passes(function(x, y) return x:minimum(y) end, {a, b})
    end)
  end)

  describe("reductions", function()
    it("sum over all elements matches finite differences", function()
      passes(function(a) return a:sum() end, {leaf({2, 3, 2}, 1)})
    end)
    it("sum over dim 0 matches finite differences", function()
      passes(function(a) return a:sum(0) end, {leaf({2, 3, 2}, 1)})
    end)
    it("sum over dim 1 with keepdim matches finite differences", function()
      passes(function(a) return a:sum(1, true) end, {leaf({2, 3, 2}, 1)})
    end)
    it("sum over dim -1 matches finite differences", function()
      passes(function(a) return ms.sum(a, -1) end, {leaf({2, 3, 2}, 1)})
    end)
    it("sum over two dims matches finite differences", function()
      passes(function(a) return a:sum({0, 2}) end, {leaf({2, 3, 2}, 1)})
    end)
    it("sum over two dims with keepdim matches finite differences", function()
      passes(function(a) return a:sum({2, 0}, true) end, {leaf({2, 3, 2}, 1)})
    end)
    it("mean over all elements matches finite differences", function()
      passes(function(a) return a:mean() end, {leaf({2, 3, 2}, 1)})
    end)
    it("mean over dim 1 matches finite differences", function()
      passes(function(a) return a:mean(1) end, {leaf({2, 3, 2}, 1)})
    end)
    it("mean over dim 0 with keepdim matches finite differences", function()
      passes(function(a) return a:mean(0, true) end, {leaf({2, 3, 2}, 1)})
    end)
    it("mean over two dims matches finite differences", function()
      passes(function(a) return ms.mean(a, {1, 2}) end, {leaf({2, 3, 2}, 1)})
    end)
    it("max over all elements matches finite differences", function()
      passes(function(a) return a:max() end, {leaf({2, 3}, 1)})
    end)
    it("min over all elements matches finite differences", function()
      passes(function(a) return a:min() end, {leaf({2, 3}, 1)})
    end)
    it("max over dim 1 matches finite differences", function()
      passes(function(a) return (a:max(1)) end, {leaf({3, 4}, 2)})
    end)
    it("max over dim 0 with keepdim matches finite differences", function()
      passes(function(a) return (a:max(0, true)) end, {leaf({3, 4}, 2)})
    end)
    it("min over dim -1 matches finite differences", function()
      passes(function(a) return (ms.min(a, -1)) end, {leaf({3, 4}, 2)})
    end)
    it("min over dim 0 with keepdim matches finite differences", function()
      passes(function(a) return (a:min(0, true)) end, {leaf({3, 4}, 2)})
    end)
  end)

  describe("matmul", function()
    it("matches finite differences for 1-D by 1-D (dot product)", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({3}, 1), leaf({3}, 2)})
    end)
    it("matches finite differences for 2-D by 1-D", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 3}, 1), leaf({3}, 2)})
    end)
    it("matches finite differences for 1-D by 2-D", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({3}, 1), leaf({3, 4}, 2)})
    end)
    it("matches finite differences for 2-D by 2-D", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 3}, 1), leaf({3, 4}, 2)})
    end)
    it("matches finite differences for transposed (non-contiguous) operands", function()
      passes(function(a, b) return ms.matmul(a:t(), b:t()) end, {leaf({3, 2}, 1), leaf({4, 3}, 2)})
    end)
    it("matches finite differences for an expanded (stride 0) and a narrowed operand", function()
      passes(function(a, b) return ms.matmul(a:expand(4, 3), b:narrow(1, 1, 2)) end, {leaf({1, 3}, 1), leaf({3, 4}, 2)})
    end)
    it("matches finite differences for 3-D by 3-D (batched)", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 2, 3}, 1), leaf({2, 3, 2}, 2)})
    end)
    it("matches finite differences for batch dims that broadcast", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 1, 2, 3}, 1), leaf({3, 3, 2}, 2)})
    end)
    it("matches finite differences for 3-D by a shared 2-D matrix", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 2, 3}, 1), leaf({3, 4}, 2)})
    end)
    it("matches finite differences for a 2-D matrix by 3-D", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 3}, 1), leaf({2, 3, 2}, 2)})
    end)
    it("matches finite differences for 3-D by 1-D", function()
      passes(function(a, b) return ms.matmul(a, b) end, {leaf({2, 2, 3}, 1), leaf({3}, 2)})
    end)
    it("mm matches finite differences", function()
      passes(function(a, b) return ms.mm(a, b) end, {leaf({2, 3}, 1), leaf({3, 2}, 2)})
    end)
    it("bmm matches finite differences", function()
      passes(function(a, b) return ms.bmm(a, b) end, {leaf({2, 2, 3}, 1), leaf({2, 3, 2}, 2)})
    end)
  end)

  describe("linear", function()
    it("matches finite differences with a bias", function()
      passes(function(x, w, b) return ms.linear(x, w, b) end, {leaf({2, 3}, 1), leaf({4, 3}, 2), leaf({4}, 3)})
    end)
    it("matches finite differences without a bias", function()
      passes(function(x, w) return ms.linear(x, w) end, {leaf({2, 3}, 1), leaf({4, 3}, 2)})
    end)
    it("matches finite differences for a 3-D input", function()
      passes(function(x, w, b) return ms.linear(x, w, b) end, {leaf({2, 2, 3}, 1), leaf({2, 3}, 2), leaf({2}, 3)})
    end)
    it("matches finite differences for a non-contiguous input", function()
      passes(function(x, w, b) return ms.linear(x:t(), w, b) end, {leaf({3, 2}, 1), leaf({2, 3}, 2), leaf({2}, 3)})
    end)
    it("matches finite differences when the weight is frozen", function()
      local w = gradcheck.tensor({2, 3}, {0.5, -1, 2, 1.5, 0.25, -0.75})
      passes(function(x, weight, b) return ms.linear(x, weight, b) end, {leaf({2, 3}, 1), w, leaf({2}, 3)})
    end)
  end)

  describe("views", function()
    local cases = {
      {"view", function(a) return a:view(3, 4) end},
      {"view with -1", function(a) return a:view(-1) end},
      {"view with a table shape", function(a) return a:view({2, 2, 3}) end},
      {"reshape", function(a) return a:reshape(4, 3) end},
      {"reshape of a transposed tensor", function(a) return a:t():reshape(12) end},
      {"flatten", function(a) return a:view(2, 2, 3):flatten(1) end},
      {"transpose", function(a) return a:transpose(0, 1) end},
      {"transpose with negative dims", function(a) return a:view(2, 2, 3):transpose(-1, -3) end},
      {"permute", function(a) return a:view(2, 2, 3):permute(2, 0, 1) end},
      {"t", function(a) return a:t() end},
      {"narrow", function(a) return a:narrow(1, 1, 2) end},
      {"narrow with a negative start", function(a) return a:narrow(0, -2, 2) end},
      {"select", function(a) return a:select(1, 2) end},
      {"select with a negative index", function(a) return a:select(0, -1) end},
      {"squeeze", function(a) return a:view(3, 1, 4, 1):squeeze() end},
      {"squeeze of one dim", function(a) return a:view(3, 1, 4, 1):squeeze(1) end},
      {"unsqueeze", function(a) return a:unsqueeze(1) end},
      {"unsqueeze at -1", function(a) return a:unsqueeze(-1) end},
      {"expand", function(a) return a:view(3, 1, 4):expand(3, 2, 4) end},
      {"expand with new leading dims", function(a) return a:expand(2, 3, 4) end},
      {"expand_as", function(a) return a:narrow(0, 0, 1):expand_as(a) end},
      {"contiguous", function(a) return a:t():contiguous() end},
      {"clone", function(a) return a:clone() end},
      {"split and cat", function(a)
        local parts = a:split({1, 3}, 1)
        return ms.cat({parts[2], parts[1]}, 1)
      end},
      {"split into equal parts", function(a)
        local parts = a:split(2, 1)
        return parts[1] * parts[2]
      end},
      {"chunk", function(a)
        local parts = a:chunk(3, 0)
        return parts[1] + parts[3] * parts[2]
      end},
    }
    for _, case in ipairs(cases) do
      it(case[1] .. " matches finite differences", function()
        passes(case[2], {leaf({3, 4}, 4)})
      end)
    end
  end)

  describe("cat and stack", function()
    it("cat along dim 0 matches finite differences", function()
      passes(function(a, b) return ms.cat({a, b}, 0) end, {leaf({2, 3}, 1), leaf({1, 3}, 2)})
    end)
    it("cat of three tensors along dim 1 matches finite differences", function()
      passes(function(a, b, c) return ms.cat({a, b, c}, 1) end, {leaf({2, 1}, 1), leaf({2, 3}, 2), leaf({2, 2}, 3)})
    end)
    it("cat along dim -1 matches finite differences", function()
      passes(function(a, b) return ms.cat({a, b}, -1) end, {leaf({2, 2}, 1), leaf({2, 3}, 2)})
    end)
    it("cat with an input that does not require grad matches finite differences", function()
      local frozen = gradcheck.tensor({1, 3}, {1, 2, 3})
      passes(function(a, b) return ms.cat({a, b}) end, {leaf({2, 3}, 1), frozen})
    end)
    it("stack along dim 0 matches finite differences", function()
      passes(function(a, b) return ms.stack({a, b}, 0) end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
    end)
    it("stack along dim 1 matches finite differences", function()
      passes(function(a, b) return ms.stack({a, b}, 1) end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
    end)
    it("stack along dim -1 matches finite differences", function()
      passes(function(a, b, c) return ms.stack({a, b, c}, -1) end, {leaf({3}, 1), leaf({3}, 2), leaf({3}, 3)})
    end)
  end)

  describe("to", function()
    it("a round trip through f32 matches finite differences", function()
      passes(function(a) return a:to("f32"):to("f64") * 2 end, {leaf({2, 3}, 1)},
             {eps = 1e-3, atol = 1e-3, rtol = 1e-3})
    end)
    it("to the same dtype matches finite differences", function()
      passes(function(a) return a:to("f64") * 3 end, {leaf({2, 3}, 1)})
    end)
    it("to with an options table matches finite differences", function()
      passes(function(a) return a:to({dtype = "f32"}):to({dtype = "f64"}) end, {leaf({2, 3}, 1)},
             {eps = 1e-3, atol = 1e-3, rtol = 1e-3})
    end)
    it("a round trip through the host pool matches finite differences", function()
      passes(function(a) return a:to("host"):to("cpu") * 2 end, {leaf({2, 3}, 1)})
    end)
    it("a round trip through bf16 or f16 passes the gradient through unchanged", function()
      for _, dtype in ipairs({"bf16", "f16"}) do
        local x = gradcheck.tensor({4}, {0.5, -1, 2, 0.25}, {requires_grad = true})
        local y = x:to(dtype):to("f64")
        assert.is_true(y.requires_grad)
        y:backward(gradcheck.tensor({4}, {1, 2, -3, 4}))
        assert.are.same({1, 2, -3, 4}, gradcheck.flat(x.grad))
      end
    end)
    it("to an integer dtype leaves the graph", function()
      local y = leaf({3}, 1):to("i64")
      assert.is_falsy(y.requires_grad)
      assert.is_nil(y.grad_fn)
    end)
    it("float and double round trips match finite differences", function()
      passes(function(a) return a:float():double() end, {leaf({2, 3}, 1)},
             {eps = 1e-3, atol = 1e-3, rtol = 1e-3})
    end)
  end)

  describe("softmax family", function()
    it("softmax over the last dim matches finite differences", function()
      passes(function(a) return a:softmax(-1) end, {leaf({2, 4}, 1, {low = -2, high = 2})})
    end)
    it("softmax over dim 0 matches finite differences", function()
      passes(function(a) return F.softmax(a, 0) end, {leaf({3, 2}, 1, {low = -2, high = 2})})
    end)
    it("softmax over the middle dim of a 3-D tensor matches finite differences", function()
      passes(function(a) return a:softmax(1) end, {leaf({2, 3, 2}, 1, {low = -2, high = 2})})
    end)
    it("log_softmax over the last dim matches finite differences", function()
      passes(function(a) return a:log_softmax(-1) end, {leaf({2, 4}, 1, {low = -2, high = 2})})
    end)
    it("log_softmax over dim 0 matches finite differences", function()
      passes(function(a) return F.log_softmax(a, 0) end, {leaf({3, 2}, 1, {low = -2, high = 2})})
    end)
  end)

  describe("layer_norm", function()
    it("matches finite differences without affine parameters", function()
      passes(function(x) return F.layer_norm(x, {4}) end, {leaf({3, 4}, 1, {low = -2, high = 2})})
    end)
    it("matches finite differences with weight and bias", function()
      passes(function(x, w, b) return F.layer_norm(x, {4}, w, b) end,
             {leaf({3, 4}, 1, {low = -2, high = 2}), leaf({4}, 2, {low = 0.5, high = 1.5}), leaf({4}, 3)})
    end)
    it("matches finite differences with weight only", function()
      passes(function(x, w) return F.layer_norm(x, 4, w) end,
             {leaf({2, 4}, 1, {low = -2, high = 2}), leaf({4}, 2, {low = 0.5, high = 1.5})})
    end)
    it("matches finite differences over two normalized dims", function()
      passes(function(x, w, b) return F.layer_norm(x, {2, 3}, w, b, 1e-5) end,
             {leaf({2, 2, 3}, 1, {low = -2, high = 2}), leaf({2, 3}, 2, {low = 0.5, high = 1.5}), leaf({2, 3}, 3)})
    end)
  end)

  describe("embedding", function()
    it("matches finite differences for the weight, repeated indices included", function()
      local indices = targets({{0, 2}, {2, 1}, {2, 0}})
      passes(function(i, w) return F.embedding(i, w) end, {indices, leaf({4, 3}, 1)})
    end)
    it("matches finite differences with i32 indices", function()
      local indices = ms.tensor({3, 1, 3}, {dtype = "i32"})
      passes(function(i, w) return F.embedding(i, w) end, {indices, leaf({4, 2}, 1)})
    end)
  end)

  describe("losses", function()
    local reductions = {"none", "mean", "sum"}
    for _, reduction in ipairs(reductions) do
      it("nll_loss with reduction " .. reduction .. " matches finite differences", function()
        passes(function(logp, t) return F.nll_loss(logp, t, {reduction = reduction}) end,
               {leaf({3, 4}, 1), targets({1, 0, 3})})
      end)
      it("nll_loss with reduction " .. reduction .. " and the default ignore_index matches finite differences", function()
        passes(function(logp, t) return F.nll_loss(logp, t, {reduction = reduction}) end,
               {leaf({4, 3}, 1), targets({2, -100, 0, -100})})
      end)
      it("nll_loss with reduction " .. reduction .. " and ignore_index = 1 matches finite differences", function()
        passes(function(logp, t) return F.nll_loss(logp, t, {reduction = reduction, ignore_index = 1}) end,
               {leaf({4, 3}, 1), targets({1, 2, 0, 1})})
      end)
      it("cross_entropy with reduction " .. reduction .. " matches finite differences", function()
        passes(function(logits, t) return F.cross_entropy(logits, t, {reduction = reduction}) end,
               {leaf({3, 4}, 1, {low = -2, high = 2}), targets({3, 0, 2})})
      end)
      it("cross_entropy with reduction " .. reduction .. " and ignore_index matches finite differences", function()
        passes(function(logits, t) return F.cross_entropy(logits, t, {reduction = reduction, ignore_index = 0}) end,
               {leaf({4, 3}, 1, {low = -2, high = 2}), targets({0, 2, 1, 0})})
      end)
      it("mse_loss with reduction " .. reduction .. " matches finite differences", function()
        passes(function(a, b) return F.mse_loss(a, b, {reduction = reduction}) end, {leaf({2, 3}, 1), leaf({2, 3}, 2)})
      end)
    end
    it("nll_loss takes i32 targets", function()
      passes(function(logp, t) return F.nll_loss(logp, t) end,
             {leaf({3, 4}, 1), ms.tensor({3, 3, 1}, {dtype = "i32"})})
    end)
    it("mse_loss defaults to the mean", function()
      passes(function(a, b) return F.mse_loss(a, b) end, {leaf({3}, 1), leaf({3}, 2)})
    end)
  end)

  describe("dropout", function()
    local p = 0.4

    local function dropped(x)
      ms.manual_seed(1234)
      return x:dropout(p)
    end

    it("matches finite differences when the seed replays the mask", function()
      passes(dropped, {leaf({4, 5}, 1, {margin = 0.1})})
    end)

    it("has the gradient mask / (1 - p) times the output gradient", function()
      local x = leaf({4, 5}, 1, {margin = 0.1})
      local out = dropped(x)
      local weights = gradcheck.values(20, -1, 1, 9)
      out:backward(gradcheck.tensor({4, 5}, weights))
      local kept_values, grads, inputs = gradcheck.flat(out), gradcheck.flat(x.grad), gradcheck.flat(x)
      local kept_count = 0
      for i = 1, 20 do
        local kept = kept_values[i] ~= 0
        if kept then kept_count = kept_count + 1 end
        assert.is_true(not kept or math.abs(kept_values[i] - inputs[i] / (1 - p)) < 1e-12)
        local expected = kept and weights[i] / (1 - p) or 0
        assert.is_true(math.abs(grads[i] - expected) < 1e-12,
                       string.format("element %d: %g, expected %g", i - 1, grads[i], expected))
      end
      assert.is_true(kept_count > 0 and kept_count < 20)
    end)

    it("gives the same mask after the same seed", function()
      local x = ms.ones(50, {dtype = "f64"})
      assert.is_true(ms.equal(dropped(x), dropped(x)))
    end)
  end)

  describe("scaled_dot_product_attention", function()
    it("matches finite differences with a causal mask", function()
      passes(function(q, k, v) return F.scaled_dot_product_attention(q, k, v, {is_causal = true}) end,
             {leaf({2, 3, 4}, 1), leaf({2, 3, 4}, 2), leaf({2, 3, 4}, 3)})
    end)
    it("matches finite differences for 4-D inputs without a mask", function()
      passes(function(q, k, v) return F.scaled_dot_product_attention(q, k, v) end,
             {leaf({1, 2, 3, 2}, 1), leaf({1, 2, 3, 2}, 2), leaf({1, 2, 3, 2}, 3)})
    end)
    it("matches finite differences with an explicit scale", function()
      passes(function(q, k, v) return F.scaled_dot_product_attention(q, k, v, {scale = 0.3, is_causal = true}) end,
             {leaf({2, 3, 2}, 4), leaf({2, 3, 2}, 5), leaf({2, 3, 2}, 6)})
    end)
    it("matches finite differences with dropout when the seed replays the mask", function()
      passes(function(q, k, v)
        ms.manual_seed(99)
        return F.scaled_dot_product_attention(q, k, v, {is_causal = true, dropout_p = 0.3})
      end, {leaf({2, 4, 2}, 7), leaf({2, 4, 2}, 8), leaf({2, 4, 2}, 9)})
    end)
  end)

  describe("compositions", function()
    it("the quick-start expression matches finite differences", function()
      passes(function(x) return (x * 2 + 1):relu():sum() end, {leaf({10, 3}, 8, {margin = 0.6})})
    end)
    it("a two-layer perceptron with a loss matches finite differences", function()
      passes(function(x, w1, b1, w2)
        local h = ms.gelu(ms.linear(x, w1, b1))
        return F.cross_entropy(ms.linear(h, w2), targets({1, 0}))
      end, {leaf({2, 3}, 1), leaf({4, 3}, 2), leaf({4}, 3), leaf({2, 4}, 4)})
    end)
  end)
end)
