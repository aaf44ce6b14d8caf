-- Exact allocator statistics seen from Lua: bytes and counts per tensor, views, the peak,
-- the cache, the separate host pool, and memory falling during and after backward.
local ms = require "moonshard"

local element_size = {f32 = 4, f64 = 8, bf16 = 2, f16 = 2, i32 = 4, i64 = 8, u8 = 1}

local function stats(device) return ms.memory_stats(device or "cpu") end

describe("memory statistics", function()
  -- Tensors of earlier specs are collected first and the collector is held off, so the
  -- counters move only by what each spec does.
  before_each(function()
    collectgarbage("collect")
    collectgarbage("collect")
    collectgarbage("stop")
  end)
  after_each(function() collectgarbage("restart") end)

  describe("allocation", function()
    for dtype, size in pairs(element_size) do
      it("counts a " .. dtype .. " tensor as numel * " .. size .. " bytes in one allocation", function()
        local before = stats()
        local t = ms.empty(3, 5, {dtype = dtype})
        local after = stats()
        assert.are.equal(before.allocated + 3 * 5 * size, after.allocated)
        assert.are.equal(before.allocs + 1, after.allocs)
        assert.are.equal(before.active + 1, after.active)
        t:free()
      end)
    end

    it("gives the bytes back when the tensor is freed", function()
      local before = stats()
      local t = ms.zeros(7, 9, {dtype = "f64"})
      t:free()
      local after = stats()
      assert.are.equal(before.allocated, after.allocated)
      assert.are.equal(before.active, after.active)
      assert.are.equal(before.frees + 1, after.frees)
      assert.are.equal(before.allocs + 1, after.allocs)
    end)

    it("counts every constructor's tensor once", function()
      local before = stats()
      local made = {ms.zeros(10), ms.ones(10), ms.full({10}, 2), ms.arange(10), ms.rand(10), ms.randn(10)}
      local after = stats()
      assert.are.equal(before.allocated + 6 * 10 * 4, after.allocated)
      assert.are.equal(before.allocs + 6, after.allocs)
      for _, t in ipairs(made) do t:free() end
      assert.are.equal(before.allocated, stats().allocated)
    end)

    it("leaves only the tensor's own bytes after building from a table", function()
      local before = stats()
      local t = ms.tensor({{1, 2, 3}, {4, 5, 6}}, {dtype = "f32"})
      local after = stats()
      assert.are.equal(before.allocated + 6 * 4, after.allocated)
      assert.are.equal(before.active + 1, after.active)
      t:free()
    end)

    it("allocates nothing for views", function()
      local base = ms.zeros(4, 6)
      local before = stats()
      local views = {base:view(24), base:t(), base:narrow(1, 2, 3), base:select(0, 1),
                     base:unsqueeze(0), base:permute(1, 0), base:narrow(0, 0, 1):expand(5, 6)}
      local after = stats()
      assert.are.equal(before.allocated, after.allocated)
      assert.are.equal(before.allocs, after.allocs)
      for _, v in ipairs(views) do v:free() end
      base:free()
    end)

    it("returns a storage only when its last view is freed", function()
      local before = stats()
      local base = ms.empty(10, 10)
      local view = base:view(100)
      base:free()
      assert.are.equal(before.allocated + 400, stats().allocated)
      view:free()
      assert.are.equal(before.allocated, stats().allocated)
    end)

    it("counts a copy made by to() in the target dtype's size", function()
      local t = ms.zeros(16, {dtype = "f32"})
      local before = stats()
      local copy = t:to("f64")
      assert.are.equal(before.allocated + 16 * 8, stats().allocated)
      copy:free()
      t:free()
    end)

    it("memory_stats defaults to the cpu pool", function()
      local t = ms.empty(32)
      local cpu, default = stats("cpu"), ms.memory_stats()
      assert.are.equal(cpu.allocated, default.allocated)
      assert.are.equal(cpu.allocs, default.allocs)
      t:free()
    end)
  end)

  describe("peak", function()
    it("reset_peak_memory_stats sets the peak to what is allocated now", function()
      local held = ms.empty(64)
      ms.reset_peak_memory_stats("cpu")
      local s = stats()
      assert.are.equal(s.allocated, s.peak)
      held:free()
    end)

    it("records the highest allocated since the reset", function()
      ms.reset_peak_memory_stats("cpu")
      local base = stats().allocated
      local a = ms.empty(100)    -- 400 bytes
      local b = ms.empty(200)    -- 800 bytes
      a:free()
      local c = ms.empty(50)     -- 200 bytes
      local s = stats()
      assert.are.equal(base + 1000, s.allocated)
      assert.are.equal(base + 1200, s.peak)
      b:free()
      c:free()
      s = stats()
      assert.are.equal(base, s.allocated)
      assert.are.equal(base + 1200, s.peak)
      ms.reset_peak_memory_stats()
      assert.are.equal(base, stats().peak)
    end)
  end)

  describe("cache", function()
    it("reserved covers what is allocated", function()
      local t = ms.empty(1000)
      local s = stats()
      assert.is_true(s.reserved >= s.allocated)
      t:free()
    end)

    it("a fresh block of a power-of-two size raises reserved by exactly its size", function()
      ms.empty_cache("cpu")
      local before = stats()
      local t = ms.empty(1024)   -- 4096 bytes
      assert.are.equal(before.reserved + 4096, stats().reserved)
      t:free()
    end)

    it("keeps a freed block reserved and serves the next request of its size from it", function()
      ms.empty_cache("cpu")
      local before = stats()
      ms.empty(2048):free()      -- 8192 bytes
      local cached = stats()
      assert.are.equal(before.allocated, cached.allocated)
      assert.are.equal(before.reserved + 8192, cached.reserved)
      local again = ms.empty(2048)
      local reused = stats()
      assert.are.equal(cached.reserved, reused.reserved)
      assert.are.equal(cached.allocs + 1, reused.allocs)
      again:free()
    end)

    it("empty_cache gives cached blocks back and lowers reserved", function()
      ms.empty_cache("cpu")
      local before = stats()
      ms.empty(4096):free()      -- 16384 bytes, now cached
      assert.are.equal(before.reserved + 16384, stats().reserved)
      ms.empty_cache("cpu")
      local after = stats()
      assert.are.equal(before.reserved, after.reserved)
      assert.are.equal(before.allocated, after.allocated)
    end)

    it("empty_cache keeps blocks in use", function()
      local held = ms.empty(1024)
      ms.empty_cache("cpu")
      local s = stats()
      assert.is_true(s.reserved >= s.allocated)
      assert.are.same({1024}, held:shape())
      held:free()
    end)
  end)

  describe("host pool", function()
    it("is counted apart from the cpu pool", function()
      local cpu, host = stats("cpu"), stats("host")
      local t = ms.empty(256, {device = "host"})
      assert.are.equal(host.allocated + 1024, stats("host").allocated)
      assert.are.equal(host.allocs + 1, stats("host").allocs)
      assert.are.equal(cpu.allocated, stats("cpu").allocated)
      assert.are.equal(cpu.allocs, stats("cpu").allocs)
      t:free()
      assert.are.equal(host.allocated, stats("host").allocated)
    end)

    it("receives the bytes of a tensor moved off the cpu", function()
      local x = ms.ones(256)
      local cpu, host = stats("cpu"), stats("host")
      local on_host = x:to("host")
      x:free()
      assert.are.equal(cpu.allocated - 1024, stats("cpu").allocated)
      assert.are.equal(host.allocated + 1024, stats("host").allocated)
      on_host:free()
    end)

    it("has its own peak", function()
      ms.reset_peak_memory_stats("cpu")
      local cpu_peak = stats("cpu").peak
      ms.reset_peak_memory_stats("host")
      local host_base = stats("host").allocated
      ms.empty(1000, {device = "host"}):free()
      assert.are.equal(host_base + 4000, stats("host").peak)
      assert.are.equal(cpu_peak, stats("cpu").peak)
    end)

    it("has its own cache", function()
      ms.empty_cache("host")
      ms.empty(1024, {device = "host"}):free()
      local cpu_reserved, host_reserved = stats("cpu").reserved, stats("host").reserved
      ms.empty_cache("cpu")
      assert.are.equal(host_reserved, stats("host").reserved)
      ms.empty_cache("host")
      assert.are.equal(host_reserved - 4096, stats("host").reserved)
      assert.is_true(stats("cpu").reserved <= cpu_reserved)
    end)
  end)

  describe("losses", function()
    it("cross_entropy outside a module call leaves only the input's gradient after backward", function()
      collectgarbage("stop")
      local logits = ms.randn(16, 10, {requires_grad = true})
      local target = ms.randint(0, 10, {16}, {dtype = "i64"})
      local before = ms.memory_stats("cpu").allocated
      local loss = ms.nn.F.cross_entropy(logits, target)
      loss:backward()
      loss:free()
      local left = ms.memory_stats("cpu").allocated - before
      collectgarbage("restart")
      assert.equal(16 * 10 * 4, left)
      logits.grad:free(); logits:free(); target:free()
    end)
  end)

  describe("backward", function()
    -- A chain of four layers h = tanh(h * w): parameters of n elements, activations of
    -- batch * n elements.
    local n, batch, layers = 64, 8, 4
    local param_bytes, activation_bytes = n * 4, batch * n * 4
    local weights, x

    local function make_inputs()
      weights = {}
      for i = 1, layers do weights[i] = ms.randn(n, {requires_grad = true}) end
      x = ms.randn(batch, n)
    end

    local function free_inputs()
      for _, t in ipairs(weights) do
        if t.grad then t.grad:free() end
        t:free()
      end
      x:free()
    end

    before_each(function()
      ms.manual_seed(0)
      make_inputs()
    end)
    after_each(free_inputs)

    -- on_first_grad(g) runs when the gradient of the first layer's output is computed
    local function forward(on_first_grad)
      local h = x
      for i = 1, layers do
        h = (h * weights[i]):tanh()
        if i == 1 and on_first_grad then h:register_hook(on_first_grad) end
      end
      return h:sum()
    end

    local function step() ms.scope(function() forward():backward() end) end

    it("releases saved activations as it goes: mid-backward allocated is below the start", function()
      local during
      local loss = ms.scope(forward, function() during = stats().allocated end)
      local before = stats().allocated
      loss:backward()
      assert.is_not_nil(during)
      -- by the time the first layer's output has its gradient, what the three later layers
      -- saved is gone and only parameter-sized gradients were added
      assert.is_true(during < before, string.format("%d bytes mid-backward, %d before", during, before))
      loss:free()
    end)

    it("is below the start when the last parameter gradient is accumulated", function()
      local during
      weights[1]:register_post_accumulate_grad_hook(function() during = stats().allocated end)
      local loss = ms.scope(forward)
      local before = stats().allocated
      loss:backward()
      assert.is_not_nil(during)
      assert.is_true(during < before, string.format("%d bytes at the hook, %d before", during, before))
      loss:free()
    end)

    it("leaves exactly parameters, input and gradients after a step in a module-style scope", function()
      free_inputs()
      local start = stats()
      make_inputs()
      local inputs_bytes = layers * param_bytes + activation_bytes
      assert.are.equal(start.allocated + inputs_bytes, stats().allocated)
      step()
      local after = stats()
      assert.are.equal(start.allocated + inputs_bytes + layers * param_bytes, after.allocated)
      assert.are.equal(start.active + (layers + 1) + layers, after.active)
      for _, w in ipairs(weights) do assert.are.same({n}, w.grad:shape()) end
    end)

    it("accumulates a second step into the same gradient buffers", function()
      step()
      local first = stats()
      local first_grad = weights[1].grad:table()
      step()
      local second = stats()
      assert.are.equal(first.allocated, second.allocated)
      assert.are.equal(first.active, second.active)
      local doubled = weights[1].grad:table()
      for i = 1, n do
        assert.is_true(math.abs(doubled[i] - 2 * first_grad[i]) <= 1e-5 * (1 + math.abs(doubled[i])))
      end
    end)

    it("falls back to the parameters and input once the gradients are freed", function()
      local start = stats().allocated
      step()
      for _, w in ipairs(weights) do
        w.grad:free()
        w.grad = nil
      end
      assert.are.equal(start, stats().allocated)
    end)

    it("peaks with the forward's activations and falls back to the gradients after the step", function()
      ms.reset_peak_memory_stats()
      local start = stats().allocated
      step()
      local s = stats()
      -- every layer's product and tanh, and the loss, are alive when forward ends
      local forward_bytes = 2 * layers * activation_bytes + 4
      assert.is_true(s.peak >= start + forward_bytes, string.format("peak rose by %d", s.peak - start))
      assert.are.equal(start + layers * param_bytes, s.allocated)
    end)
  end)
end)
