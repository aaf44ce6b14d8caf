-- The fused hot paths of a transformer block: nn.F.linear_gelu (GEMM, then bias + GELU in one
-- pass; backward d(acc) and the bias gradient in one pass) and nn.F.add_layer_norm (residual
-- add and layer norm in one pass; backward adds the sum's own gradient in the same pass).
-- Each against a hand-written Lua reference in doubles, the unfused composition, and finite
-- differences in f64; 16-bit dtypes within stated bounds; nn.Sequential's automatic fusion
-- (and its absence when a hook must run); activation checkpointing and FSDP; bad input.
local ffi = require "ffi"
local ms = require "moonshard"
local C = require "moonshard.ffi"
local gradcheck = require "support.gradcheck"
local global_state = require "support.global_state"
local nn, ac, dist, fsdp = ms.nn, ms.ac, ms.dist, ms.fsdp
local F = nn.F
local lib = C.lib

before_each(global_state.save)
after_each(global_state.restore)

local function flat(t) return gradcheck.flat(t) end

-- A tensor of shape with values spread over [low, high) of dtype (made in f64, then cast).
local function values(shape, seed, low, high, dtype)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  local t = ms.tensor(gradcheck.values(n, low or -2, high or 2, seed), {dtype = "f64"}):view(shape)
  return dtype and dtype ~= "f64" and t:to(dtype) or t
end

local function leaf(t) return t:detach():requires_grad_() end

-- max |got - want| / (atol + rtol |want|) over two flat arrays must be <= 1.
local function expect_close(got, want, rtol, atol, what)
  assert.are.equal(#want, #got, what)
  for i = 1, #want do
    local err = math.abs(got[i] - want[i])
    if not (err <= atol + rtol * math.abs(want[i])) then
      error(string.format("%s element %d: got %.12g, want %.12g (error %.3g)", what, i, got[i], want[i], err), 2)
    end
  end
end

-- ---- hand-written references, in Lua doubles ----

local erf = require("support.reference_math").erf

local BETA, KAPPA = math.sqrt(2 / math.pi), 0.044715

local function gelu(z, approximate)
  if approximate == "tanh" then return 0.5 * z * (1 + math.tanh(BETA * (z + KAPPA * z ^ 3))) end
  return 0.5 * z * (1 + erf(z / math.sqrt(2)))
end

local function gelu_derivative(z, approximate)
  if approximate == "tanh" then
    local t = math.tanh(BETA * (z + KAPPA * z ^ 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * BETA * (1 + 3 * KAPPA * z * z)
  end
  return 0.5 * (1 + erf(z / math.sqrt(2))) + z * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
end

-- y = gelu(x W^T + b) and the gradients for gy, over rows of flat arrays: x [rows, k],
-- w [n, k], b [n], gy [rows, n].
local function linear_gelu_reference(x, w, b, gy, rows, k, n, approximate)
  local y, gx, gw, gb = {}, {}, {}, {}
  for i = 1, rows * k do gx[i] = 0 end
  for i = 1, n * k do gw[i] = 0 end
  for j = 1, n do gb[j] = 0 end
  for r = 0, rows - 1 do
    for j = 0, n - 1 do
      local z = b[j + 1]
      for c = 0, k - 1 do z = z + x[r * k + c + 1] * w[j * k + c + 1] end
      y[r * n + j + 1] = gelu(z, approximate)
      local dz = gy[r * n + j + 1] * gelu_derivative(z, approximate)
      gb[j + 1] = gb[j + 1] + dz
      for c = 0, k - 1 do
        gx[r * k + c + 1] = gx[r * k + c + 1] + dz * w[j * k + c + 1]
        gw[j * k + c + 1] = gw[j * k + c + 1] + dz * x[r * k + c + 1]
      end
    end
  end
  return y, gx, gw, gb
end

-- s = x + r, y = layer_norm(s) * w + b over rows of size n, and the gradients of x (= of r),
-- w and b for gy (into y) and gs (into s).
local function add_layer_norm_reference(x, r, w, b, gy, gs, rows, n, eps)
  local s, y, gx, gw, gb = {}, {}, {}, {}, {}
  for j = 1, n do gw[j], gb[j] = 0, 0 end
  for row = 0, rows - 1 do
    local mean, var = 0, 0
    for j = 1, n do
      local i = row * n + j
      s[i] = x[i] + r[i]
      mean = mean + s[i]
    end
    mean = mean / n
    for j = 1, n do var = var + (s[row * n + j] - mean) ^ 2 end
    local rstd = 1 / math.sqrt(var / n + eps)
    local sum_g, sum_g_xhat = 0, 0
    for j = 1, n do
      local i = row * n + j
      local xhat = (s[i] - mean) * rstd
      y[i] = xhat * w[j] + b[j]
      local g = gy[i] * w[j]
      sum_g, sum_g_xhat = sum_g + g, sum_g_xhat + g * xhat
      gw[j] = gw[j] + gy[i] * xhat
      gb[j] = gb[j] + gy[i]
    end
    for j = 1, n do
      local i = row * n + j
      local xhat = (s[i] - mean) * rstd
      gx[i] = rstd * (gy[i] * w[j] - sum_g / n - xhat * sum_g_xhat / n) + gs[i]
    end
  end
  return s, y, gx, gw, gb
end

-- ---- linear_gelu ----

describe("nn.F.linear_gelu", function()
  for _, approximate in ipairs({"none", "tanh"}) do
    for _, dtype in ipairs({"f64", "f32"}) do
      it(("%s, approximate '%s': forward and backward equal the hand-written reference"):format(dtype, approximate), function()
        -- x [2, 3, 5] seen through a transpose (non-contiguous), 7 output features
        local rows, k, n = 6, 5, 7
        local x_storage = leaf(values({2, 5, 3}, 1, -2, 2, dtype))
        local x = x_storage:transpose(1, 2)
        assert.is_false(x:is_contiguous())
        local w, b = leaf(values({n, k}, 2, -1, 1, dtype)), leaf(values({n}, 3, -1, 1, dtype))
        local gy = values({2, 3, n}, 4, -1, 1, dtype)
        local y = F.linear_gelu(x, w, b, {approximate = approximate})
        assert.are.equal("[2, 3, 7]", tostring(y:shape()))
        assert.are.equal("LinearGeluBackward0", y.grad_fn.name)
        y:backward(gy)
        local ref_y, ref_gx, ref_gw, ref_gb = linear_gelu_reference(flat(x:contiguous()), flat(w), flat(b), flat(gy),
                                                                    rows, k, n, approximate)
        -- f64: the order of the sums differs from the reference; f32: float rounding of
        -- sums of k or rows products of magnitude ~2, and of the f32 erf/exp (fastmath.h)
        local rtol, atol = 1e-12, 1e-12
        if dtype == "f32" then rtol, atol = 1e-5, 1e-5 end
        expect_close(flat(y), ref_y, rtol, atol, "y")
        expect_close(flat(x_storage.grad:transpose(1, 2):contiguous()), ref_gx, rtol, atol, "x.grad")
        expect_close(flat(w.grad), ref_gw, rtol, atol, "weight.grad")
        expect_close(flat(b.grad), ref_gb, rtol, atol, "bias.grad")
      end)
    end

    it(("matches finite differences in f64 (approximate '%s')"):format(approximate), function()
      local ok, message = gradcheck.check(function(x, w, b)
        return F.linear_gelu(x, w, b, {approximate = approximate})
      end, {gradcheck.input({4, 3}, {seed = 5, low = -2, high = 2}), gradcheck.input({5, 3}, {seed = 6, low = -1, high = 1}),
            gradcheck.input({5}, {seed = 7, low = -1, high = 1})})
      assert.is_true(ok, message)
    end)
  end

  it("equals gelu(linear(...)) within f32 rounding, with one row, one feature and a single input", function()
    for _, shape in ipairs({{1, 1, 1}, {1, 3, 1}, {4, 1, 9}}) do
      local rows, k, n = shape[1], shape[2], shape[3]
      local x, w, b = leaf(values({rows, k}, 11, -3, 3, "f32")), leaf(values({n, k}, 12, -1, 1, "f32")),
                      leaf(values({n}, 13, -1, 1, "f32"))
      local fused = F.linear_gelu(x, w, b)
      local x2, w2, b2 = leaf(x), leaf(w), leaf(b)
      local unfused = F.gelu(F.linear(x2, w2, b2))
      expect_close(flat(fused), flat(unfused), 1e-6, 1e-6, "y")
      local gy = values({rows, n}, 14, -1, 1, "f32")
      fused:backward(gy)
      unfused:backward(gy)
      expect_close(flat(x.grad), flat(x2.grad), 1e-5, 1e-6, "x.grad")
      expect_close(flat(w.grad), flat(w2.grad), 1e-5, 1e-6, "weight.grad")
      expect_close(flat(b.grad), flat(b2.grad), 1e-5, 1e-6, "bias.grad")
    end
  end)

  it("gives an empty output and a zero bias gradient for zero rows", function()
    local x, w, b = leaf(ms.zeros(0, 3, {dtype = "f64"})), leaf(values({4, 3}, 1)), leaf(values({4}, 2))
    local y = F.linear_gelu(x, w, b)
    assert.are.equal("[0, 4]", tostring(y:shape()))
    y:sum():backward()
    assert.are.same({0, 0, 0, 0}, flat(b.grad))
  end)

  for _, dtype in ipairs({"bf16", "f16"}) do
    it(dtype .. " inputs: within the 16-bit rounding of the f64 result of the same inputs", function()
      local x, w, b = leaf(values({6, 8}, 21, -2, 2, dtype)), leaf(values({5, 8}, 22, -0.5, 0.5, dtype)),
                      leaf(values({5}, 23, -0.5, 0.5, dtype))
      local gy = values({6, 5}, 24, -1, 1, dtype)
      local y = F.linear_gelu(x, w, b)
      assert.are.equal(dtype, y:dtype())
      y:backward(gy)
      local ref_y, ref_gx, ref_gw, ref_gb = linear_gelu_reference(flat(x), flat(w), flat(b), flat(gy), 6, 8, 5, "none")
      -- The GEMM rounds acc to 16 bits, the output is rounded again, and backward rounds
      -- d(acc) before its two GEMMs: a few 16-bit ulps (bf16 2^-8, f16 2^-11) of values whose
      -- sums reach ~4 in magnitude.
      local ulp = dtype == "bf16" and 2 ^ -8 or 2 ^ -11
      expect_close(flat(y), ref_y, 4 * ulp, 4 * ulp, "y")
      expect_close(flat(x.grad), ref_gx, 8 * ulp, 8 * ulp, "x.grad")
      expect_close(flat(w.grad), ref_gw, 8 * ulp, 8 * ulp, "weight.grad")
      expect_close(flat(b.grad), ref_gb, 8 * ulp, 8 * ulp, "bias.grad")
    end)
  end

  it("without a bias is gelu(linear(x, weight))", function()
    local x, w = values({3, 4}, 1), values({2, 4}, 2)
    assert.is_true(ms.equal(F.linear_gelu(x, w, nil), F.gelu(F.linear(x, w))))
  end)

  it("names what is wrong with its arguments", function()
    local x, w, b = values({3, 4}, 1, -1, 1, "f32"), values({2, 4}, 2, -1, 1, "f32"), values({2}, 3, -1, 1, "f32")
    local function raises(pattern, fn)
      local ok, err = pcall(fn)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(pattern, 1, true), tostring(err))
    end
    raises("approximate must be 'none' or 'tanh', got 'fast'", function() F.linear_gelu(x, w, b, {approximate = "fast"}) end)
    raises("unknown option 'approx'", function() F.linear_gelu(x, w, b, {approx = "tanh"}) end)
    raises("weight must be 2-D", function() F.linear_gelu(x, values({8}, 2, -1, 1, "f32"), b) end)
    raises("does not match weight of shape", function() F.linear_gelu(values({3, 5}, 1, -1, 1, "f32"), w, b) end)
    raises("bias must be a 1-D tensor of 2 elements, got shape [3]", function()
      F.linear_gelu(x, w, values({3}, 3, -1, 1, "f32"))
    end)
    raises("f64", function() F.linear_gelu(x, values({2, 4}, 2), b) end)
    raises("f64", function() F.linear_gelu(x, w, values({2}, 3)) end)
  end)

  it("checks the C entry points' arguments", function()
    local acc, bias, y = ms.zeros(3, 4), ms.zeros(4), ms.zeros(3, 4)
    -- every substring of the ';'-separated patterns is in the error message
    local function fails(patterns, status)
      assert.are_not.equal(0, status)
      local message = ffi.string(lib.ms_last_error())
      for pattern in patterns:gmatch("[^;]+") do assert.is_truthy(message:find(pattern, 1, true), message) end
    end
    fails("bias_gelu:;bias", lib.ms_bias_gelu(y._c, nil, acc._c, ms.zeros(5)._c, 0))
    fails("bias_gelu:;bias;f64", lib.ms_bias_gelu(y._c, nil, acc._c, ms.zeros(4, {dtype = "f64"})._c, 0))
    fails("bias_gelu:;(y)", lib.ms_bias_gelu(ms.zeros(4, 3)._c, nil, acc._c, bias._c, 0))
    fails("tanh_approx must be 0 or 1, got 2", lib.ms_bias_gelu(y._c, nil, acc._c, bias._c, 2))
    fails("bias_gelu:;acc;i32", lib.ms_bias_gelu(ms.zeros(3, 4, {dtype = "i32"})._c, nil,
                                                 ms.zeros(3, 4, {dtype = "i32"})._c, ms.zeros(4, {dtype = "i32"})._c, 0))
    fails("bias_gelu:;derivative;(acc)", lib.ms_bias_gelu(y._c, ms.zeros(4, 3)._c, acc._c, bias._c, 0))
    -- the derivative is kept in the dtype the math runs in: f32 for a bf16 op, f64 for f64
    fails("bias_gelu:;derivative must be f32;bf16;got bf16",
          lib.ms_bias_gelu(ms.zeros(3, 4, {dtype = "bf16"})._c, ms.zeros(3, 4, {dtype = "bf16"})._c,
                           ms.zeros(3, 4, {dtype = "bf16"})._c, ms.zeros(4, {dtype = "bf16"})._c, 0))
    fails("bias_gelu:;derivative must be f64;got f32",
          lib.ms_bias_gelu(ms.zeros(3, 4, {dtype = "f64"})._c, ms.zeros(3, 4)._c, ms.zeros(3, 4, {dtype = "f64"})._c,
                           ms.zeros(4, {dtype = "f64"})._c, 0))
    fails("bias_gelu:;derivative shares memory with y", lib.ms_bias_gelu(y._c, y._c, acc._c, bias._c, 0))
    local rows = ms.zeros(4, 4) -- acc is rows 0-2, derivative rows 1-3
    fails("bias_gelu:;derivative shares memory with acc",
          lib.ms_bias_gelu(y._c, rows:narrow(0, 1, 3)._c, rows:narrow(0, 0, 3)._c, bias._c, 0))
    local derivative = ms.zeros(3, 4)
    fails("bias_gelu_backward:;dbias", lib.ms_bias_gelu_backward(ms.zeros(3, 4)._c, ms.zeros(3)._c, y._c,
                                                                 derivative._c))
    fails("bias_gelu_backward:;derivative;(dy)", lib.ms_bias_gelu_backward(ms.zeros(3, 5)._c, ms.zeros(5)._c,
                                                                          ms.zeros(3, 5)._c, derivative._c))
    fails("bias_gelu_backward:;dy;i32", lib.ms_bias_gelu_backward(ms.zeros(3, 4)._c, ms.zeros(4)._c,
                                                                 ms.zeros(3, 4, {dtype = "i32"})._c, derivative._c))
    fails("bias_gelu_backward:;dy must have at least 1 dim", lib.ms_bias_gelu_backward(ms.zeros(3, 4)._c,
                                                              ms.zeros(4)._c, ms.zeros({})._c, derivative._c))
  end)
end)

-- ---- nn.Sequential's fusion of Linear -> GELU ----

describe("nn.Sequential with an adjacent Linear and GELU", function()
  local function model(approximate, bias)
    ms.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6, {bias = bias}), nn.GELU({approximate = approximate}), nn.Linear(6, 3))
  end

  -- The output of the first two modules alone, to see which node made it.
  local function first_pair(m, x) return nn.Sequential(m[1], m[2])(x) end

  for _, approximate in ipairs({"none", "tanh"}) do
    it(("runs them as one linear_gelu with the unfused numbers (approximate '%s')"):format(approximate), function()
      local m = model(approximate)
      local x = values({5, 4}, 1, -2, 2, "f32")
      assert.are.equal("LinearGeluBackward0", first_pair(m, x).grad_fn.name)
      local fused = m(x)
      fused:sum():backward()
      local fused_grads = {}
      for name, p in m:named_parameters() do fused_grads[name] = flat(p.grad) end
      m:zero_grad()
      local unfused = m[3](m[2](m[1](x)))
      unfused:sum():backward()
      expect_close(flat(fused), flat(unfused), 1e-6, 1e-6, "output")
      for name, p in m:named_parameters() do expect_close(fused_grads[name], flat(p.grad), 1e-5, 1e-6, name) end
    end)
  end

  it("does not fuse when a hook is registered, and the hook runs", function()
    for _, which in ipairs({"forward hook on GELU", "pre-hook on Linear", "forward hook on Linear"}) do
      local m = model("none")
      local calls = 0
      if which == "forward hook on GELU" then
        m[2]:register_forward_hook(function() calls = calls + 1 end)
      elseif which == "pre-hook on Linear" then
        m[1]:register_forward_pre_hook(function() calls = calls + 1 end)
      else
        m[1]:register_forward_hook(function() calls = calls + 1 end)
      end
      local y = first_pair(m, values({5, 4}, 1, -2, 2, "f32"))
      assert.are.equal(1, calls, which)
      assert.are.equal("GeluBackward0", y.grad_fn.name, which)
    end
  end)

  it("does not fuse a Linear without a bias, a subclass, or an activation checkpointed Linear", function()
    local x = values({5, 4}, 1, -2, 2, "f32")
    assert.are_not.equal("LinearGeluBackward0", first_pair(model("none", false), x).grad_fn.name)
    local MyLinear = nn.Linear:extend("MyLinear")
    local seen = 0
    function MyLinear:forward(v) seen = seen + 1; return nn.Linear.forward(self, v) end
    local y = nn.Sequential(MyLinear(4, 6), nn.GELU())(x)
    assert.are.equal(1, seen)
    assert.are_not.equal("LinearGeluBackward0", y.grad_fn.name)
    local m = model("none")
    ac.checkpoint_wrapper(m[1])
    assert.are_not.equal("LinearGeluBackward0", first_pair(m, x).grad_fn.name)
  end)
end)

-- ---- add_layer_norm ----

describe("nn.F.add_layer_norm", function()
  for _, dtype in ipairs({"f64", "f32"}) do
    it(dtype .. ": s, y and every gradient equal the hand-written reference (non-contiguous input)", function()
      local rows, n, eps = 6, 7, 1e-5
      local x_storage = leaf(values({2, n, 3}, 1, -2, 2, dtype))
      local x = x_storage:transpose(1, 2) -- [2, 3, 7], not contiguous
      local r = leaf(values({2, 3, n}, 2, -2, 2, dtype))
      local w, b = leaf(values({n}, 3, 0.5, 1.5, dtype)), leaf(values({n}, 4, -1, 1, dtype))
      local gy, gs = values({2, 3, n}, 5, -1, 1, dtype), values({2, 3, n}, 6, -1, 1, dtype)
      local s, y = F.add_layer_norm(x, r, n, w, b, eps)
      ms.autograd.backward({s, y}, {gs, gy})
      local ref_s, ref_y, ref_gx, ref_gw, ref_gb = add_layer_norm_reference(flat(x:contiguous()), flat(r), flat(w), flat(b),
                                                                           flat(gy), flat(gs), rows, n, eps)
      local rtol, atol = 1e-12, 1e-12
      if dtype == "f32" then rtol, atol = 2e-6, 2e-6 end -- float rounding of rows of 7 values ~2
      expect_close(flat(s), ref_s, rtol, atol, "s")
      expect_close(flat(y), ref_y, rtol, atol, "y")
      expect_close(flat(x_storage.grad:transpose(1, 2):contiguous()), ref_gx, rtol, atol, "x.grad")
      expect_close(flat(r.grad), ref_gx, rtol, atol, "residual.grad")
      expect_close(flat(w.grad), ref_gw, rtol, atol, "weight.grad")
      expect_close(flat(b.grad), ref_gb, rtol, atol, "bias.grad")
    end)

    -- rows of 8 lanes and a tail of 3, and a row count that leaves a short group of rows
    it(dtype .. ": 13 rows of 19 equal the hand-written reference", function()
      local rows, n, eps = 13, 19, 1e-5
      local x, r = leaf(values({rows, n}, 1, -2, 2, dtype)), leaf(values({rows, n}, 2, -2, 2, dtype))
      local w, b = leaf(values({n}, 3, 0.5, 1.5, dtype)), leaf(values({n}, 4, -1, 1, dtype))
      local gy, gs = values({rows, n}, 5, -1, 1, dtype), values({rows, n}, 6, -1, 1, dtype)
      local s, y = F.add_layer_norm(x, r, n, w, b, eps)
      ms.autograd.backward({s, y}, {gs, gy})
      local ref_s, ref_y, ref_gx, ref_gw, ref_gb = add_layer_norm_reference(flat(x), flat(r), flat(w), flat(b),
                                                                           flat(gy), flat(gs), rows, n, eps)
      local rtol, atol = 1e-12, 1e-12
      if dtype == "f32" then rtol, atol = 4e-6, 4e-6 end -- float rounding over rows of 19 and sums of 13 rows
      expect_close(flat(s), ref_s, rtol, atol, "s")
      expect_close(flat(y), ref_y, rtol, atol, "y")
      expect_close(flat(x.grad), ref_gx, rtol, atol, "x.grad")
      expect_close(flat(w.grad), ref_gw, rtol, atol, "weight.grad")
      expect_close(flat(b.grad), ref_gb, rtol, atol, "bias.grad")
    end)
  end

  -- f32 on the CPU: the same additions and the same layer norm in the same order as x + r
  -- followed by layer_norm, and the engine's sum of the two gradients of s is the one add of
  -- the fused backward.
  it("f32: equals x + residual then layer_norm bit for bit, forward and backward", function()
    for _, case in ipairs({{shape = {4, 9}, ns = {9}}, {shape = {2, 3, 5}, ns = {3, 5}}, {shape = {3, 1}, ns = {1}}}) do
      local x, r = leaf(values(case.shape, 1, -3, 3, "f32")), leaf(values(case.shape, 2, -3, 3, "f32"))
      local size = 1
      for _, v in ipairs(case.ns) do size = size * v end
      local w, b = leaf(values(case.ns, 3, 0.5, 1.5, "f32")), leaf(values(case.ns, 4, -1, 1, "f32"))
      local gy, gs = values(case.shape, 5, -1, 1, "f32"), values(case.shape, 6, -1, 1, "f32")
      local s, y = F.add_layer_norm(x, r, case.ns, w, b)
      ms.autograd.backward({s, y}, {gs, gy})
      local x2, r2, w2, b2 = leaf(x), leaf(r), leaf(w), leaf(b)
      local s2 = x2 + r2
      local y2 = F.layer_norm(s2, case.ns, w2, b2)
      ms.autograd.backward({s2, y2}, {gs, gy})
      assert.is_true(ms.equal(s, s2))
      assert.is_true(ms.equal(y, y2))
      assert.is_true(ms.equal(x.grad, x2.grad))
      assert.is_true(ms.equal(r.grad, r2.grad))
      assert.is_true(ms.equal(w.grad, w2.grad))
      assert.is_true(ms.equal(b.grad, b2.grad))
    end
  end)

  it("gives the right gradients when only s or only y is used, and without weight and bias", function()
    local x, r = leaf(values({3, 4}, 1)), leaf(values({3, 4}, 2))
    local g = values({3, 4}, 3, -1, 1)
    local zero = ms.zeros(3, 4, {dtype = "f64"})
    local s = F.add_layer_norm(x, r, 4)
    s:backward(g)
    assert.are.same(flat(g), flat(x.grad))
    assert.are.same(flat(g), flat(r.grad))
    x.grad, r.grad = nil, nil
    local _, y = F.add_layer_norm(x, r, 4)
    y:backward(g)
    local _, _, ref_gx = add_layer_norm_reference(flat(x), flat(r), {1, 1, 1, 1}, {0, 0, 0, 0}, flat(g), flat(zero), 3, 4,
                                                  1e-5)
    expect_close(flat(x.grad), ref_gx, 1e-12, 1e-12, "x.grad (y only)")
    expect_close(flat(r.grad), ref_gx, 1e-12, 1e-12, "residual.grad (y only)")
  end)

  it("keeps its gradients right over a retained graph and when only the weight needs one", function()
    local x, r = values({3, 4}, 1), values({3, 4}, 2)
    local w = leaf(values({4}, 3, 0.5, 1.5))
    local s, y = F.add_layer_norm(x, r, 4, w, nil)
    assert.is_false(s.requires_grad or false)
    assert.is_true(y.requires_grad)
    local loss = (y * y):sum()
    loss:backward(nil, {retain_graph = true})
    local first = flat(w.grad)
    loss:backward()
    local twice = flat(w.grad)
    for i = 1, #first do assert.is_true(math.abs(twice[i] - 2 * first[i]) <= 1e-12 * math.abs(first[i]) + 1e-15) end
  end)

  it("matches finite differences in f64 through both outputs", function()
    local ok, message = gradcheck.check(function(x, r, w, b)
      local s, y = F.add_layer_norm(x, r, {3}, w, b)
      return s * y + s
    end, {gradcheck.input({2, 3}, {seed = 1, low = -2, high = 2}), gradcheck.input({2, 3}, {seed = 2, low = -2, high = 2}),
          gradcheck.input({3}, {seed = 3, low = 0.5, high = 1.5}), gradcheck.input({3}, {seed = 4, low = -1, high = 1})})
    assert.is_true(ok, message)
  end)

  for _, dtype in ipairs({"bf16", "f16"}) do
    it(dtype .. " inputs: within the 16-bit rounding of the f64 result of the same inputs", function()
      local rows, n = 4, 16
      local x, r = leaf(values({rows, n}, 1, -2, 2, dtype)), leaf(values({rows, n}, 2, -2, 2, dtype))
      local w, b = leaf(values({n}, 3, 0.5, 1.5, dtype)), leaf(values({n}, 4, -1, 1, dtype))
      local gy, gs = values({rows, n}, 5, -1, 1, dtype), values({rows, n}, 6, -1, 1, dtype)
      local s, y = F.add_layer_norm(x, r, n, w, b)
      assert.are.equal(dtype, s:dtype())
      assert.are.equal(dtype, y:dtype())
      ms.autograd.backward({s, y}, {gs, gy})
      local ref_s, ref_y, ref_gx, ref_gw, ref_gb = add_layer_norm_reference(flat(x), flat(r), flat(w), flat(b), flat(gy),
                                                                           flat(gs), rows, n, 1e-5)
      -- s and y are rounded once to 16 bits (half an ulp; bf16 ulp 2^-8, f16 2^-11, relative)
      -- after an f32 computation; the gradients sum rows of 16 terms of magnitude ~2 and
      -- are rounded on the way out: a few ulps of the largest term.
      local ulp = dtype == "bf16" and 2 ^ -8 or 2 ^ -11
      expect_close(flat(s), ref_s, ulp, 1e-6, "s")
      expect_close(flat(y), ref_y, ulp, 2 * ulp, "y")
      expect_close(flat(x.grad), ref_gx, 4 * ulp, 8 * ulp, "x.grad")
      expect_close(flat(r.grad), ref_gx, 4 * ulp, 8 * ulp, "residual.grad")
      expect_close(flat(w.grad), ref_gw, 4 * ulp, 8 * ulp, "weight.grad")
      expect_close(flat(b.grad), ref_gb, 4 * ulp, 8 * ulp, "bias.grad")
    end)
  end

  it("records nothing under no_grad", function()
    local x, r = leaf(values({2, 3}, 1)), leaf(values({2, 3}, 2))
    ms.autograd.no_grad(function()
      local s, y = F.add_layer_norm(x, r, 3)
      assert.is_nil(s.grad_fn)
      assert.is_nil(y.grad_fn)
    end)
  end)

  it("names what is wrong with its arguments", function()
    local x = values({2, 3}, 1, -1, 1, "f32")
    local function raises(pattern, fn)
      local ok, err = pcall(fn)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(pattern, 1, true), tostring(err))
    end
    raises("residual has shape [3, 2] but input has [2, 3]", function() F.add_layer_norm(x, values({3, 2}, 2, -1, 1, "f32"), 3) end)
    raises("residual has dtype f64 but input has f32", function() F.add_layer_norm(x, values({2, 3}, 2), 3) end)
    raises("residual must be a tensor", function() F.add_layer_norm(x, 1, 3) end)
    raises("does not end with normalized_shape [4]", function() F.add_layer_norm(x, x, 4) end)
    raises("eps must be a non-negative number", function() F.add_layer_norm(x, x, 3, nil, nil, -1) end)
    raises("add_layer_norm: weight", function() F.add_layer_norm(x, x, 3, values({4}, 3, -1, 1, "f32")) end)
  end)

  it("checks the C entry points' arguments", function()
    local x, r = ms.zeros(2, 3), ms.zeros(2, 3)
    local out, sum, mean, rstd = ms.zeros(2, 3), ms.zeros(2, 3), ms.zeros(2), ms.zeros(2)
    -- every substring of the ';'-separated patterns is in the error message
    local function fails(patterns, status)
      assert.are_not.equal(0, status)
      local message = ffi.string(lib.ms_last_error())
      for pattern in patterns:gmatch("[^;]+") do assert.is_truthy(message:find(pattern, 1, true), message) end
    end
    fails("add_layer_norm:;(residual)", lib.ms_add_layer_norm(sum._c, out._c, mean._c, rstd._c, x._c, ms.zeros(3, 2)._c,
                                                            nil, nil, 1, 1e-5))
    fails("add_layer_norm:;sum;f64", lib.ms_add_layer_norm(ms.zeros(2, 3, {dtype = "f64"})._c, out._c, mean._c, rstd._c, x._c,
                                                       r._c, nil, nil, 1, 1e-5))
    fails("add_layer_norm: residual is NULL", lib.ms_add_layer_norm(sum._c, out._c, mean._c, rstd._c, x._c, nil, nil, nil,
                                                                     1, 1e-5))
    fails("add_layer_norm_backward:;(dsum)", lib.ms_add_layer_norm_backward(ms.zeros(2, 3)._c, nil, nil, ms.zeros(2, 3)._c,
                                                                          ms.zeros(3, 3)._c, sum._c, mean._c, rstd._c,
                                                                          nil, 1))
  end)
end)

