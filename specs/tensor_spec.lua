-- Tensors from Lua: constructors and shape forms, the seven dtypes and conversions between
-- them, views, element access and printing, comparisons, forward values and in-place ops.
local ffi = require "ffi"
local ms = require "moonshard"
local global_state = require "support.global_state"

local dtypes = {"f32", "f64", "bf16", "f16", "i32", "i64", "u8"}
local element_size = {f32 = 4, f64 = 8, bf16 = 2, f16 = 2, i32 = 4, i64 = 8, u8 = 1}

-- Flat row-major values of a tensor (a number for 0-dim).
local function flat(t)
  local out = {}
  local function walk(v)
    if type(v) == "number" then out[#out + 1] = v else for i = 1, #v do walk(v[i]) end end
  end
  walk(t:table())
  return out
end

local function close(a, b, tol) return math.abs(a - b) <= (tol or 1e-6) end

before_each(global_state.save)
after_each(global_state.restore)

describe("tensor", function()
  describe("constructors", function()
    it("zeros makes a tensor of zeros of the given shape", function()
      local t = ms.zeros(2, 3)
      assert.are.same({2, 3}, t:shape())
      assert.are.same({{0, 0, 0}, {0, 0, 0}}, t:table())
    end)

    it("takes the shape as numbers or as one table: zeros(2, 3) == zeros({2, 3})", function()
      local a, b = ms.zeros(2, 3), ms.zeros({2, 3})
      assert.are.same(a:shape(), b:shape())
      assert.is_true(ms.equal(a, b))
      assert.is_true(a:shape() == b:shape())
    end)

    it("takes the options table last after numbers", function()
      local t = ms.ones(2, 2, {dtype = "f64"})
      assert.are.equal("f64", t:dtype())
      assert.are.same({{1, 1}, {1, 1}}, t:table())
    end)

    it("takes the options table after a shape table", function()
      local t = ms.ones({2, 2}, {dtype = "f64", device = "cpu"})
      assert.are.equal("f64", t:dtype())
      assert.are.equal("cpu", t:device())
      assert.are.same({2, 2}, t:shape())
    end)

    it("full fills with the value", function()
      assert.are.same({{1.5, 1.5, 1.5}, {1.5, 1.5, 1.5}}, ms.full({2, 3}, 1.5):table())
    end)

    it("full takes options", function()
      local t = ms.full({2}, -3, {dtype = "i32"})
      assert.are.equal("i32", t:dtype())
      assert.are.same({-3, -3}, t:table())
    end)

    it("empty has the shape and dtype asked for", function()
      local t = ms.empty(4, 5, {dtype = "i64"})
      assert.are.same({4, 5}, t:shape())
      assert.are.equal("i64", t:dtype())
      assert.are.equal(20, t:numel())
    end)

    it("makes 0-dim tensors from an empty shape", function()
      local t = ms.zeros({})
      assert.are.equal(0, t:dim())
      assert.are.equal(1, t:numel())
      assert.are.equal(0, t:item())
    end)

    it("makes tensors with a zero-size dim", function()
      local t = ms.zeros(0, 3)
      assert.are.same({0, 3}, t:shape())
      assert.are.equal(0, t:numel())
      assert.are.same({}, t:table())
    end)

    it("arange(stop) counts from zero", function()
      assert.are.same({0, 1, 2, 3, 4}, ms.arange(5):table())
    end)

    it("arange(start, stop, step) stops before stop", function()
      assert.are.same({2, 4, 6}, ms.arange(2, 8, 2):table())
      assert.are.same({0, 0.25, 0.5, 0.75}, ms.arange(0, 1, 0.25):table())
    end)

    it("arange counts down with a negative step", function()
      assert.are.same({3, 2, 1}, ms.arange(3, 0, -1):table())
    end)

    it("arange takes options", function()
      local t = ms.arange(3, {dtype = "i64"})
      assert.are.equal("i64", t:dtype())
      assert.are.same({0, 1, 2}, t:table())
    end)

    it("tensor builds from nested tables", function()
      local t = ms.tensor({{1, 2, 3}, {4, 5, 6}})
      assert.are.same({2, 3}, t:shape())
      assert.are.same({{1, 2, 3}, {4, 5, 6}}, t:table())
    end)

    it("tensor builds a 0-dim tensor from a number", function()
      local t = ms.tensor(2.5)
      assert.are.equal(0, t:dim())
      assert.are.equal(2.5, t:item())
    end)

    it("tensor turns booleans into ones and zeros", function()
      assert.are.same({1, 0, 1}, ms.tensor({true, false, true}, {dtype = "u8"}):table())
    end)

    it("tensor takes a dtype", function()
      local t = ms.tensor({1, 2}, {dtype = "i64"})
      assert.are.equal("i64", t:dtype())
      assert.are.same({1, 2}, t:table())
    end)

    it("tensor leaves its options table unchanged", function()
      local opts = {dtype = "f64"}
      ms.tensor(1, opts)
      local t = ms.tensor({1, 2}, opts)
      assert.are.same({2}, t:shape())
      assert.are.same({dtype = "f64"}, opts)
    end)

    it("uses f32 by default", function()
      assert.are.equal("f32", ms.zeros(2):dtype())
      assert.are.equal("f32", ms.tensor({1}):dtype())
    end)

    it("set_default_dtype changes the dtype of new floating tensors", function()
      local previous = ms.get_default_dtype()
      ms.set_default_dtype("f64")
      local ok, dtype = pcall(function() return ms.zeros(2):dtype() end)
      ms.set_default_dtype(previous)
      assert.is_true(ok)
      assert.are.equal("f64", dtype)
    end)

    it("requires_grad in the options makes a leaf that requires grad", function()
      local t = ms.randn(3, {requires_grad = true})
      assert.is_true(t.requires_grad)
      assert.is_true(t:is_leaf())
    end)

    it("zeros_like, ones_like, full_like and empty_like copy shape and dtype", function()
      local t = ms.empty(2, 3, {dtype = "f64"})
      for _, made in ipairs({ms.zeros_like(t), ms.ones_like(t), ms.full_like(t, 7), ms.empty_like(t)}) do
        assert.are.same({2, 3}, made:shape())
        assert.are.equal("f64", made:dtype())
      end
      assert.are.same({0, 0, 0}, ms.zeros_like(t):table()[2])
      assert.are.same({1, 1, 1}, ms.ones_like(t):table()[1])
      assert.are.same({7, 7, 7}, ms.full_like(t, 7):table()[1])
    end)

    it("rand draws from [0, 1)", function()
      ms.manual_seed(0)
      local values = flat(ms.rand(1000, {dtype = "f64"}))
      local low, high, sum = math.huge, -math.huge, 0
      for _, v in ipairs(values) do
        low, high, sum = math.min(low, v), math.max(high, v), sum + v
      end
      assert.is_true(low >= 0 and high < 1)
      assert.is_true(close(sum / 1000, 0.5, 0.05))
    end)

    it("randn draws with mean 0 and variance 1", function()
      ms.manual_seed(0)
      local values = flat(ms.randn(4000, {dtype = "f64"}))
      local sum, squares = 0, 0
      for _, v in ipairs(values) do sum, squares = sum + v, squares + v * v end
      local mean = sum / #values
      assert.is_true(close(mean, 0, 0.1))
      assert.is_true(close(squares / #values - mean * mean, 1, 0.1))
    end)

    it("randn takes the shape forms", function()
      assert.are.same({2, 3}, ms.randn(2, 3):shape())
      assert.are.same({2, 3}, ms.randn({2, 3}):shape())
      assert.are.same({2, 3}, ms.rand({2, 3}, {dtype = "f64"}):shape())
    end)

    it("manual_seed replays the same draws", function()
      ms.manual_seed(42)
      local a = ms.randn(5)
      ms.manual_seed(42)
      local b = ms.randn(5)
      assert.is_true(ms.equal(a, b))
    end)

    it("successive draws differ", function()
      ms.manual_seed(42)
      local a, b = ms.randn(5), ms.randn(5)
      assert.is_false(ms.equal(a, b))
    end)

    it("set_rng_state replays from a state taken with get_rng_state", function()
      ms.manual_seed(1)
      ms.rand(3)
      local state = ms.get_rng_state()
      local a = ms.rand(4)
      ms.set_rng_state(state)
      assert.is_true(ms.equal(a, ms.rand(4)))
    end)

    it("randint draws integers in [low, high) as i64", function()
      ms.manual_seed(5)
      local t = ms.randint(2, 6, {3, 40})
      assert.are.equal("i64", t:dtype())
      assert.are.same({3, 40}, t:shape())
      local seen = {}
      for _, v in ipairs(flat(t)) do
        assert.is_true(v >= 2 and v < 6 and v % 1 == 0)
        seen[v] = true
      end
      assert.is_true(seen[2] and seen[3] and seen[4] and seen[5])
    end)
  end)

  describe("metadata", function()
    it("reports shape, size, dim and numel", function()
      local t = ms.zeros(2, 3, 4)
      assert.are.same({2, 3, 4}, t:shape())
      assert.are.same({2, 3, 4}, t:size())
      assert.are.equal(3, t:size(1))
      assert.are.equal(4, t:size(-1))
      assert.are.equal(3, t:dim())
      assert.are.equal(24, t:numel())
    end)

    it("reports row-major strides in elements", function()
      assert.are.same({12, 4, 1}, ms.zeros(2, 3, 4):stride())
      assert.are.equal(4, ms.zeros(2, 3, 4):stride(1))
    end)

    it("reports dtype, device and nbytes", function()
      local t = ms.zeros(3, 5, {dtype = "f64"})
      assert.are.equal("f64", t:dtype())
      assert.are.equal("cpu", t:device())
      assert.are.equal(3 * 5 * 8, t:nbytes())
    end)

    it("shapes compare with ==", function()
      assert.is_true(ms.zeros(2, 3):shape() == ms.ones(2, 3):shape())
      assert.is_false(ms.zeros(2, 3):shape() == ms.ones(3, 2):shape())
      assert.are.equal("[2, 3]", tostring(ms.zeros(2, 3):shape()))
    end)

    it("a fresh tensor is contiguous and a leaf", function()
      local t = ms.zeros(2, 3)
      assert.is_true(t:is_contiguous())
      assert.is_true(t:is_leaf())
      assert.is_falsy(t.requires_grad)
    end)
  end)

  describe("integer tensors and numbers, promoted as PyTorch promotes", function()
    -- PyTorch 2.15: torch.tensor([1, 2, 3]) * 2.5 -> [2.5, 5., 7.5] (float), + 0.5 -> [1.5, 2.5,
    -- 3.5], .eq(2.5) -> all False, maximum with 1.5 -> [1.5, 2., 3.], / 2 -> [0.5, 1., 1.5]
    it("computes in the default float dtype with a number that is not whole, or in a division", function()
      local a = ms.tensor({1, 2, 3}, {dtype = "i64"})
      local product = a * 2.5
      assert.are.equal("f32", product:dtype())
      assert.are.same({2.5, 5, 7.5}, product:table())
      assert.are.same({1.5, 2.5, 3.5}, (a + 0.5):table())
      assert.are.same({0, 0, 0}, a:eq(2.5):table())
      assert.are.same({1.5, 2, 3}, ms.maximum(a, 1.5):table())
      assert.are.same({0.5, 1, 1.5}, (a / 2):table())
      assert.are.same({0.5, 1, 1.5}, (ms.tensor({1, 2, 3}, {dtype = "i32"}) / ms.tensor({2, 2, 2}, {dtype = "i32"})):table())
    end)

    it("stays integer with a whole number", function()
      local a = ms.tensor({1, 2, 3}, {dtype = "i64"})
      assert.are.equal("i64", (a * 2):dtype())
      assert.are.same({2, 4, 6}, (a * 2):table())
      assert.are.same({0, 1, 0}, a:eq(2):table())
    end)
  end)

  describe("dtypes", function()
    for _, dtype in ipairs(dtypes) do
      it("makes " .. dtype .. " tensors of " .. element_size[dtype] .. " bytes per element", function()
        local t = ms.zeros(3, 7, {dtype = dtype})
        assert.are.equal(dtype, t:dtype())
        assert.are.equal(21 * element_size[dtype], t:nbytes())
      end)

      it("holds small integers exactly in " .. dtype, function()
        local values = {0, 1, 2, 7, 100, 255}
        assert.are.same(values, ms.tensor(values, {dtype = dtype}):table())
      end)

      it("fills " .. dtype .. " tensors", function()
        assert.are.same({3, 3}, ms.full({2}, 3, {dtype = dtype}):table())
      end)

      for _, target in ipairs(dtypes) do
        it("converts " .. dtype .. " to " .. target .. " keeping small integers", function()
          local values = {0, 1, 2, 7, 100, 255}
          local converted = ms.tensor(values, {dtype = dtype}):to(target)
          assert.are.equal(target, converted:dtype())
          assert.are.same(values, converted:table())
        end)
      end
    end

    it("holds negative integers in every signed dtype", function()
      for _, dtype in ipairs({"f32", "f64", "bf16", "f16", "i32", "i64"}) do
        assert.are.same({-1, -128, -3}, ms.tensor({-1, -128, -3}, {dtype = dtype}):table())
      end
    end)

    it("rounds f64 to the nearest f32", function()
      local expected = tonumber(ffi.new("float", 0.1))
      assert.are_not.equal(0.1, expected)
      assert.are.equal(expected, ms.tensor({0.1}, {dtype = "f64"}):to("f32"):item())
    end)

    it("rounds to the nearest bf16 (8 significant bits)", function()
      local values = {1 + 2 ^ -7, 1 + 3 * 2 ^ -9, 1 + 2 ^ -9, -(2 + 2 ^ -6)}
      local expected = {1 + 2 ^ -7, 1 + 2 ^ -7, 1, -(2 + 2 ^ -6)}
      assert.are.same(expected, ms.tensor(values, {dtype = "f32"}):to("bf16"):table())
    end)

    it("rounds bf16 halfway cases to even", function()
      local values = {1 + 2 ^ -8, 1 + 3 * 2 ^ -8}
      assert.are.same({1, 1 + 2 ^ -6}, ms.tensor(values, {dtype = "f64"}):to("bf16"):table())
    end)

    it("rounds to the nearest f16 (11 significant bits)", function()
      local values = {1 + 2 ^ -10, 1 + 3 * 2 ^ -12, 1 + 2 ^ -12, 65504, 2 ^ -24}
      local expected = {1 + 2 ^ -10, 1 + 2 ^ -10, 1, 65504, 2 ^ -24}
      assert.are.same(expected, ms.tensor(values, {dtype = "f64"}):to("f16"):table())
    end)

    it("rounds f16 halfway cases to even", function()
      local values = {1 + 2 ^ -11, 1 + 3 * 2 ^ -11}
      assert.are.same({1, 1 + 2 ^ -9}, ms.tensor(values, {dtype = "f32"}):to("f16"):table())
    end)

    it("turns values beyond the f16 range into infinities", function()
      assert.are.same({math.huge, -math.huge}, ms.tensor({1e5, -1e5}, {dtype = "f32"}):to("f16"):table())
    end)

    it("truncates floating values toward zero when converting to integers", function()
      for _, dtype in ipairs({"i32", "i64"}) do
        assert.are.same({2, -2, 0}, ms.tensor({2.7, -2.7, 0.5}, {dtype = "f64"}):to(dtype):table())
      end
      assert.are.same({200, 3}, ms.tensor({200.5, 3.9}, {dtype = "f32"}):to("u8"):table())
    end)

    it("holds large i64 values exactly", function()
      local big = 2 ^ 40 + 3
      assert.are.equal(big, ms.tensor({big}, {dtype = "i64"}):item())
      assert.are.equal(big, ms.tensor({big}, {dtype = "i64"}):to("f64"):item())
    end)

    it("accepts PyTorch's dtype names", function()
      local aliases = {float32 = "f32", float = "f32", float64 = "f64", double = "f64",
                       bfloat16 = "bf16", float16 = "f16", half = "f16", int32 = "i32",
                       int64 = "i64", long = "i64", uint8 = "u8"}
      for alias, dtype in pairs(aliases) do
        assert.are.equal(dtype, ms.zeros(1, {dtype = alias}):dtype())
      end
    end)

    it("float() and double() convert", function()
      local t = ms.tensor({1.5}, {dtype = "f64"})
      assert.are.equal("f32", t:float():dtype())
      assert.are.equal("f64", t:float():double():dtype())
      assert.are.equal(1.5, t:float():item())
    end)

    it("to() with the dtype a tensor already has returns the tensor itself", function()
      local t = ms.zeros(2)
      assert.is_true(rawequal(t, t:to("f32")))
    end)

    it("to() makes a new storage: writing the copy leaves the source", function()
      local t = ms.zeros(2, {dtype = "f32"})
      local copy = t:to("f64")
      copy:fill_(5)
      assert.are.same({0, 0}, t:table())
    end)

    it("to() moves tensors to the host pool and back", function()
      local t = ms.tensor({1, 2, 3})
      local on_host = t:to("host")
      assert.are.equal("host", on_host:device())
      assert.are.equal("f32", on_host:dtype())
      assert.are.same({1, 2, 3}, on_host:table())
      assert.are.equal("cpu", on_host:to("cpu"):device())
    end)

    it("to() takes dtype and device together", function()
      local t = ms.tensor({1, 2}):to({dtype = "f64", device = "host"})
      assert.are.equal("f64", t:dtype())
      assert.are.equal("host", t:device())
      assert.are.same({1, 2}, t:table())
    end)

    it("creates tensors in the host pool", function()
      local t = ms.ones(3, {device = "host"})
      assert.are.equal("host", t:device())
      assert.are.same({1, 1, 1}, t:table())
    end)
  end)

  describe("views", function()
    it("view reshapes without copying", function()
      local base = ms.zeros(2, 3)
      local v = base:view(6)
      assert.are.same({6}, v:shape())
      v:fill_(2)
      assert.are.same({{2, 2, 2}, {2, 2, 2}}, base:table())
    end)

    it("view infers one -1 size", function()
      assert.are.same({3, 2}, ms.zeros(6):view(3, -1):shape())
      assert.are.same({2, 3}, ms.zeros(6):view({-1, 3}):shape())
    end)

    it("view keeps the row-major order of values", function()
      assert.are.same({{0, 1, 2}, {3, 4, 5}}, ms.arange(6):view(2, 3):table())
    end)

    it("view to an empty shape gives a 0-dim tensor", function()
      local t = ms.tensor({4}):view({})
      assert.are.equal(0, t:dim())
      assert.are.equal(4, t:item())
    end)

    it("reshape of a contiguous tensor shares its storage", function()
      local base = ms.zeros(2, 3)
      base:reshape(3, 2):fill_(1)
      assert.are.same({1, 1, 1}, base:table()[1])
    end)

    it("reshape of a non-contiguous tensor copies in logical order", function()
      local base = ms.arange(6):view(2, 3)
      local flat_t = base:t():reshape(6)
      assert.are.same({0, 3, 1, 4, 2, 5}, flat_t:table())
      flat_t:fill_(9)
      assert.are.same({{0, 1, 2}, {3, 4, 5}}, base:table())
    end)

    it("view of a non-contiguous tensor shares storage where its layout allows (PyTorch's rule)", function()
      local base = ms.arange(24):view(2, 12)
      local heads = base:narrow(1, 4, 8):view(2, 2, 4)
      assert.are.same({12, 4, 1}, heads:stride())
      local values = heads:table()
      for i = 0, 1 do
        for j = 0, 1 do
          for k = 0, 3 do assert.are.equal(i * 12 + 4 + 4 * j + k, values[i + 1][j + 1][k + 1]) end
        end
      end
      heads:fill_(-1)
      assert.are.same({0, 1, 2, 3, -1, -1, -1, -1, -1, -1, -1, -1}, base:table()[1])
      local columns = ms.arange(6):view(2, 3):t():view(3, 1, 2)
      assert.are.same({{{0, 3}}, {{1, 4}}, {{2, 5}}}, columns:table())
    end)

    it("reshape of a viewable non-contiguous tensor shares storage; its gradient lands in place", function()
      local x = ms.zeros(2, 12):requires_grad_(true)
      local heads = x:narrow(1, 4, 8):reshape(2, 2, 4)
      local w = ms.arange(16):view(2, 2, 4):to("f32")
      local loss = (heads * w):sum()
      loss:backward()
      local grad = x.grad:table()
      for i = 0, 1 do
        for c = 0, 11 do
          local expect = c >= 4 and i * 8 + (c - 4) or 0
          assert.are.equal(expect, grad[i + 1][c + 1])
        end
      end
      heads:detach():fill_(5)
      assert.are.same({0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5}, x:detach():table()[2])
    end)

    it("flatten merges a range of dims", function()
      local t = ms.zeros(2, 3, 4)
      assert.are.same({24}, t:flatten():shape())
      assert.are.same({2, 12}, t:flatten(1):shape())
      assert.are.same({6, 4}, t:flatten(0, 1):shape())
    end)

    it("transpose swaps two dims and their strides", function()
      local t = ms.arange(6):view(2, 3):transpose(0, 1)
      assert.are.same({3, 2}, t:shape())
      assert.are.same({1, 3}, t:stride())
      assert.is_false(t:is_contiguous())
      assert.are.same({{0, 3}, {1, 4}, {2, 5}}, t:table())
    end)

    it("t transposes a matrix and leaves a vector alone", function()
      assert.are.same({{0, 2}, {1, 3}}, ms.arange(4):view(2, 2):t():table())
      assert.are.same({3}, ms.zeros(3):t():shape())
    end)

    it("permute reorders dims", function()
      local base = ms.arange(24):view(2, 3, 4)
      local p = base:permute(2, 0, 1)
      assert.are.same({4, 2, 3}, p:shape())
      local values = p:table()
      for k = 0, 3 do
        for i = 0, 1 do
          for j = 0, 2 do
            assert.are.equal(i * 12 + j * 4 + k, values[k + 1][i + 1][j + 1])
          end
        end
      end
    end)

    it("permute takes a table and negative dims", function()
      assert.are.same({4, 3, 2}, ms.zeros(2, 3, 4):permute({-1, 1, 0}):shape())
    end)

    it("narrow takes a slice of a dim without copying", function()
      local base = ms.arange(10)
      local slice = base:narrow(0, 2, 3)
      assert.are.same({2, 3, 4}, slice:table())
      slice:fill_(-1)
      assert.are.same({0, 1, -1, -1, -1, 5, 6, 7, 8, 9}, base:table())
    end)

    it("narrow works on inner dims", function()
      assert.are.same({{1, 2}, {5, 6}}, ms.arange(8):view(2, 4):narrow(1, 1, 2):table())
    end)

    it("select drops the dim it indexes", function()
      local base = ms.arange(6):view(2, 3)
      assert.are.same({2, 5}, base:select(1, 2):table())
      assert.are.same({3, 4, 5}, base:select(0, -1):table())
      assert.are.equal(1, base:select(0, 0):dim())
    end)

    it("select on a vector gives a 0-dim tensor", function()
      local t = ms.arange(4):select(0, 2)
      assert.are.equal(0, t:dim())
      assert.are.equal(2, t:item())
    end)

    it("squeeze drops every dim of size 1", function()
      assert.are.same({3}, ms.zeros(1, 3, 1):squeeze():shape())
    end)

    it("squeeze(dim) drops only that dim, and only when it has size 1", function()
      assert.are.same({3, 1}, ms.zeros(1, 3, 1):squeeze(0):shape())
      assert.are.same({1, 3}, ms.zeros(1, 3, 1):squeeze(-1):shape())
      assert.are.same({1, 3, 1}, ms.zeros(1, 3, 1):squeeze(1):shape())
    end)

    it("unsqueeze inserts a dim of size 1", function()
      local t = ms.zeros(2, 3)
      assert.are.same({1, 2, 3}, t:unsqueeze(0):shape())
      assert.are.same({2, 1, 3}, t:unsqueeze(1):shape())
      assert.are.same({2, 3, 1}, t:unsqueeze(2):shape())
      assert.are.same({2, 3, 1}, t:unsqueeze(-1):shape())
      assert.are.same({2, 1, 3}, t:unsqueeze(-2):shape())
    end)

    it("expand repeats dims of size 1 with stride 0", function()
      local t = ms.tensor({{1}, {2}}):expand(2, 3)
      assert.are.same({{1, 1, 1}, {2, 2, 2}}, t:table())
      assert.are.equal(0, t:stride(1))
    end)

    it("expand keeps -1 dims and adds leading dims", function()
      local t = ms.tensor({1, 2}):expand({3, -1})
      assert.are.same({{1, 2}, {1, 2}, {1, 2}}, t:table())
    end)

    it("expand_as takes the other tensor's shape", function()
      assert.are.same({4, 2}, ms.zeros(1, 2):expand_as(ms.zeros(4, 2)):shape())
    end)

    it("contiguous copies a non-contiguous tensor into row-major order", function()
      local t = ms.arange(6):view(2, 3):t():contiguous()
      assert.is_true(t:is_contiguous())
      assert.are.same({{0, 3}, {1, 4}, {2, 5}}, t:table())
    end)

    it("contiguous of a contiguous tensor is the tensor itself", function()
      local t = ms.zeros(3)
      assert.is_true(rawequal(t, t:contiguous()))
    end)

    it("clone makes an independent copy", function()
      local base = ms.tensor({1, 2})
      local copy = base:clone()
      copy:fill_(0)
      assert.are.same({1, 2}, base:table())
    end)

    it("detach shares storage and leaves the graph", function()
      local x = ms.tensor({1, 2}, {requires_grad = true})
      local d = (x * 2):detach()
      assert.is_falsy(d.requires_grad)
      assert.is_nil(d.grad_fn)
      assert.are.same({2, 4}, d:table())
    end)

    it("views of views compose", function()
      local t = ms.arange(12):view(3, 4):t():narrow(0, 1, 2):select(1, 2)
      assert.are.same({9, 10}, t:table())
    end)

    it("cat joins along dim 0 by default", function()
      local t = ms.cat({ms.tensor({{1, 2}}), ms.tensor({{3, 4}, {5, 6}})})
      assert.are.same({{1, 2}, {3, 4}, {5, 6}}, t:table())
    end)

    it("cat joins along an inner or negative dim", function()
      local a, b = ms.tensor({{1}, {2}}), ms.tensor({{3, 4}, {5, 6}})
      assert.are.same({{1, 3, 4}, {2, 5, 6}}, ms.cat({a, b}, 1):table())
      assert.are.same({{1, 3, 4}, {2, 5, 6}}, ms.cat({a, b}, -1):table())
    end)

    it("cat takes non-contiguous inputs", function()
      local a = ms.arange(4):view(2, 2):t()
      assert.are.same({{0, 2, 0, 2}, {1, 3, 1, 3}}, ms.cat({a, a}, 1):table())
    end)

    it("stack adds a new dim", function()
      local a, b = ms.tensor({1, 2}), ms.tensor({3, 4})
      assert.are.same({{1, 2}, {3, 4}}, ms.stack({a, b}):table())
      assert.are.same({{1, 3}, {2, 4}}, ms.stack({a, b}, 1):table())
      assert.are.same({{1, 3}, {2, 4}}, ms.stack({a, b}, -1):table())
    end)

    it("split by a size leaves a shorter last piece", function()
      local parts = ms.arange(5):split(2)
      assert.are.equal(3, #parts)
      assert.are.same({0, 1}, parts[1]:table())
      assert.are.same({2, 3}, parts[2]:table())
      assert.are.same({4}, parts[3]:table())
    end)

    it("split and chunk of an empty dim give one empty piece, as PyTorch", function()
      local pieces = ms.ones(0):chunk(2)
      assert.are.equal(1, #pieces)
      assert.are.same({0}, pieces[1]:shape())
      assert.are.equal(1, #ms.ones(0, 3):split(2))
    end)

    it("split by a table of sizes", function()
      local parts = ms.arange(6):view(2, 3):split({1, 2}, 1)
      assert.are.same({{0}, {3}}, parts[1]:table())
      assert.are.same({{1, 2}, {4, 5}}, parts[2]:table())
    end)

    it("split pieces are views of the source", function()
      local base = ms.zeros(4)
      base:split(2)[2]:fill_(1)
      assert.are.same({0, 0, 1, 1}, base:table())
    end)

    it("split's gradient places each piece's gradient, zeros for a piece that got none", function()
      local x = ms.zeros(2, 7):requires_grad_(true)
      local parts = x:split({2, 0, 3, 2}, 1)
      local loss = (parts[1] * 2):sum() + (parts[3] * ms.tensor({{1, 2, 3}, {4, 5, 6}})):sum()
      loss:backward()
      assert.are.same({{2, 2, 1, 2, 3, 0, 0}, {2, 2, 4, 5, 6, 0, 0}}, x.grad:table())
      -- a second backward through the same pieces adds the same again
      local y = ms.ones(6):requires_grad_(true)
      local a, b = unpack(y:split(3))
      local total = (a * 3):sum() + (b * 5):sum()
      total:backward({retain_graph = true})
      total:backward()
      assert.are.same({6, 6, 6, 10, 10, 10}, y.grad:table())
    end)

    it("split drops a piece's gradient left by a backward that failed before split's own node ran", function()
      local x = ms.zeros(4):requires_grad_(true)
      local a, b = unpack(x:split(2))
      local hook = a:register_hook(function() error("boom") end)
      local loss = (a * 2):sum() + (b * 5):sum() -- b's gradient is handed over, then a's hook fails
      assert.has_error(function() loss:backward() end)
      assert.is_nil(x.grad)
      hook.remove()
      local again = (a * 3):sum()
      again:backward()
      assert.are.same({3, 3, 0, 0}, x.grad:table())
    end)

    it("a hook on one split piece sees that piece's gradient and can replace it", function()
      local x = ms.zeros(4):requires_grad_(true)
      local a, b = unpack(x:split(2))
      local seen
      a:register_hook(function(g) seen = g:table(); return g * 10 end)
      local loss = (a * ms.tensor({1, 2})):sum() + (b * ms.tensor({3, 4})):sum()
      loss:backward()
      assert.are.same({1, 2}, seen)
      assert.are.same({10, 20, 3, 4}, x.grad:table())
    end)

    it("chunk splits into at most n pieces like torch.chunk", function()
      local sizes = function(parts)
        local out = {}
        for i, p in ipairs(parts) do out[i] = p:numel() end
        return out
      end
      assert.are.same({2, 2, 2}, sizes(ms.arange(6):chunk(3)))
      assert.are.same({3, 2}, sizes(ms.arange(5):chunk(2)))
      assert.are.same({2, 2, 2}, sizes(ms.arange(6):chunk(4)))
      assert.are.same({{0, 1}, {3, 4}}, ms.arange(6):view(2, 3):chunk(2, 1)[1]:table())
    end)
  end)

  describe("element access", function()
    it("table() returns nested arrays", function()
      assert.are.same({{{0, 1}}, {{2, 3}}}, ms.arange(4):view(2, 1, 2):table())
    end)

    it("table() of a 0-dim tensor is a number", function()
      assert.are.equal(3, ms.tensor(3):table())
    end)

    it("item() returns the one element", function()
      assert.are.equal(-2.5, ms.tensor({{-2.5}}):item())
      assert.are.equal(7, ms.tensor({7}, {dtype = "i64"}):item())
    end)

    it("tostring shows values, shape and dtype", function()
      local text = tostring(ms.tensor({{1.5, 2}}, {dtype = "f64"}))
      assert.is_truthy(text:find("^tensor%("))
      assert.is_truthy(text:find("1.5", 1, true))
      assert.is_truthy(text:find("[1, 2]", 1, true))
      assert.is_truthy(text:find("f64", 1, true))
    end)

    it("tostring prints integers without a fraction", function()
      local text = tostring(ms.tensor({3, 4}, {dtype = "i32"}))
      assert.is_truthy(text:find("3, 4", 1, true))
      assert.is_falsy(text:find("3.0", 1, true))
    end)

    it("tostring mentions requires_grad and grad_fn", function()
      local x = ms.ones(2, {requires_grad = true})
      assert.is_truthy(tostring(x):find("requires_grad", 1, true))
      assert.is_truthy(tostring(x * 2):find("grad_fn", 1, true))
    end)
  end)

  describe("equal and allclose", function()
    it("equal is true for the same shape, dtype and values", function()
      assert.is_true(ms.equal(ms.tensor({1, 2}), ms.tensor({1, 2})))
    end)

    it("equal is false when a value differs", function()
      assert.is_false(ms.equal(ms.tensor({1, 2}), ms.tensor({1, 3})))
    end)

    it("equal is false for different shapes", function()
      assert.is_false(ms.equal(ms.zeros(2, 3), ms.zeros(3, 2)))
    end)

    it("equal is false for different dtypes", function()
      assert.is_false(ms.equal(ms.zeros(2), ms.zeros(2, {dtype = "f64"})))
    end)

    it("equal compares views by their logical values", function()
      local a = ms.arange(4):view(2, 2):t()
      assert.is_true(ms.equal(a, ms.tensor({{0, 2}, {1, 3}})))
    end)

    it("allclose accepts differences within the default tolerance", function()
      local a = ms.tensor({1, 100}, {dtype = "f64"})
      assert.is_true(ms.allclose(a, ms.tensor({1 + 1e-9, 100 + 1e-4}, {dtype = "f64"})))
      assert.is_false(ms.allclose(a, ms.tensor({1 + 1e-4, 100}, {dtype = "f64"})))
    end)

    it("allclose honours rtol and atol", function()
      local a, b = ms.tensor({1}, {dtype = "f64"}), ms.tensor({1.1}, {dtype = "f64"})
      assert.is_true(ms.allclose(a, b, {atol = 0.2}))
      assert.is_true(ms.allclose(a, b, {rtol = 0.2}))
      assert.is_false(ms.allclose(a, b, {rtol = 0.01, atol = 0.01}))
    end)

    it("allclose never holds for NaN", function()
      local nan = ms.tensor({0 / 0}, {dtype = "f64"})
      assert.is_false(ms.allclose(nan, nan))
    end)

    it("allclose broadcasts the two shapes, as PyTorch's; shapes that do not broadcast raise", function()
      assert.is_true(ms.allclose(ms.ones(2, 3), ms.ones(3)))
      assert.is_false(ms.allclose(ms.ones(2, 3), ms.full({3}, 2)))
      local ok, err = pcall(ms.allclose, ms.zeros(2), ms.zeros(3))
      assert.is_false(ok)
      assert.matches("allclose: shapes %[2%] and %[3%] cannot be broadcast together", err)
    end)

    it("the mean of an empty tensor is NaN, as PyTorch's", function()
      local m = ms.zeros(0):mean()
      assert.is_true(m:item() ~= m:item())
      assert.are.equal(3, #ms.zeros(0, 3):mean(0):table())
    end)
  end)

  describe("forward values", function()
    local function a23() return ms.tensor({{1, -2, 3}, {-4, 5, -6}}, {dtype = "f64"}) end

    it("adds with broadcasting", function()
      local out = a23() + ms.tensor({10, 20, 30}, {dtype = "f64"})
      assert.are.same({{11, 18, 33}, {6, 25, 24}}, out:table())
    end)

    it("applies the operators with scalars on either side", function()
      local a = ms.tensor({2, 4}, {dtype = "f64"})
      assert.are.same({3, 5}, (a + 1):table())
      assert.are.same({-1, -3}, (1 - a):table())
      assert.are.same({6, 12}, (3 * a):table())
      assert.are.same({2, 1}, (4 / a):table())
      assert.are.same({4, 16}, (a ^ 2):table())
      assert.are.same({-2, -4}, (-a):table())
    end)

    it("matmul computes row-by-column sums", function()
      local a = a23()
      local b = ms.tensor({{1, 2}, {3, 4}, {5, 6}}, {dtype = "f64"})
      local av, bv = a:table(), b:table()
      local expected = {}
      for i = 1, 2 do
        expected[i] = {}
        for j = 1, 2 do
          local s = 0
          for k = 1, 3 do s = s + av[i][k] * bv[k][j] end
          expected[i][j] = s
        end
      end
      assert.are.same(expected, ms.matmul(a, b):table())
    end)

    it("linear computes x W^T + b", function()
      local x = ms.tensor({{1, 2}}, {dtype = "f64"})
      local w = ms.tensor({{1, 0}, {0, 1}, {1, 1}}, {dtype = "f64"})
      local b = ms.tensor({0.5, 0.5, 0.5}, {dtype = "f64"})
      assert.are.same({{1.5, 2.5, 3.5}}, ms.linear(x, w, b):table())
    end)

    it("sums and means over all or some dims", function()
      local a = a23()
      assert.are.equal(-3, a:sum():item())
      assert.are.same({-3, 3, -3}, a:sum(0):table())
      assert.are.same({{2}, {-5}}, a:sum(1, true):table())
      assert.are.equal(-0.5, a:mean():item())
      assert.are.same({-1.5, 1.5, -1.5}, a:mean(0):table())
    end)

    it("max and min give values and indices", function()
      local a = a23()
      assert.are.equal(5, a:max():item())
      assert.are.equal(-6, a:min():item())
      local values, indices = a:max(1)
      assert.are.same({3, 5}, values:table())
      assert.are.same({2, 1}, indices:table())
      assert.are.equal("i64", indices:dtype())
      local low, where = a:min(0, true)
      assert.are.same({{-4, -2, -6}}, low:table())
      assert.are.same({{1, 0, 1}}, where:table())
    end)

    it("element-wise functions follow their formulas", function()
      local values = {-1.5, -0.25, 0.5, 2}
      local x = ms.tensor(values, {dtype = "f64"})
      local formulas = {
        exp = math.exp, sin = math.sin, cos = math.cos, tanh = math.tanh,
        abs = math.abs, square = function(v) return v * v end,
        sigmoid = function(v) return 1 / (1 + math.exp(-v)) end,
        relu = function(v) return math.max(v, 0) end,
        gelu_tanh = function(v)
          return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ^ 3)))
        end,
      }
      for name, formula in pairs(formulas) do
        local got = flat(x[name](x))
        for i, v in ipairs(values) do
          assert.is_true(close(got[i], formula(v), 1e-12), name .. " at " .. v)
        end
      end
    end)

    it("gelu is x times the standard normal cdf", function()
      -- the cdf from integrating the normal density with Simpson's rule
      local function cdf(v)
        local n, low = 2000, -10
        local h = (v - low) / n
        local density = function(u) return math.exp(-u * u / 2) / math.sqrt(2 * math.pi) end
        local s = density(low) + density(v)
        for i = 1, n - 1 do s = s + (i % 2 == 1 and 4 or 2) * density(low + i * h) end
        return s * h / 3
      end
      local values = {-2, -0.5, 0.3, 1.7}
      local got = flat(ms.gelu(ms.tensor(values, {dtype = "f64"})))
      for i, v in ipairs(values) do assert.is_true(close(got[i], v * cdf(v), 1e-9)) end
    end)

    it("softmax rows are exp(x) over their sum", function()
      local values = {{1, 2, 3}, {-1, 0, 4}}
      local got = ms.tensor(values, {dtype = "f64"}):softmax(1):table()
      for i = 1, 2 do
        local total = 0
        for j = 1, 3 do total = total + math.exp(values[i][j]) end
        for j = 1, 3 do assert.is_true(close(got[i][j], math.exp(values[i][j]) / total, 1e-12)) end
      end
    end)

    it("comparisons give ones and zeros", function()
      local a, b = ms.tensor({1, 2, 3}), ms.tensor({3, 2, 1})
      assert.are.same({1, 0, 0}, ms.lt(a, b):table())
      assert.are.same({0, 1, 0}, ms.eq(a, b):table())
      assert.are.same({0, 1, 1}, ms.ge(a, 2):table())
    end)
  end)

  describe("in-place ops", function()
    it("fill_ and zero_ overwrite every element and return the tensor", function()
      local t = ms.empty(2, 2)
      assert.is_true(rawequal(t, t:fill_(4)))
      assert.are.same({{4, 4}, {4, 4}}, t:table())
      t:zero_()
      assert.are.same({{0, 0}, {0, 0}}, t:table())
    end)

    it("copy_ broadcasts and converts the source", function()
      local t = ms.zeros(2, 3)
      t:copy_(ms.tensor({1, 2, 3}, {dtype = "f64"}))
      assert.are.same({{1, 2, 3}, {1, 2, 3}}, t:table())
    end)

    it("add_ adds a tensor, a number, and a scaled tensor", function()
      local t = ms.tensor({1, 2})
      t:add_(ms.tensor({10, 20}))
      assert.are.same({11, 22}, t:table())
      t:add_(1)
      assert.are.same({12, 23}, t:table())
      t:add_(ms.tensor({1, 1}), -2)
      assert.are.same({10, 21}, t:table())
    end)

    it("sub_, mul_ and div_ update in place", function()
      local t = ms.tensor({8, 6})
      t:sub_(2)
      assert.are.same({6, 4}, t:table())
      t:mul_(ms.tensor({0.5, 2}))
      assert.are.same({3, 8}, t:table())
      t:div_(2)
      assert.are.same({1.5, 4}, t:table())
    end)

    it("clamp_ limits values to a range", function()
      local t = ms.tensor({-2, 0.5, 3})
      t:clamp_(-1, 1)
      assert.are.same({-1, 0.5, 1}, t:table())
    end)

    it("writes through views to the base tensor", function()
      local base = ms.zeros(2, 3)
      base:select(0, 1):add_(5)
      base:t():narrow(0, 0, 1):mul_(3)
      assert.are.same({{0, 0, 0}, {15, 5, 5}}, base:table())
    end)

    it("refuse a leaf that requires grad while grad mode is on", function()
      local x = ms.zeros(2, {requires_grad = true})
      local ok, err = pcall(function() x:add_(1) end)
      assert.is_false(ok)
      assert.is_truthy(err:find("^moonshard: add_:"))
    end)

    it("work on a leaf that requires grad under no_grad", function()
      local x = ms.zeros(2, {requires_grad = true})
      ms.no_grad(function() x:add_(1) end)
      assert.are.same({1, 1}, x:table())
      assert.is_true(x.requires_grad)
    end)
  end)
end)
