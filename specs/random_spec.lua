-- The random number generator: a counter-based stream (Philox4x32-10 keyed by the seed,
-- counter = offset + element), checked against a Philox written here in plain Lua.
local ffi = require "ffi"
local ms = require "moonshard"
local gradcheck = require "support.gradcheck"
local global_state = require "support.global_state"

local flat = gradcheck.flat
local TWO32 = 4294967296

-- 32x32 -> 64-bit product split into (high word, low word), exact through uint64 cdata.
local function mulhilo(a, b)
  local product = ffi.cast("uint64_t", a) * b
  return tonumber(product / 0x100000000ULL), tonumber(product % 0x100000000ULL)
end

local function xor32(...) return bit.bxor(...) % TWO32 end

-- Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
local function philox(counter, key)
  local c0, c1, c2, c3 = counter[1], counter[2], counter[3], counter[4]
  local k0, k1 = key[1], key[2]
  for _ = 1, 10 do
    local hi0, lo0 = mulhilo(0xD2511F53, c0)
    local hi1, lo1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = xor32(hi1, c1, k0), lo1, xor32(hi0, c3, k1), lo0
    k0, k1 = (k0 + 0x9E3779B9) % TWO32, (k1 + 0xBB67AE85) % TWO32
  end
  return {c0, c1, c2, c3}
end

-- The words of element `index` of stream `seed` (both below 2^32 here).
local function block(seed, index) return philox({index, 0, 0, 0}, {seed, 0}) end

-- What ms.rand gives for one block: 53 bits of two words in f64, the top 24 bits in f32.
local function uniform53(words) return (words[1] * 2 ^ 21 + math.floor(words[2] / 2 ^ 11)) * 2 ^ -53 end
local function uniform24(words) return math.floor(words[1] / 2 ^ 8) * 2 ^ -24 end

local function moments(values)
  local n, sum, squares = #values, 0, 0
  for _, v in ipairs(values) do sum, squares = sum + v, squares + v * v end
  local mean = sum / n
  return mean, squares / n - mean * mean
end

