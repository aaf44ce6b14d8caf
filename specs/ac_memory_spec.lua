-- Memory saved by activation checkpointing, measured with the allocator's exact
-- statistics: a 16-layer model's peak activation memory with per-layer checkpointing,
-- selective checkpointing, and activation offload moving saved tensors to the host pool.
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn, ac = ms.nn, ms.ac

local DIM, HIDDEN, ROWS, LAYERS = 16, 64, 64, 16

-- A residual MLP layer with a norm on the hidden activations (NormFormer-style).
local Layer = nn.Module:extend("Layer")
function Layer:__init()
  self.norm = nn.LayerNorm(DIM)
  self.fc1 = nn.Linear(DIM, HIDDEN)
  self.act = nn.GELU()
  self.hidden_norm = nn.LayerNorm(HIDDEN)
  self.fc2 = nn.Linear(HIDDEN, DIM)
end
function Layer:forward(x) return x + self.fc2(self.hidden_norm(self.act(self.fc1(self.norm(x))))) end

local function build(wrap)
  ms.manual_seed(0)
  local layers = {}
  for i = 1, LAYERS do
    layers[i] = Layer()
    if wrap then wrap(layers[i]) end
  end
  return nn.Sequential(layers)
end

-- One warm-up step creates the gradients, so the measured step allocates only activations
-- and backward's temporaries. Returns bytes above the starting point: peak over the step,
-- held after forward, held after backward, host bytes held after forward, and the output.
local function measure(wrap)
  local model = build(wrap)
  local x = ms.randn(ROWS, DIM, {requires_grad = true})
  model(x):sum():backward()
  collectgarbage("collect")
  collectgarbage("stop")
  local base, host_base = ms.memory_stats().allocated, ms.memory_stats("host").allocated
  ms.reset_peak_memory_stats()
  local out = model(x)
  local loss = out:sum()
  local result = {after_forward = ms.memory_stats().allocated - base,
                  host_after_forward = ms.memory_stats("host").allocated - host_base,
                  output_bytes = out:nbytes() + loss:nbytes()}
  loss:backward()
  result.peak = ms.memory_stats().peak - base
  out:free()
  loss:free()
  result.after_backward = ms.memory_stats().allocated - base
  result.host_after_backward = ms.memory_stats("host").allocated - host_base
  collectgarbage("restart")
  return result
end

before_each(global_state.save)
after_each(global_state.restore)

describe("activation memory of a 16-layer model", function()
  local unwrapped
  setup(function() unwrapped = measure(nil) end)

  local every_variant = {
    none = false, full = ac.checkpoint_wrapper, offload = ac.offload_wrapper,
    reentrant = function(m) ac.checkpoint_wrapper(m, {checkpoint_impl = "reentrant"}) end,
    selective = function(m) ac.checkpoint_wrapper(m, {policy = ac.default_policy}) end,
    selective_reentrant = function(m)
      ac.checkpoint_wrapper(m, {checkpoint_impl = "reentrant", policy = ac.default_policy})
    end,
  }
  for name, wrap in pairs(every_variant) do
    it(name .. ": a step leaves no byte behind in either pool", function()
      local result = measure(wrap or nil)
      assert.equal(0, result.after_backward)
      assert.equal(0, result.host_after_backward)
    end)
  end

  it("the unwrapped model holds its saved activations between forward and backward", function()
    -- every layer saves at least its two hidden activations of ROWS x HIDDEN f32
    assert.is_true(unwrapped.after_forward >= LAYERS * 2 * ROWS * HIDDEN * 4)
  end)

  for _, impl in ipairs({"no_reentrant", "reentrant"}) do
    it("per-layer checkpointing (" .. impl .. ") peaks at most 1/4 of the unwrapped model", function()
      local wrapped = measure(function(m) ac.checkpoint_wrapper(m, {checkpoint_impl = impl}) end)
      assert.is_true(wrapped.peak * 4 <= unwrapped.peak,
                     ("peak %d bytes vs %d unwrapped"):format(wrapped.peak, unwrapped.peak))
      -- between forward and backward only the layers' inputs (ROWS x DIM each) and the output remain
      assert.is_true(wrapped.after_forward <= LAYERS * ROWS * DIM * 4 + wrapped.output_bytes,
                     ("%d bytes held after forward"):format(wrapped.after_forward))
    end)
  end

  it("selective checkpointing keeps at most half of the unwrapped model's peak", function()
    local wrapped = measure(function(m) ac.checkpoint_wrapper(m, {policy = ac.default_policy}) end)
    assert.is_true(wrapped.peak * 2 <= unwrapped.peak,
                   ("peak %d bytes vs %d unwrapped"):format(wrapped.peak, unwrapped.peak))
    local full = measure(ac.checkpoint_wrapper)
    assert.is_true(full.peak < wrapped.peak)
  end)

  it("selective checkpointing frees a kept output that recomputation will not read", function()
    ms.manual_seed(0)
    local fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
    local x = ms.randn(4, 8, {requires_grad = true})
    collectgarbage("collect")
    collectgarbage("stop")
    local base = ms.memory_stats().allocated
    local out = ac.checkpoint(function(a) return fc2(fc1(a):tanh()) + a end, x, {policy = ac.default_policy})
    -- the output and fc1's output stay; fc2's output is freed since recomputation stops at its saves
    assert.equal(out:nbytes() + 4 * 32 * 4, ms.memory_stats().allocated - base)
    ac.reset_stats()
    out:sum():backward()
    assert.equal(2, ac.stats().reused_outputs)
    collectgarbage("restart")
  end)

  it("offload_wrapper moves the saved activations from the compute pool into the host pool", function()
    ac.reset_stats()
    local offloaded = measure(ac.offload_wrapper)
    -- the compute pool holds only the output; the host pool holds exactly what was packed
    assert.equal(offloaded.output_bytes, offloaded.after_forward)
    assert.is_true(offloaded.host_after_forward >= unwrapped.after_forward - unwrapped.output_bytes)
    assert.is_true(offloaded.host_after_forward > 0)
    local counted = ac.stats()
    assert.equal(2 * LAYERS, counted.offload_regions)
    assert.equal(2 * offloaded.host_after_forward, counted.offloaded_bytes) -- warm-up and measured step
    assert.equal(0, offloaded.host_after_backward)
    assert.is_true(offloaded.peak < unwrapped.peak)
  end)
end)
