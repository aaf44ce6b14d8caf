-- Benchmarks building and wrapping the gpt2 preset (85M parameters with the corpus's
-- vocabulary) on 4 local ranks: deferred (meta device + FSDP param_init_fn) against a full
-- construction then FSDP. JSON lines: seconds to a wrapped model and each rank's peak
-- compute-pool bytes, with the deferred/full ratios.
-- Usage (repository root, after a build): luajit bench/deferred_init.lua [--reps N] [--model NAME]
package.path = "lua/?.lua;lua/?/init.lua;examples/?.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local gpt = require "gpt"
local dist, fsdp = ms.dist, ms.fsdp

local WORLD, VOCAB, SEQ = 4, 76, 64
local reps, model_name = 3, "gpt2"
for i = 1, #arg do
  if arg[i] == "--reps" then reps = tonumber(arg[i + 1]) end
  if arg[i] == "--model" then model_name = arg[i + 1] end
end

ffi.cdef "int clock_gettime(int clock, void *ts);"
local timespec = ffi.new("struct { long sec; long nsec; }")
local function now()
  ffi.C.clock_gettime(1, ffi.cast("void*", timespec))
  return tonumber(timespec.sec) + tonumber(timespec.nsec) * 1e-9
end

local config = gpt.config(model_name, {vocab = VOCAB, seq = SEQ})

-- One variant in freshly forked ranks: {seconds (slowest rank), peaks (per rank)}.
local function measure(deferred)
  local results = dist.spawn(WORLD, function()
    local base = ms.memory_stats("cpu").allocated
    ms.reset_peak_memory_stats("cpu")
    dist.barrier()
    local start = now()
    ms.manual_seed(0)
    local model = deferred and ms.device("meta", function() return gpt.GPT(config) end) or gpt.GPT(config)
    fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({gpt.Block}),
                      param_init_fn = deferred and gpt.init_module or nil})
    local seconds = now() - start
    return {seconds = seconds, peak = ms.memory_stats("cpu").peak - base}
  end)
  local slowest, peaks = 0, {}
  for rank, r in ipairs(results) do
    slowest = math.max(slowest, r.seconds)
    peaks[rank] = r.peak
  end
  return slowest, peaks
end

local function median(values)
  table.sort(values)
  return values[math.floor((#values + 1) / 2)]
end

local summary = {}
for _, variant in ipairs({"full", "deferred"}) do
  local times, peaks = {}, nil
  for rep = 1, reps do
    local seconds, rank_peaks = measure(variant == "deferred")
    times[rep] = seconds
    peaks = rank_peaks
  end
  local peak_max = math.max(unpack(peaks))
  summary[variant] = {seconds = median(times), peak = peak_max}
  print(('{"bench": "deferred_init", "model": "%s", "variant": "%s", "world": %d, "seconds": %.3f, ' ..
         '"peak_bytes_per_rank": [%s], "reps": %d}'):format(model_name, variant, WORLD, median(times),
         table.concat(peaks, ", "), reps))
end
print(('{"bench": "deferred_init", "model": "%s", "deferred_over_full_seconds": %.3f, ' ..
       '"deferred_over_full_peak": %.3f}'):format(model_name, summary.deferred.seconds / summary.full.seconds,
       summary.deferred.peak / summary.full.peak))
