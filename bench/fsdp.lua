-- Benchmarks FSDP training steps: step time, peak memory and communication vs compute per
-- strategy and world size, for a ~25M-parameter transformer and a small MLP, next to the
-- unsharded single-process run and the sgemm rate measured in the same invocation.
-- JSON lines. Usage (repository root, after a build):
--   luajit bench/fsdp.lua [--model transformer|mlp|all] [--strategy S] [--world-size N]
--                         [--steps N] [--warmup N] [--threads N] [--quick] [--profile]
-- Each run times --steps steps (median) after --warmup untimed ones (default: the model's
-- `warmup`, as in bench/torch_fsdp.py): a training run's steady state, once LuaJIT has
-- compiled its traces and the caches are filled (the MLP's steps are short, so it needs more).
-- --strategy and --world-size keep only the matching sharded runs ("unsharded" keeps only the
-- world-1 run); --threads sets this process's thread count (ms.set_num_threads) before the
-- world-1 run and the sgemm reference (spawned ranks share the cores as always).
-- cpu_ms is rank 0's process CPU time per step (median): unlike step_ms it barely moves when
-- other processes take the cores, so before/after comparisons on a shared machine use it.
-- flop_fraction is the FLOP rate of the steps against the sgemm rate of the same cores. For
-- the world-1 transformer the two are measured in interleaved pairs: the sgemm rate before
-- the first timed step and after each one, each step against the better of the rates on
-- either side of it; the row gives the median of the pairs' fractions and their range
-- (flop_fraction_min/max). Other runs take the best sgemm rate measured right before and
-- right after the run: between the MLP's 1 ms steps the sgemm's 9 MB of operands would
-- evict the model's 4 MB of state and slow its steps by a third, which bench/torch_fsdp.py's
-- loop does not pay.
-- --profile prints, per timed step of each run (rank 0), the milliseconds of each category of
-- ms.profiler (GEMM, attention, layer norm, element-wise, softmax/loss, optimizer, allocator,
-- collectives, autograd, ...) and the FLOP rate against the rank's sgemm rate at its thread
-- count: the step's pair reference where rates are interleaved, elsewhere the better of the
-- rates measured before and after its steps.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ms = require "moonshard"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp
local support = require "bench.support"

local clock = support.now

local options = {model = "all", steps = 5, quick = false}
local usage = "usage: luajit bench/fsdp.lua [--model transformer|mlp|all] [--strategy S] [--world-size N] " ..
              "[--steps N] [--warmup N] [--threads N] [--quick] [--profile]\n"
do
  local i = 1
  while i <= #arg do
    local key = arg[i]:match("^%-%-(.+)$")
    if key == "quick" or key == "profile" then
      options[key], i = true, i + 1
    elseif key == "model" or key == "strategy" then
      options[key], i = arg[i + 1], i + 2
    elseif key == "steps" or key == "warmup" or key == "world-size" or key == "threads" then
      options[key], i = tonumber(arg[i + 1]), i + 2
    else
      io.stderr:write(usage)
      os.exit(2)
    end
  end
end

-- ---- models ----

local Block = nn.Module:extend("Block")
function Block:__init(dim, heads)
  self.ln_1 = nn.LayerNorm(dim)
  self.attn = nn.CausalSelfAttention(dim, heads)
  self.ln_2 = nn.LayerNorm(dim)
  self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
end
-- x + attn(ln_1(x)) and ln_2 of it in one pass (add_layer_norm); the MLP's Linear -> GELU
-- runs fused inside nn.Sequential.
function Block:forward(x)
  local ln_2 = self.ln_2
  local s, h = nn.F.add_layer_norm(x, self.attn(self.ln_1(x)), ln_2.normalized_shape, ln_2.weight, ln_2.bias,
                                   ln_2.eps)
  return s + self.mlp(h)
end

local GPT = nn.Module:extend("GPT")
function GPT:__init(cfg)
  self.wte = nn.Embedding(cfg.vocab, cfg.dim)
  self.wpe = nn.Embedding(cfg.seq, cfg.dim)
  local blocks = {}
  for i = 1, cfg.layers do blocks[i] = Block(cfg.dim, cfg.heads) end
  self.h = nn.ModuleList(blocks)
  self.ln_f = nn.LayerNorm(cfg.dim)
  self.lm_head = nn.Linear(cfg.dim, cfg.vocab, {bias = false})
  self.positions = ms.arange(cfg.seq, {dtype = "i64"})
end
function GPT:forward(tokens)
  local x = self.wte(tokens) + self.wpe(self.positions)
  for _, block in self.h:ipairs() do x = block(x) end
  return self.lm_head(self.ln_f(x))
end

local MLP = nn.Module:extend("MLP")
function MLP:__init(cfg)
  local layers = {}
  for i = 1, cfg.layers do
    layers[#layers + 1] = nn.Linear(cfg.dim, cfg.dim)
    layers[#layers + 1] = nn.GELU()
  end
  self.net = nn.Sequential(unpack(layers))
end
function MLP:forward(x) return self.net(x) end

local MODELS = {
  transformer = {
    cfg = {vocab = 256, dim = 512, layers = 8, heads = 8, seq = 64, batch = 8},
    warmup = 3,
    interleaved_rates = true, -- its state (400 MB) leaves no cache for the sgemm to evict
    build = function(cfg) return GPT(cfg) end,
    wrap = function() return fsdp.wrap_policy({Block}) end,
    batch = function(cfg, step)
      ms.manual_seed(1000 + step)
      local tokens = ms.randint(0, cfg.vocab, {cfg.batch, cfg.seq}, {dtype = "i64"})
      local targets = ms.randint(0, cfg.vocab, {cfg.batch, cfg.seq}, {dtype = "i64"})
      return tokens, targets
    end,
    loss = function(cfg, model, x, y)
      return nn.F.cross_entropy(model(x):view(-1, cfg.vocab), y:reshape(-1))
    end,
    -- multiply-adds x 2 x 3 (forward + backward) per token, attention scores included
    flops = function(cfg)
      local d, t = cfg.dim, cfg.seq
      local per_token = cfg.layers * (12 * d * d + 2 * t * d) + d * cfg.vocab
      return 6 * per_token * cfg.batch * t
    end,
  },
  mlp = {
    cfg = {dim = 256, layers = 4, batch = 64},
    warmup = 30,
    build = function(cfg) return MLP(cfg) end,
    wrap = function() return fsdp.wrap_policy({nn.Linear}) end,
    batch = function(cfg, step)
      ms.manual_seed(1000 + step)
      return ms.randn(cfg.batch, cfg.dim), ms.randn(cfg.batch, cfg.dim)
    end,
    loss = function(_, model, x, y) return nn.F.mse_loss(model(x), y) end,
    -- 2 per multiply-add: forward and the weight gradient in every layer, the input gradient
    -- in all but the first (its input needs none, so backward skips that product)
    flops = function(cfg) return 2 * (3 * cfg.layers - 1) * cfg.dim * cfg.dim * cfg.batch end,
  },
}

for name, spec in pairs(MODELS) do spec.name = name end

local emit = support.emit

local function median(values)
  local sorted = {unpack(values)}
  table.sort(sorted)
  return sorted[math.floor((#sorted + 1) / 2)]
end

-- sgemm GFLOP/s through ms.matmul at a shape like the transformer's MLP matmul, at this
-- process's thread count (all the cores: the reference for the ranks together).
local function sgemm_rate(m, k, n)
  local a, b = ms.randn(m, k), ms.randn(k, n)
  ms.matmul(a, b):free()
  local best = math.huge
  for _ = 1, 5 do
    local start = clock()
    ms.matmul(a, b):free()
    best = math.min(best, clock() - start)
  end
  a:free()
  b:free()
  return 2 * m * k * n / best / 1e9
end

-- The sgemm rate of the transformer's MLP shape at this process's thread count.
local function gemm_rate()
  local cfg_t = MODELS.transformer.cfg
  return sgemm_rate(cfg_t.batch * cfg_t.seq, cfg_t.dim, 4 * cfg_t.dim)
end

local PROFILE_ORDER = {"bench", "model", "strategy", "world_size", "step", "step_ms"}
for _, key in ipairs({"gemm", "attention", "layer_norm", "elementwise", "softmax_loss", "optimizer", "embedding",
                      "reduce", "copy", "random", "allocator", "collectives", "autograd", "lua"}) do
  PROFILE_ORDER[#PROFILE_ORDER + 1] = key .. "_ms"
end
for _, key in ipairs({"gflops", "sgemm_gflops", "flop_fraction", "threads"}) do
  PROFILE_ORDER[#PROFILE_ORDER + 1] = key
end

-- One profiled step of rank 0: ms per category; the FLOP rate is the whole step's (all ranks'
-- work over the step time) against size ranks at this rank's sgemm rate.
local function report_profile(spec, strategy, size, step, profile, gemm)
  local row = {bench = "profile", model = spec.name, strategy = strategy or "unsharded", world_size = size,
               step = step, step_ms = profile.total_ms, sgemm_gflops = gemm, threads = ms.get_num_threads()}
  for _, r in ipairs(profile.rows) do row[r.key .. "_ms"] = r.self_ms end
  row.gflops = spec.flops(spec.cfg) / (profile.total_ms * 1e-3) / 1e9
  row.flop_fraction = row.gflops / (size * gemm)
  emit(row, PROFILE_ORDER)
end

-- One rank's timed steps; strategy nil trains the plain model. peak is the most this run
-- held above what was allocated when it started.
local function train(spec, strategy, rank, size, steps, mesh_shape)
  local cfg = spec.cfg
  collectgarbage()
  local base = ms.memory_stats("cpu").allocated -- what earlier runs (or the forked parent) hold
  ms.manual_seed(0)
  local model = spec.build(cfg)
  if strategy then
    local opts = {sharding_strategy = strategy, auto_wrap_policy = spec.wrap()}
    if mesh_shape then
      opts.device_mesh = dist.init_device_mesh(mesh_shape, {mesh_dim_names = {"replicate", "shard"}})
    end
    model = fsdp.FSDP(model, opts)
  end
  local opt = optim.AdamW(model:parameters(), {lr = 1e-3})
  local per_rank = cfg.batch / size
  local times, cpu, comm, profiles = {}, {}, {}, {}
  local function step_body(x, y)
    opt:zero_grad()
    spec.loss(cfg, model, x, y):backward()
    opt:step()
  end
  -- interleaved: rates[i] is the sgemm rate right after timed step i (rates[0] before the first)
  local rates = size == 1 and spec.interleaved_rates and {} or nil
  local gemm = not rates and options.profile and rank == 0 and gemm_rate() or nil
  for step = 1 - (options.warmup or spec.warmup), steps do
    if rates and step == 1 then rates[0] = gemm_rate() end
    local x, y = spec.batch(cfg, step)
    x, y = x:narrow(0, rank * per_rank, per_rank), y:narrow(0, rank * per_rank, per_rank)
    if step == 1 then ms.reset_peak_memory_stats("cpu") end
    fsdp.reset_stats()
    local start, cpu_start = clock(), os.clock()
    if options.profile then
      profiles[step] = ms.profiler.profile(step_body, x, y)
    else
      step_body(x, y)
    end
    if step > 0 then
      times[#times + 1] = clock() - start
      cpu[#cpu + 1] = os.clock() - cpu_start
      comm[#comm + 1] = fsdp.stats().comm_seconds
      if rates then rates[step] = gemm_rate() end
    end
  end
  local references, fractions
  if rates then
    references, fractions = {}, {}
    for step = 1, steps do
      references[step] = math.max(rates[step - 1], rates[step])
      fractions[step] = spec.flops(cfg) / times[step] / 1e9 / references[step]
    end
  end
  if options.profile and rank == 0 then
    if gemm then gemm = math.max(gemm, gemm_rate()) end
    for step = 1, steps do
      report_profile(spec, strategy, size, step, profiles[step], references and references[step] or gemm)
    end
  end
  return {step = median(times), cpu = median(cpu), comm = median(comm), fractions = fractions,
          reference = references and median(references),
          peak = ms.memory_stats("cpu").peak - base, threads = ms.get_num_threads()}
end

local ORDER = {"bench", "model", "strategy", "world_size", "mesh", "params", "step_ms", "cpu_ms", "comm_ms",
               "compute_ms", "peak_mib", "gflops", "sgemm_gflops", "flop_fraction", "flop_fraction_min",
               "flop_fraction_max", "threads_per_rank"}

-- The machine is shared: a run's reference is the best sgemm rate measured right before and
-- right after it (and at start), so a quiet moment during the run cannot make its FLOP rate
-- look faster than the GEMM it is made of. The world-1 transformer has its own pairs (train).
local best_gemm = 0
local function gemm_reference(cfg_t)
  best_gemm = math.max(best_gemm, sgemm_rate(cfg_t.batch * cfg_t.seq, cfg_t.dim, 4 * cfg_t.dim))
  return best_gemm
end

local function report(name, spec, strategy, size, result, params, gemm_gflops, mesh)
  local gflops = spec.flops(spec.cfg) / result.step / 1e9
  local row = {bench = "fsdp", model = name, strategy = strategy or "unsharded", world_size = size, mesh = mesh,
               params = params, step_ms = result.step * 1e3, cpu_ms = result.cpu * 1e3, comm_ms = result.comm * 1e3,
               compute_ms = (result.step - result.comm) * 1e3, peak_mib = result.peak / 2 ^ 20, gflops = gflops,
               sgemm_gflops = gemm_gflops, flop_fraction = gflops / gemm_gflops, threads_per_rank = result.threads}
  if result.fractions then
    local sorted = {unpack(result.fractions)}
    table.sort(sorted)
    row.sgemm_gflops = result.reference
    row.flop_fraction, row.flop_fraction_min, row.flop_fraction_max = median(sorted), sorted[1], sorted[#sorted]
  end
  emit(row, ORDER)
end

local function count_params(spec)
  ms.manual_seed(0)
  local n = 0
  for _, p in spec.build(spec.cfg):named_parameters() do n = n + p:numel() end
  return n
end

if options.threads then ms.set_num_threads(options.threads) end
local cfg_t = MODELS.transformer.cfg
emit({bench = "sgemm", m = cfg_t.batch * cfg_t.seq, k = cfg_t.dim, n = 4 * cfg_t.dim, gflops = gemm_reference(cfg_t),
      threads = ms.get_num_threads()}, {"bench", "m", "k", "n", "gflops", "threads"})
-- fn's result reported against the sgemm reference measured around it.
local function measured(name, spec, strategy, size, params, mesh, fn)
  gemm_reference(cfg_t)
  local result = fn()
  report(name, spec, strategy, size, result, params, gemm_reference(cfg_t), mesh)
end

local names = options.model == "all" and {"transformer", "mlp"} or {options.model}
local sizes = options["world-size"] and {options["world-size"]} or options.quick and {2} or {2, 4}
local function wanted(strategy) return options.strategy == nil or options.strategy == strategy end
for _, name in ipairs(names) do
  local spec = MODELS[name]
  if not spec then error("unknown model " .. name) end
  local params = count_params(spec)
  local steps = options.steps
  if wanted("unsharded") then
    measured(name, spec, nil, 1, params, nil, function() return train(spec, nil, 0, 1, steps) end)
  end
  for _, size in ipairs(sizes) do
    for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
      if wanted(strategy) then
        measured(name, spec, strategy, size, params, nil, function()
          return dist.spawn(size, function(rank, world) return train(spec, strategy, rank, world, steps) end)[1]
        end)
      end
    end
    if size == 4 and wanted("HYBRID_SHARD") then
      measured(name, spec, "HYBRID_SHARD", size, params, "2x2", function()
        return dist.spawn(size, function(rank, world)
          return train(spec, "HYBRID_SHARD", rank, world, steps, {2, 2})
        end)[1]
      end)
    end
  end
end