local function raises(name, fn)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  local prefix = "moonshard: " .. name .. ":"
  assert.are.equal(prefix, tostring(err):sub(1, #prefix), tostring(err))
end

before_each(global_state.save)
after_each(global_state.restore)

describe("random", function()
  describe("the Philox reference in this spec", function()
    it("reproduces the published known-answer vectors", function()
      assert.are.same({0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}, philox({0, 0, 0, 0}, {0, 0}))
      local ones = TWO32 - 1
      assert.are.same({0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
                      philox({ones, ones, ones, ones}, {ones, ones}))
      assert.are.same({0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1},
                      philox({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}))
    end)
  end)

  describe("the counter-based stream", function()
    it("rand in f64 is element i of Philox(seed, offset + i), 53 bits per value", function()
      ms.manual_seed(20260)
      local values = flat(ms.rand(9, {dtype = "f64"}))
      for i = 1, 9 do
        assert.are.equal(uniform53(block(20260, i - 1)), values[i], "element " .. (i - 1))
      end
    end)

    it("rand in f32 takes the top 24 bits of the same blocks", function()
      ms.manual_seed(77)
      local values = flat(ms.rand(6))
      for i = 1, 6 do assert.are.equal(uniform24(block(77, i - 1)), values[i]) end
    end)

    it("starts at the offset of the state it is given", function()
      ms.set_rng_state({seed = 5, offset = 1001})
      local values = flat(ms.rand(3, {dtype = "f64"}))
      for i = 1, 3 do assert.are.equal(uniform53(block(5, 1000 + i)), values[i]) end
    end)

    it("advances the offset by whole blocks of four counters per draw", function()
      ms.manual_seed(3)
      ms.rand(5)
      assert.are.same({seed = 3, offset = 8}, ms.get_rng_state())
      ms.randn(2, 2)
      assert.are.same({seed = 3, offset = 12}, ms.get_rng_state())
    end)

    it("makes successive draws slices of one stream", function()
      ms.manual_seed(11)
      local first, second = flat(ms.rand(8, {dtype = "f64"})), flat(ms.rand(4, {dtype = "f64"}))
      ms.manual_seed(11)
      local whole = flat(ms.rand(12, {dtype = "f64"}))
      for i = 1, 8 do assert.are.equal(whole[i], first[i]) end
      for i = 1, 4 do assert.are.equal(whole[8 + i], second[i]) end
    end)

    it("gives different streams for different seeds", function()
      ms.manual_seed(1)
      local a = ms.rand(16)
      ms.manual_seed(2)
      assert.is_false(ms.equal(a, ms.rand(16)))
    end)

    it("fills a non-contiguous view in row-major order of the view", function()
      ms.manual_seed(9)
      local dense = flat(ms.rand(2, 3, {dtype = "f64"}))
      ms.manual_seed(9)
      local target = ms.zeros(3, 2, {dtype = "f64"}):t()
      ms.nn.init.uniform_(target, 0, 1)
      assert.are.same(dense, flat(target))
    end)
  end)

  describe("manual_seed", function()
    it("replays rand, randn and randint", function()
      local function draws()
        return {flat(ms.rand(7)), flat(ms.randn(3, 3, {dtype = "f64"})), flat(ms.randint(0, 100, {5}))}
      end
      ms.manual_seed(123)
      local a = draws()
      ms.manual_seed(123)
      assert.are.same(a, draws())
    end)

    it("resets the offset to zero", function()
      ms.manual_seed(8)
      ms.rand(40)
      ms.manual_seed(8)
      assert.are.same({seed = 8, offset = 0}, ms.get_rng_state())
    end)
  end)

  describe("get_rng_state and set_rng_state", function()
    it("replay rand, randn, randint and dropout masks from the saved point", function()
      ms.manual_seed(4)
      ms.rand(13)
      local state = ms.get_rng_state()
      local x = ms.ones(64, {dtype = "f64"})
      local before = {flat(ms.rand(5)), flat(ms.randn(6)), flat(ms.randint(-3, 3, {8})), flat(x:dropout(0.5))}
      ms.set_rng_state(state)
      local after = {flat(ms.rand(5)), flat(ms.randn(6)), flat(ms.randint(-3, 3, {8})), flat(x:dropout(0.5))}
      assert.are.same(before, after)
    end)

    it("give a dropout mask that differs once the stream has moved on", function()
      ms.manual_seed(4)
      local x = ms.ones(64, {dtype = "f64"})
      local first = x:dropout(0.5)
      assert.is_false(ms.equal(first, x:dropout(0.5)))
    end)

    it("return a copy: changing it does not move the generator", function()
      ms.manual_seed(6)
      local state = ms.get_rng_state()
      state.offset = 400
      assert.are.same({seed = 6, offset = 0}, ms.get_rng_state())
    end)

    it("reject a state with a negative or fractional offset or seed", function()
      raises("set_rng_state", function() ms.set_rng_state({seed = 1, offset = -4}) end)
      raises("set_rng_state", function() ms.set_rng_state({seed = 1, offset = 2.5}) end)
      raises("set_rng_state", function() ms.set_rng_state({seed = -1, offset = 0}) end)
      raises("set_rng_state", function() ms.set_rng_state({seed = 1}) end)
    end)
  end)

  describe("distributions", function()
    it("rand stays in [0, 1) in f32 and f64 with mean 1/2 and variance 1/12", function()
      ms.manual_seed(0)
      for _, dtype in ipairs({"f32", "f64"}) do
        local values = flat(ms.rand(20000, {dtype = dtype}))
        local low, high = math.huge, -math.huge
        for _, v in ipairs(values) do low, high = math.min(low, v), math.max(high, v) end
        assert.is_true(low >= 0 and high < 1, dtype)
        local mean, variance = moments(values)
        assert.is_true(math.abs(mean - 0.5) < 0.01, dtype .. " mean " .. mean)
        assert.is_true(math.abs(variance - 1 / 12) < 0.003, dtype .. " variance " .. variance)
      end
    end)

    it("randn has mean 0, variance 1 and about 68.3% of draws within one standard deviation", function()
      ms.manual_seed(1)
      local values = flat(ms.randn(40000, {dtype = "f64"}))
      local mean, variance = moments(values)
      assert.is_true(math.abs(mean) < 0.02, "mean " .. mean)
      assert.is_true(math.abs(variance - 1) < 0.03, "variance " .. variance)
      local within = 0
      for _, v in ipairs(values) do if math.abs(v) < 1 then within = within + 1 end end
      assert.is_true(math.abs(within / #values - 0.6827) < 0.01, "fraction " .. within / #values)
    end)

    it("randint hits every integer of [low, high) about equally often", function()
      ms.manual_seed(2)
      local counts = {}
      for _, v in ipairs(flat(ms.randint(-2, 3, {10000}))) do
        assert.is_true(v % 1 == 0 and v >= -2 and v < 3, tostring(v))
        counts[v] = (counts[v] or 0) + 1
      end
      for v = -2, 2 do assert.is_true(math.abs(counts[v] / 10000 - 0.2) < 0.02, tostring(v)) end
    end)

    it("randint rejects bounds that are not integers and options it does not have", function()
      raises("randint", function() ms.randint(0.5, 3, {4}) end)
      raises("randint", function() ms.randint(0, 2.5, {4}) end)
      raises("randint", function() ms.randint(0, 2, {4}, {dtyp = "i32"}) end)
    end)

    it("rand and randn reject options they do not have", function()
      raises("rand", function() ms.rand(3, {dtyp = "f64"}) end)
      raises("randn", function() ms.randn(3, {device = "cpu", grad = true}) end)
    end)

    it("dropout keeps about 1 - p of the elements", function()
      ms.manual_seed(3)
      local kept = 0
      for _, v in ipairs(flat(ms.ones(20000, {dtype = "f64"}):dropout(0.3))) do
        if v ~= 0 then kept = kept + 1 end
      end
      assert.is_true(math.abs(kept / 20000 - 0.7) < 0.015, tostring(kept))
    end)
  end)
end)