-- ---- a transformer-style block through activation checkpointing and FSDP ----

local DIM, HIDDEN = 8, 16

local FusedBlock = nn.Module:extend("FusedBlock")
function FusedBlock:__init()
  self.ln_1 = nn.LayerNorm(DIM)
  self.proj = nn.Linear(DIM, DIM)
  self.ln_2 = nn.LayerNorm(DIM)
  self.mlp = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))
end
function FusedBlock:forward(x)
  local ln_2 = self.ln_2
  local s, h = F.add_layer_norm(x, self.proj(self.ln_1(x)), ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps)
  return s + self.mlp(h)
end

local FusedModel = nn.Module:extend("FusedModel")
function FusedModel:__init()
  self.blocks = nn.ModuleList({FusedBlock(), FusedBlock()})
  self.head = nn.Linear(DIM, 1)
end
function FusedModel:forward(x)
  for _, block in self.blocks:ipairs() do x = block(x) end
  return self.head(x)
end

local function build()
  ms.manual_seed(0)
  return FusedModel()
end

local function grads_of(model, x)
  model(x):sum():backward()
  local out = {}
  for name, p in model:named_parameters() do out[name] = flat(p.grad) end
  return out
end

describe("the fused ops inside a model", function()
  it("train bitwise alike with and without activation checkpointing", function()
    local x = leaf(values({5, DIM}, 1, -2, 2, "f32"))
    local want = grads_of(build(), x)
    for _, wrap in ipairs({
      function(b) ac.checkpoint_wrapper(b) end,
      function(b) ac.checkpoint_wrapper(b, {checkpoint_impl = "reentrant"}) end,
      function(b) ac.checkpoint_wrapper(b, {policy = ac.default_policy}) end,
    }) do
      local model = build()
      for _, block in model.blocks:ipairs() do wrap(block) end
      local got = grads_of(model, x)
      for name, values_ in pairs(want) do assert.are.same(values_, got[name], name) end
    end
  end)

  it("give FSDP's gradients those of the unwrapped model (FULL_SHARD, 2 ranks, f64)", function()
    ms.set_default_dtype("f64")
    local x = values({4, DIM}, 1, -2, 2)
    local want = grads_of(build(), x)
    ms.set_default_dtype("f32")
    local results = dist.spawn(2, function(rank)
      ms.set_default_dtype("f64")
      local model = fsdp.FSDP(build(), {auto_wrap_policy = fsdp.wrap_policy({FusedBlock})})
      local mine = x:narrow(0, rank * 2, 2)
      -- the sum over the whole batch: each rank's half, FSDP averages over the 2 ranks
      model(mine):sum():mul(2):backward()
      local out = {}
      for name, p in model:named_parameters() do out[name] = flat(p.grad:full_tensor()) end
      return out
    end)
    for name, values_ in pairs(want) do
      local got = results[1][name]
      assert.is_truthy(got, name)
      expect_close(got, values_, 1e-12, 1e-12, name)
    end
  end)
end)
