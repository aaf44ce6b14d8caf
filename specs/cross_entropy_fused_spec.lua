-- cross_entropy fused with its log_softmax (ms_cross_entropy): bit for bit the numbers of
-- log_softmax followed by nll_loss, forward and backward, f32 and f64, every reduction, with
-- ignored rows and the [N, C, d] layout; finite differences in f64; no [N, C] tensor made in
-- the forward; the C entry points' checks.
local ffi = require "ffi"
local ms = require "moonshard"
local C = require "moonshard.ffi"
local gradcheck = require "support.gradcheck"
local F = ms.nn.F
local lib = C.lib

local function targets(values) return ms.tensor(values, {dtype = "i64"}) end

-- logits of shape with values spread over [-6, 6) (large enough that rows differ a lot).
local function logits(shape, dtype, seed)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return ms.tensor(gradcheck.values(n, -6, 6, seed), {dtype = dtype}):view(shape)
end

-- The loss and input gradient of fn(x) (backward of g, or of 1 for a 0-dim loss).
local function run(fn, x, g)
  local leaf = x:detach():requires_grad_()
  local loss = fn(leaf)
  loss:backward(g)
  return loss, leaf.grad
end

describe("fused cross_entropy", function()
  for _, dtype in ipairs({"f32", "f64"}) do
    for _, reduction in ipairs({"mean", "sum", "none"}) do
      it(dtype .. " reduction " .. reduction .. " equals log_softmax + nll_loss bit for bit", function()
        local x = logits({9, 13}, dtype, 7)
        assert.equal(dtype, x:dtype())
        local t = targets({3, -100, 0, 12, 5, 5, -100, 1, 9})
        local g = reduction == "none" and ms.tensor(gradcheck.values(9, -2, 2, 3), {dtype = dtype}) or nil
        local fused_loss, fused_grad = run(function(v) return F.cross_entropy(v, t, {reduction = reduction}) end, x, g)
        local loss, grad = run(function(v)
          return F.nll_loss(F.log_softmax(v, 1), t, {reduction = reduction})
        end, x, g)
        assert.is_true(ms.equal(fused_loss, loss))
        assert.is_true(ms.equal(fused_grad, grad))
        -- and the numbers are cross-entropy's: -log softmax at the target, mean over the kept rows
        if reduction == "mean" then
          local rows, total = x:table(), 0
          for i, target in ipairs({3, -100, 0, 12, 5, 5, -100, 1, 9}) do
            if target >= 0 then
              local sum = 0
              for _, v in ipairs(rows[i]) do sum = sum + math.exp(v) end
              total = total + math.log(sum) - rows[i][target + 1]
            end
          end
          local tolerance = dtype == "f64" and 1e-12 or 1e-5
          assert.is_true(math.abs(fused_loss:item() - total / 7) <= tolerance * math.abs(total / 7))
        end
      end)
    end
  end

  it("equals the composition in the [N, C, d] layout and ignores rows of ignore_index", function()
    local x = logits({2, 5, 3}, "f32", 11)
    local t = ms.tensor({{4, 0, 2}, {1, 3, 3}}, {dtype = "i64"})
    local a_loss, a_grad = run(function(v) return F.cross_entropy(v, t, {ignore_index = 3}) end, x)
    local b_loss, b_grad = run(function(v) return F.nll_loss(F.log_softmax(v, 1), t, {ignore_index = 3}) end, x)
    assert.is_true(ms.equal(a_loss, b_loss))
    assert.is_true(ms.equal(a_grad, b_grad))
    local grads = a_grad:table()
    for c = 1, 5 do assert.equal(0, grads[2][c][2]) end -- row (1, 1) has target 3: ignored
  end)

  it("matches finite differences in f64 (mean over [N, C, d] with an ignored row)", function()
    local ok, message = gradcheck.check(function(v)
      return F.cross_entropy(v, ms.tensor({{1, 0}, {2, -100}}, {dtype = "i64"}))
    end, {gradcheck.input({2, 3, 2}, {seed = 5, low = -2, high = 2})})
    assert.is_true(ok, message)
  end)

  it("makes no [N, C] tensor in the forward", function()
    local rows, classes = 64, 1024
    local x = logits({rows, classes}, "f32", 2)
    local t = ms.zeros(rows, {dtype = "i64"})
    collectgarbage()
    local base = ms.memory_stats("cpu").allocated
    ms.reset_peak_memory_stats("cpu")
    ms.no_grad(function() F.cross_entropy(x, t):free() end)
    local fused_peak = ms.memory_stats("cpu").peak - base
    ms.reset_peak_memory_stats("cpu")
    ms.no_grad(function() F.nll_loss(F.log_softmax(x, 1), t):free() end)
    local composed_peak = ms.memory_stats("cpu").peak - base
    assert.is_true(fused_peak < rows * classes * 4 / 8, "fused peak " .. fused_peak)
    assert.is_true(composed_peak >= rows * classes * 4)
  end)

  describe("ms_cross_entropy", function()
    local function status_of(fn)
      local status = fn()
      return status, ffi.string(lib.ms_last_error())
    end

    it("names a stats tensor of the wrong shape and a target out of range", function()
      local x, t = ms.randn(4, 3), targets({0, 1, 2, 1})
      local out, bad_stats = ms.empty({}), ms.empty(4, 3)
      local status, message = status_of(function()
        return lib.ms_cross_entropy(out._c, bad_stats._c, x._c, t._c, -100, 1)
      end)
      assert.equal(lib.MS_ERR_SHAPE, status)
      assert.matches("cross_entropy: stats", message)
      local stats = ms.empty(4, 2)
      status, message = status_of(function()
        return lib.ms_cross_entropy(out._c, stats._c, x._c, targets({0, 3, 2, 1})._c, -100, 1)
      end)
      assert.equal(lib.MS_ERR_INDEX, status)
      assert.matches("cross_entropy: target 3 at row 1 is outside %[0, 3%)", message)
      status, message = status_of(function()
        return lib.ms_cross_entropy(out._c, stats._c, x._c, t._c, -100, 7)
      end)
      assert.equal(lib.MS_ERR_INVALID, status)
      assert.matches("reduction 7", message)
    end)

    it("names a dlogits of another shape in the backward", function()
      local x, t, dout = ms.randn(4, 3), targets({0, 1, 2, 1}), ms.ones({})
      local stats, out = ms.empty(4, 2), ms.empty({})
      assert.equal(0, lib.ms_cross_entropy(out._c, stats._c, x._c, t._c, -100, 1))
      local status, message = status_of(function()
        return lib.ms_cross_entropy_backward(ms.empty(4, 4)._c, dout._c, x._c, stats._c, t._c, -100, 1)
      end)
      assert.equal(lib.MS_ERR_SHAPE, status)
      assert.matches("cross_entropy_backward: shapes %[4, 4%] %(dlogits%)", message)
    end)
  end)
end)
