-- ms.profiler: each op lands in its category (by kind, or by the scope attention sets), calls
-- are counted once, self times add up to the profiled wall time, and nothing is charged once
-- the profile ends.
local ffi = require "ffi"
local ms = require "moonshard"
local lib = require("moonshard.ffi").lib
local nn, F, optim = ms.nn, ms.nn.F, ms.optim
local profiler = ms.profiler

local function counts(p)
  local out = {}
  for _, row in ipairs(p.rows) do out[row.key] = row.count end
  return out
end

-- The categories with a nonzero call count, other than the allocator's.
local function charged(p)
  local out = {}
  for _, row in ipairs(p.rows) do
    if row.count > 0 and row.key ~= "allocator" then out[row.key] = row.count end
  end
  return out
end

describe("ms.profiler", function()
  local a, b = ms.randn(16, 8), ms.randn(8, 4)

  it("charges a 2-D matmul to gemm and a batched one to attention", function()
    assert.same({gemm = 1}, charged(profiler.profile(function() ms.matmul(a, b) end)))
    local q, k = ms.randn(2, 5, 3), ms.randn(2, 3, 5)
    assert.same({attention = 1}, charged(profiler.profile(function() ms.matmul(q, k) end)))
  end)

  it("sorts each op kind into its category", function()
    local x = ms.randn(4, 6)
    local weight = ms.randn(10, 6)
    local cases = {
      {"layer_norm", function() F.layer_norm(x, {6}) end},
      {"elementwise", function() F.gelu(x) end},
      {"softmax_loss", function() F.log_softmax(x, -1) end},
      {"attention", function() F.softmax(x, -1) end},
      {"reduce", function() x:sum() end},
      {"embedding", function() F.embedding(ms.tensor({1, 3}, {dtype = "i64"}), weight) end},
      {"random", function() F.dropout(x, 0.5, true) end},
    }
    for _, case in ipairs(cases) do
      local got = charged(profiler.profile(case[2]))
      assert.is_true((got[case[1]] or 0) >= 1, case[1] .. " got none")
      for key in pairs(got) do
        assert.is_true(key == case[1] or key == "copy", case[1] .. " also charged " .. key)
      end
    end
  end)

  it("charges the optimizer step, the loss and backward's bookkeeping", function()
    local model = nn.Linear(6, 3)
    local opt = optim.Adam(model:parameters(), {lr = 0.1})
    local x, target = ms.randn(5, 6), ms.tensor({0, 2, 1, 1, 0}, {dtype = "i64"})
    local p = profiler.profile(function()
      opt:zero_grad()
      F.cross_entropy(model(x), target):backward()
      opt:step()
    end)
    local c = counts(p)
    assert.equal(1, c.optimizer) -- weight and bias, stepped together (ms_adam_step_many)
    assert.is_true(c.softmax_loss >= 2) -- log_softmax and nll forward, and their backward
    assert.is_true(c.gemm >= 2) -- forward and the weight gradient
    assert.is_true(c.allocator > 0)
    assert.is_true(p.by_key.autograd.self_ms > 0)
  end)

  it("gives self times that add up to the wall time, largest first", function()
    local big = ms.randn(256, 256)
    local p = profiler.profile(function()
      for _ = 1, 3 do ms.matmul(big, big) end
    end)
    local sum = 0
    for _, row in ipairs(p.rows) do
      assert.is_true(row.self_ms >= 0)
      sum = sum + row.self_ms
    end
    assert.is_true(math.abs(sum - p.total_ms) <= 1e-6 * p.total_ms + 1e-9)
    assert.is_true(p.by_key.gemm.self_ms > 0 and p.by_key.gemm.self_ms <= p.total_ms)
    local rows = p:key_averages()
    for i = 2, #rows do assert.is_true(rows[i - 1].self_ms >= rows[i].self_ms) end
    assert.matches("gemm%s+3", p:table())
  end)

  it("puts every op of scaled_dot_product_attention in attention", function()
    local q = ms.randn(2, 3, 4, 5)
    local ok, flash = pcall(function()
      return charged(profiler.profile(function()
        ms.no_grad(function() F.scaled_dot_product_attention(q, q, q, {is_causal = true}) end)
      end))
    end)
    assert.is_true(ok, flash)
    assert.same({attention = 1}, flash)
    -- the composition dropout takes: scores, scale, mask, softmax, dropout, weighted values
    local composed = charged(profiler.profile(function()
      ms.no_grad(function() F.scaled_dot_product_attention(q, q, q, {is_causal = true, dropout_p = 0.1}) end)
    end))
    assert.is_true(composed.attention >= 6)
    composed.attention = nil
    assert.same({}, composed)
  end)

  it("charges nothing once the profile ends, also after an error", function()
    local ns, count = ffi.new("uint64_t[11]"), ffi.new("uint64_t[11]")
    assert.has_error(function() profiler.profile(function() error("boom") end) end, "boom")
    assert.is_false(profiler.active)
    lib.ms_profile_read(ns, count, 11)
    local before = tonumber(count[0])
    ms.matmul(a, b)
    lib.ms_profile_read(ns, count, 11)
    assert.equal(before, tonumber(count[0]))
  end)

  it("refuses a nested profile and a non-function", function()
    assert.has_error(function()
      profiler.profile(function() profiler.profile(function() end) end)
    end, "moonshard: profiler.profile: a profile is already running")
    assert.has_error(function() profiler.profile(42) end,
                     "moonshard: profiler.profile: expected a function, got number")
    assert.has_error(function()
      profiler.profile(function() profiler.within("nope", function() end) end)
    end, "moonshard: profiler.within: unknown category nope")
  end)
end)
