-- Benchmarks activation checkpointing on a 16-layer residual MLP: step time (forward +
-- backward) and peak compute-pool activation memory for none / full / selective / offload
-- at two batch sizes, with ratios to none. JSON lines.
-- Times are wall clock and process CPU time; on a shared machine the CPU time with one BLAS
-- thread (the default here, --threads N to change) is the steadier figure. Each measurement
-- runs in a process of its own (forked), as a training run would: sharing one process, the
-- JIT traces of one variant's recomputation slowed the variants measured after it (selective
-- measured 1.08x before full and 1.19x after it). Rounds interleave the variants so drifting
-- machine load spreads over all of them.
-- Usage (repository root, after a build):
--   luajit bench/ac.lua [--quick] [--reps N] [--threads N] [--dim D] [--hidden H]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ms = require "moonshard"
local nn, ac = ms.nn, ms.ac

local DIM, HIDDEN, LAYERS = 512, 2048, 16
local quick, reps, threads = false, 5, 1
for i = 1, #arg do
  if arg[i] == "--quick" then quick = true end
  if arg[i] == "--reps" then reps = tonumber(arg[i + 1]) end
  if arg[i] == "--threads" then threads = tonumber(arg[i + 1]) end
  if arg[i] == "--dim" then DIM = tonumber(arg[i + 1]) end
  if arg[i] == "--hidden" then HIDDEN = tonumber(arg[i + 1]) end
end
ms.set_num_threads(threads)

local support = require "bench.support"
local now = support.now

local batches = quick and {32} or {128, 512}
if quick then reps = math.min(reps, 2) end

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

local variants = {
  {"none", nil},
  {"full", ac.checkpoint_wrapper},
  {"selective", function(m) ac.checkpoint_wrapper(m, {policy = ac.default_policy}) end},
  {"offload", ac.offload_wrapper},
}

local function build(wrap)
  ms.manual_seed(0)
  local layers = {}
  for i = 1, LAYERS do
    layers[i] = Layer()
    if wrap then wrap(layers[i]) end
  end
  return nn.Sequential(layers)
end

-- One forward + backward; the gradients already exist, so only activations and
-- backward's temporaries are allocated. Returns wall seconds, CPU seconds and peak bytes
-- above the start.
local function step(model, x)
  collectgarbage("collect")
  collectgarbage("stop")
  local base = ms.memory_stats().allocated
  ms.reset_peak_memory_stats()
  local start, cpu_start = now(), os.clock()
  local out = model(x)
  local loss = out:sum()
  loss:backward()
  local seconds, cpu_seconds = now() - start, os.clock() - cpu_start
  local peak = ms.memory_stats().peak - base
  out:free()
  loss:free()
  collectgarbage("restart")
  return seconds, cpu_seconds, peak
end

local emit = support.emit

local order = {"bench", "variant", "layers", "dim", "hidden", "batch", "threads", "best_ms", "median_ms",
               "best_cpu_ms", "peak_bytes", "time_vs_none", "cpu_time_vs_none", "memory_vs_none"}

local function best_and_median(samples)
  table.sort(samples)
  return samples[1], samples[math.ceil(#samples / 2)]
end

-- One variant in a forked process: warm-up steps create the gradients and compile the
-- traces, then the fastest of a few timed steps.
local WARMUP_STEPS, TIMED_STEPS = 3, 3
local function measure(variant, batch)
  return ms.dist.spawn(1, function()
    ms.set_num_threads(threads)
    local model = build(variant[2])
    ms.manual_seed(1)
    local x = ms.randn(batch, DIM, {requires_grad = true})
    for _ = 1, WARMUP_STEPS do step(model, x) end
    local best
    for _ = 1, TIMED_STEPS do
      local seconds, cpu_seconds, peak = step(model, x)
      if not best or seconds < best[1] then best = {seconds, cpu_seconds, peak} end
    end
    return best
  end)[1]
end

for _, batch in ipairs(batches) do
  local times, cpu_times, peaks = {}, {}, {}
  for i = 1, #variants do times[i], cpu_times[i] = {}, {} end
  for _ = 1, reps do
    for i, variant in ipairs(variants) do
      local seconds, cpu_seconds, peak = unpack(measure(variant, batch))
      times[i][#times[i] + 1], cpu_times[i][#cpu_times[i] + 1] = seconds, cpu_seconds
      peaks[i] = peak
    end
  end
  local best, median, best_cpu = {}, {}, {}
  for i = 1, #variants do
    best[i], median[i] = best_and_median(times[i])
    best_cpu[i] = best_and_median(cpu_times[i])
  end
  for i, variant in ipairs(variants) do
    emit({bench = "activation_checkpointing", variant = variant[1], layers = LAYERS, dim = DIM,
          hidden = HIDDEN, batch = batch, threads = ms.get_num_threads(), best_ms = best[i] * 1e3,
          median_ms = median[i] * 1e3, best_cpu_ms = best_cpu[i] * 1e3, peak_bytes = peaks[i],
          time_vs_none = best[i] / best[1], cpu_time_vs_none = best_cpu[i] / best_cpu[1],
          memory_vs_none = peaks[i] / peaks[1]}, order)
  end
end
