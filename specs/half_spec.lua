-- bf16 and f16 compute: every result is the exact result of the 16-bit inputs rounded once at
-- the store, within an error bound derived from the dtype's epsilon (half an ulp: eps / 2
-- relative) plus f32 accumulation over the reduction length n (n * 2^-24 of the magnitude
-- summed). The references are computed here in Lua doubles from the same 16-bit values.
local ms = require "moonshard"
local global_state = require "support.global_state"
local F = ms.nn.F

local EPS = {bf16 = 2 ^ -7, f16 = 2 ^ -10}
-- Half the smallest subnormal: the absolute floor of one rounding near zero.
local TINY = {bf16 = 2 ^ -134, f16 = 2 ^ -25}
local U32 = 2 ^ -24
local FASTMATH = 2 ^ -21 -- f32 exp and friends from kernels/fastmath.h, relative

local function flat(t)
  local out = {}
  local function walk(v)
    if type(v) == "number" then out[#out + 1] = v else for i = 1, #v do walk(v[i]) end end
  end
  walk(t:table())
  return out
end

-- got (a 16-bit tensor) against ref (a flat array of doubles); mag[i] (or mag) bounds the sum
-- of the magnitudes a reduction of length n added up for element i.
local function expect_close(dtype, got, ref, n, mag, what)
  assert.are.equal(dtype, got:dtype(), what)
  local values = flat(got)
  assert.are.equal(#ref, #values, what)
  for i = 1, #ref do
    local m = type(mag) == "table" and mag[i] or mag or 0
    local bound = (EPS[dtype] / 2 + FASTMATH) * math.abs(ref[i]) + (n or 1) * U32 * m + TINY[dtype]
    local err = math.abs(values[i] - ref[i])
    if not (err <= bound) then
      error(string.format("%s (%s) element %d: got %.9g, want %.9g (error %.3g > bound %.3g)",
                          what, dtype, i, values[i], ref[i], err, bound), 2)
    end
  end
end

local function map(a, fn)
  local out = {}
  for i, v in ipairs(a) do out[i] = fn(v, i) end
  return out
end

local erf = require("support.reference_math").erf

for _, dtype in ipairs({"bf16", "f16"}) do
  describe(dtype .. " compute", function()
    before_each(function() ms.manual_seed(5) end)

    it("creation: zeros, full, rand in [0, 1), randn rounding the f32 draws once", function()
      assert.are.same({0, 0, 0}, flat(ms.zeros(3, {dtype = dtype})))
      assert.are.same({1.5, 1.5}, flat(ms.full({2}, 1.5, {dtype = dtype})))
      for _, v in ipairs(flat(ms.rand(200, {dtype = dtype}))) do assert.is_true(v >= 0 and v <= 1) end
      ms.manual_seed(9)
      local r32 = flat(ms.randn(300))
      ms.manual_seed(9)
      expect_close(dtype, ms.randn(300, {dtype = dtype}), r32, 0, 0, "randn")
    end)

    it("element-wise ops round each result once", function()
      local a, b = ms.randn(4, 33, {dtype = dtype}), ms.randn(33, {dtype = dtype}) + 3
      local av, bv = flat(a), flat(b)
      local function bi(i) return bv[(i - 1) % 33 + 1] end
      expect_close(dtype, a + b, map(av, function(x, i) return x + bi(i) end), 1, 0, "add")
      expect_close(dtype, a * b, map(av, function(x, i) return x * bi(i) end), 1, 0, "mul")
      expect_close(dtype, a / b, map(av, function(x, i) return x / bi(i) end), 1, 0, "div")
      expect_close(dtype, a * 0.37, map(av, function(x) return x * 0.37 end), 1, 0, "scalar mul")
      expect_close(dtype, 1 - a, map(av, function(x) return 1 - x end), 1, 0, "reversed scalar sub")
      expect_close(dtype, a:exp(), map(av, math.exp), 1, 0, "exp")
      expect_close(dtype, a:tanh(), map(av, math.tanh), 1, 0, "tanh")
      expect_close(dtype, a:sigmoid(), map(av, function(x) return 1 / (1 + math.exp(-x)) end), 1, 0,
                   "sigmoid")
      expect_close(dtype, F.gelu(a), map(av, function(x) return x * (1 + erf(x / math.sqrt(2))) / 2 end),
                   1, 0, "gelu")
    end)

    it("reductions accumulate in f32 or better and round once", function()
      local n = 1000
      local a = ms.randn(3, n, {dtype = dtype})
      local av = flat(a)
      local sums, mags = {}, {}
      for r = 1, 3 do
        local s, m = 0, 0
        for j = 1, n do
          local v = av[(r - 1) * n + j]
          s, m = s + v, m + math.abs(v)
        end
        sums[r], mags[r] = s, m
      end
      expect_close(dtype, a:sum(1), sums, n, mags, "sum")
      expect_close(dtype, a:mean(1), map(sums, function(s) return s / n end), n,
                   map(mags, function(m) return m / n end), "mean")
    end)

    it("matmul rounds each output once after an f32 accumulation of length k", function()
      local m, k, n = 5, 300, 7
      local a, b = ms.randn(m, k, {dtype = dtype}), ms.randn(k, n, {dtype = dtype})
      local av, bv = flat(a), flat(b)
      local ref, mag = {}, {}
      for i = 1, m do
        for j = 1, n do
          local s, g = 0, 0
          for p = 1, k do
            local x = av[(i - 1) * k + p] * bv[(p - 1) * n + j]
            s, g = s + x, g + math.abs(x)
          end
          ref[#ref + 1], mag[#mag + 1] = s, g
        end
      end
      expect_close(dtype, ms.matmul(a, b), ref, k, mag, "matmul")
    end)

    it("linear of a transposed view across GEMM tiles accumulates onto the bias once", function()
      -- m and n cross the CPU GEMM's 256-wide tiles; x is a transposed view, the weight is
      -- read transposed, and the bias is out's starting value (beta = 1).
      local m, k, n = 260, 40, 270
      local x = ms.randn(k, m, {dtype = dtype}):t()
      local w, bias = ms.randn(n, k, {dtype = dtype}), ms.randn(n, {dtype = dtype})
      local xv, wv, bv = flat(x), flat(w), flat(bias)
      local ref, mag = {}, {}
      for i = 1, m do
        for j = 1, n do
          local s, g = bv[j], math.abs(bv[j])
          for p = 1, k do
            local v = xv[(i - 1) * k + p] * wv[(j - 1) * k + p]
            s, g = s + v, g + math.abs(v)
          end
          ref[#ref + 1], mag[#mag + 1] = s, g
        end
      end
      expect_close(dtype, F.linear(x, w, bias), ref, k + 1, mag, "linear")
    end)

    it("matmul of large operands allocates only its output", function()
      -- the f32 tiles live in a fixed per-thread scratch, not in the tensor pools
      local a, b = ms.randn(512, 384, {dtype = dtype}), ms.randn(384, 640, {dtype = dtype})
      collectgarbage()
      collectgarbage()
      local before = ms.memory_stats().allocated
      ms.reset_peak_memory_stats()
      local c = ms.matmul(a, b)
      local stats = ms.memory_stats()
      assert.are.equal(512 * 640 * 2, c:nbytes())
      assert.are.equal(before + c:nbytes(), stats.allocated)
      assert.are.equal(before + c:nbytes(), stats.peak)
    end)

    it("element-wise ops on large operands allocate only their outputs", function()
      -- the CPU loops convert blocks of 256 elements on the stack, not whole operands
      local a, b = ms.randn(256, 1024, {dtype = dtype}), ms.randn(1024, {dtype = dtype})
      collectgarbage()
      collectgarbage()
      local before = ms.memory_stats().allocated
      for _, op in ipairs({function() return a + b end, function() return a:exp() end,
                           function() return a * 3 end, function() return F.gelu(a) end}) do
        ms.reset_peak_memory_stats()
        local c = op()
        assert.are.equal(256 * 1024 * 2, c:nbytes())
        assert.are.equal(before + c:nbytes(), ms.memory_stats().peak)
        c:free()
      end
      local av, bv = flat(a), flat(b)
      expect_close(dtype, a + b, map(av, function(v, i) return v + bv[(i - 1) % 1024 + 1] end),
                   1, nil, "broadcast add")
      expect_close(dtype, 3 - a, map(av, function(v) return 3 - v end), 1, nil, "reversed scalar")
    end)

    it("softmax, log_softmax and layer_norm over rows", function()
      local rows, len = 4, 64
      local x = ms.randn(rows, len, {dtype = dtype}) * 2
      local xv = flat(x)
      local soft, logsoft, norm = {}, {}, {}
      for r = 0, rows - 1 do
        local max, sum, mean, var = -math.huge, 0, 0, 0
        for j = 1, len do max = math.max(max, xv[r * len + j]) end
        for j = 1, len do sum = sum + math.exp(xv[r * len + j] - max) end
        for j = 1, len do mean = mean + xv[r * len + j] / len end
        for j = 1, len do var = var + (xv[r * len + j] - mean) ^ 2 / len end
        for j = 1, len do
          local v = xv[r * len + j]
          soft[r * len + j] = math.exp(v - max) / sum
          logsoft[r * len + j] = v - max - math.log(sum)
          norm[r * len + j] = (v - mean) / math.sqrt(var + 1e-5)
        end
      end
      expect_close(dtype, x:softmax(1), soft, len, soft, "softmax")
      expect_close(dtype, x:log_softmax(1), logsoft, len, map(logsoft, function(v) return math.abs(v) + 8 end),
                   "log_softmax")
      expect_close(dtype, F.layer_norm(x, {len}), norm, len, map(norm, function(v) return math.abs(v) + 4 end),
                   "layer_norm")
    end)

    it("embedding copies rows exactly; cross_entropy rounds the mean loss once", function()
      local weight = ms.randn(10, 6, {dtype = dtype})
      local idx = ms.tensor({3, 0, 9, 3}, {dtype = "i64"})
      local wv, rows = flat(weight), {}
      for _, i in ipairs({3, 0, 9, 3}) do
        for j = 1, 6 do rows[#rows + 1] = wv[i * 6 + j] end
      end
      assert.are.same(rows, flat(F.embedding(idx, weight)))
      local logits = ms.randn(8, 5, {dtype = dtype})
      local target = ms.tensor({0, 4, 2, 1, 3, 3, 0, 2}, {dtype = "i64"})
      local lv, tv, total = flat(logits), {0, 4, 2, 1, 3, 3, 0, 2}, 0
      for r = 0, 7 do
        local max, sum = -math.huge, 0
        for j = 1, 5 do max = math.max(max, lv[r * 5 + j]) end
        for j = 1, 5 do sum = sum + math.exp(lv[r * 5 + j] - max) end
        total = total - (lv[r * 5 + tv[r + 1] + 1] - max - math.log(sum))
      end
      -- log_softmax rounds to 16 bits before nll reads it: one more rounding per term
      local loss = F.cross_entropy(logits, target)
      expect_close(dtype, loss, {total / 8}, 40, total / 8 + EPS[dtype] * 16, "cross_entropy")
    end)

    it("backward: gradients in the tensor's dtype, each rounded once", function()
      local x = ms.randn(3, 40, {dtype = dtype, requires_grad = true})
      local g = ms.randn(3, 40, {dtype = dtype})
      x:tanh():backward(g)
      local xv, gv = flat(x), flat(g)
      assert.are.equal(dtype, x.grad:dtype())
      expect_close(dtype, x.grad, map(xv, function(v, i) return gv[i] * (1 - math.tanh(v) ^ 2) end),
                   1, 0, "tanh backward")

      local k = 50
      local a = ms.randn(4, k, {dtype = dtype, requires_grad = true})
      local b = ms.randn(k, 3, {dtype = dtype})
      local go = ms.randn(4, 3, {dtype = dtype})
      ms.matmul(a, b):backward(go)
      local bv, gov, ref, mag = flat(b), flat(go), {}, {}
      for i = 1, 4 do
        for p = 1, k do
          local s, m = 0, 0
          for j = 1, 3 do
            local v = gov[(i - 1) * 3 + j] * bv[(p - 1) * 3 + j]
            s, m = s + v, m + math.abs(v)
          end
          ref[#ref + 1], mag[#mag + 1] = s, m
        end
      end
      expect_close(dtype, a.grad, ref, 3, mag, "matmul backward")
    end)

    it("an optimizer step updates 16-bit parameters in f32 and rounds them once", function()
      local w = ms.randn(50, {dtype = dtype, requires_grad = true})
      local before = flat(w)
      w.grad = ms.randn(50, {dtype = dtype})
      local grads = flat(w.grad)
      local opt = ms.optim.SGD({w}, {lr = 0.25})
      opt:step()
      expect_close(dtype, w, map(before, function(v, i) return v - 0.25 * grads[i] end), 2,
                   map(before, function(v, i) return math.abs(v) + math.abs(0.25 * grads[i]) end), "sgd")
    end)
  end)
end

before_each(global_state.save)
after_each(global_state.restore)

describe("16-bit errors", function()
  it("integer tensors in float-only ops name the dtype", function()
    local ok, err = pcall(function() return ms.ones(2, 2, {dtype = "i32"}):softmax(1) end)
    assert.is_false(ok)
    assert.is_truthy(err:find("i32", 1, true) and err:find("f32, f64, bf16 or f16", 1, true), err)
  end)
end)
