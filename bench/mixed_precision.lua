-- Benchmarks FSDP mixed precision (bf16, f16) against f32 on bench/fsdp.lua's transformer
-- configuration (examples/gpt.lua's GPT, ~25M parameters, FULL_SHARD per block) at world 2 and 4:
-- step time, collective bytes, peak memory per rank, and the ratios to f32. JSON lines. The
-- f32 state (shards, their gradients, AdamW's moments) is alike in every run; peak_above_state
-- is what the gathered parameters, their gradients and the activations took beyond it.
-- Usage (repository root, after a build):
--   luajit bench/mixed_precision.lua [--world-size N] [--dtype bf16|f16] [--steps N]
package.path = "lua/?.lua;lua/?/init.lua;examples/?.lua;" .. package.path
local ms = require "moonshard"
local gpt = require "gpt"
local support = require "bench.support"
local optim, dist, fsdp = ms.optim, ms.dist, ms.fsdp

local clock, emit = support.now, support.emit

local options = {steps = 3}
local usage = "usage: luajit bench/mixed_precision.lua [--world-size N] [--dtype bf16|f16] [--steps N]\n"
do
  local i = 1
  while i <= #arg do
    local key = arg[i]:match("^%-%-(.+)$")
    if key == "dtype" then
      options.dtype, i = arg[i + 1], i + 2
    elseif key == "steps" or key == "world-size" then
      options[key], i = tonumber(arg[i + 1]), i + 2
    else
      io.stderr:write(usage)
      os.exit(2)
    end
  end
end

local CFG = {vocab = 256, dim = 512, layers = 8, heads = 8, seq = 64, batch = 8}

local function median(values)
  local sorted = {unpack(values)}
  table.sort(sorted)
  return sorted[math.floor((#sorted + 1) / 2)]
end

-- Whether the runtime computes in dtype (nil) or why not.
local function missing_compute(dtype)
  local ok, err = pcall(function()
    local a, w = ms.randn(4, 8, {dtype = dtype}), ms.randn(8, 8, {dtype = dtype})
    return ms.nn.F.layer_norm(ms.nn.F.linear(a, w), {8}, ms.ones(8, {dtype = dtype}), ms.zeros(8, {dtype = dtype}))
  end)
  return not ok and tostring(err) or nil
end

-- One rank's timed steps with param_dtype dtype (f32: no mixed precision). Per step: seconds,
-- seconds in collectives, bytes all-gathered / reduce-scattered; peak: the most the run held
-- above what was allocated when it started.
local function train(dtype, rank, size, steps)
  collectgarbage()
  local base = ms.memory_stats("cpu").allocated
  ms.manual_seed(0)
  local model = gpt.GPT(gpt.config(nil, CFG))
  local policy = dtype ~= "f32" and {param_dtype = dtype, buffer_dtype = dtype} or nil
  fsdp.FSDP(model, {sharding_strategy = "FULL_SHARD", auto_wrap_policy = fsdp.wrap_policy({gpt.Block}),
                    mixed_precision = policy})
  local opt = optim.AdamW(model:parameters(), {lr = 1e-3})
  local scaler = dtype == "f16" and ms.amp and ms.amp.GradScaler() or nil
  local per_rank = CFG.batch / size
  local times, comm, gathered, scattered = {}, {}, {}, {}
  for step = 0, steps do
    ms.manual_seed(1000 + step)
    local tokens = ms.randint(0, CFG.vocab, {CFG.batch, CFG.seq}, {dtype = "i64"}):narrow(0, rank * per_rank, per_rank)
    local targets = ms.randint(0, CFG.vocab, {CFG.batch, CFG.seq}, {dtype = "i64"}):narrow(0, rank * per_rank, per_rank)
    if step == 1 then ms.reset_peak_memory_stats("cpu") end
    fsdp.reset_stats()
    local start = clock()
    opt:zero_grad()
    local loss = model(tokens, targets)
    if scaler then
      scaler:scale(loss):backward()
      scaler:step(opt)
      scaler:update()
    else
      loss:backward()
      opt:step()
    end
    if step > 0 then -- step 0 warms the caches
      local s = fsdp.stats()
      times[#times + 1], comm[#comm + 1] = clock() - start, s.comm_seconds
      gathered[#gathered + 1], scattered[#scattered + 1] = s.all_gather_bytes, s.reduce_scatter_bytes
    end
  end
  -- the f32 state every run keeps alike: local shards, their gradients, the optimizer's state
  local params, state = 0, 0
  for _, p in model:named_parameters() do
    params = params + p:numel()
    state = state + p:to_local():nbytes() + (p.grad and p.grad:to_local():nbytes() or 0)
    for _, v in pairs(opt.state[p] or {}) do
      if type(v) == "table" and v.nbytes then state = state + (v.to_local and v:to_local() or v):nbytes() end
    end
  end
  return {step = median(times), comm = median(comm), all_gather = median(gathered), reduce_scatter = median(scattered),
          peak = ms.memory_stats("cpu").peak - base, state = state, params = params}
end

local ORDER = {"bench", "world_size", "dtype", "params", "step_ms", "comm_ms", "all_gather_mib", "reduce_scatter_mib",
               "collective_mib", "peak_mib", "peak_mib_min", "state_mib", "peak_above_state_mib", "skipped"}
local RATIO_ORDER = {"bench", "world_size", "dtype", "step_time_ratio", "all_gather_bytes_ratio",
                     "reduce_scatter_bytes_ratio", "collective_bytes_ratio", "peak_memory_ratio",
                     "peak_above_state_ratio"}

local function run(dtype, size)
  local ranks = dist.spawn(size, function(rank, world) return train(dtype, rank, world, options.steps) end)
  local r = ranks[1]
  local peak, peak_min, above = 0, math.huge, 0
  for _, rank in ipairs(ranks) do
    peak, peak_min = math.max(peak, rank.peak), math.min(peak_min, rank.peak)
    above = math.max(above, rank.peak - rank.state)
  end
  local out = {step = r.step, comm = r.comm, all_gather = r.all_gather, reduce_scatter = r.reduce_scatter,
               collective = r.all_gather + r.reduce_scatter, peak = peak, above = above}
  emit({bench = "mixed_precision", world_size = size, dtype = dtype, params = r.params, step_ms = r.step * 1e3,
        comm_ms = r.comm * 1e3, all_gather_mib = r.all_gather / 2 ^ 20, reduce_scatter_mib = r.reduce_scatter / 2 ^ 20,
        collective_mib = out.collective / 2 ^ 20, peak_mib = peak / 2 ^ 20, peak_mib_min = peak_min / 2 ^ 20,
        state_mib = r.state / 2 ^ 20, peak_above_state_mib = above / 2 ^ 20}, ORDER)
  return out
end

for _, size in ipairs(options["world-size"] and {options["world-size"]} or {2, 4}) do
  local f32 = run("f32", size)
  for _, dtype in ipairs(options.dtype and {options.dtype} or {"bf16", "f16"}) do
    local why = missing_compute(dtype)
    if why then
      emit({bench = "mixed_precision", world_size = size, dtype = dtype, skipped = why}, ORDER)
    else
      local half = run(dtype, size)
      emit({bench = "mixed_precision_ratio", world_size = size, dtype = dtype, step_time_ratio = half.step / f32.step,
            all_gather_bytes_ratio = half.all_gather / f32.all_gather,
            reduce_scatter_bytes_ratio = half.reduce_scatter / f32.reduce_scatter,
            collective_bytes_ratio = half.collective / f32.collective, peak_memory_ratio = half.peak / f32.peak,
            peak_above_state_ratio = half.above / f32.above},
           RATIO_ORDER)
    end
  end
end
