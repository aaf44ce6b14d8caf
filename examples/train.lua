-- Trains a GPT-style character model on the bundled Shakespeare text with FSDP and
-- per-block activation checkpointing, on local ranks (forked) or under mpirun / moonshard run.
-- Usage: luajit examples/train.lua [--nproc 4] [--steps 300] ... (--help), from any directory:
-- the example's modules and the repository's lua/ are found next to this file (an installed
-- moonshard on LUA_PATH serves as well).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here .. "/?.lua;" .. package.path
local ms = require "moonshard"
local options = require "options"
local chars = require "chars"
local gpt = require "gpt"
local progress = require "progress"
local sampling = require "sampling"
local checkpointing = require "checkpointing"
local ffi = require "ffi"

pcall(ffi.cdef, "int mkdir(const char *path, unsigned int mode);")
pcall(ffi.cdef, "int getpid(void);")

local function is_directory(path)
  local f = io.open(path .. "/.", "r")
  if f then f:close() end
  return f ~= nil
end

-- mkdir -p without a shell: every prefix of path, any characters in it.
local function make_directories(path)
  for i = 2, #path + 1 do
    local c = path:sub(i, i)
    if c == "/" or c == "" then ffi.C.mkdir(path:sub(1, i - 1), tonumber("755", 8)) end
  end
  if not is_directory(path) then error(("train: cannot create the directory %s"):format(path), 0) end
end

-- What makes --ckpt unusable, or nil: it is checked (and made) before training, so a bad
-- path fails at once rather than at the first save.
-- Every rank checks: another may make the directory at the same moment.
local function checkpoint_dir_problem(path, resume)
  if not is_directory(path) and not resume then pcall(make_directories, path) end
  if not is_directory(path) then
    local f = io.open(path, "r")
    if f then
      f:close()
      return ("--ckpt %s is a file, not a directory"):format(path)
    end
    if resume then return nil end -- resuming reports a missing store itself
    return ("--ckpt %s: cannot create the directory"):format(path)
  end
  local probe = ("%s/.train-write-test-%d"):format(path, ffi.C.getpid())
  local f = io.open(probe, "w")
  if not f then return ("--ckpt %s: cannot write into the directory"):format(path) end
  f:close()
  os.remove(probe)
  return nil
end

local optim, dist, fsdp, ac = ms.optim, ms.dist, ms.fsdp, ms.ac

local opts, problem = options.parse(arg)
if opts == "help" then
  io.stdout:write(options.usage())
  os.exit(0)
elseif opts then
  problem = opts.ckpt and checkpoint_dir_problem(opts.ckpt, opts.resume)
  if problem then opts = nil end
end
if not opts then
  io.stderr:write("train: ", problem, "\n\n", options.usage())
  os.exit(2)
end

-- The learning-rate schedule: linear warm-up over the first 10% of the steps, then cosine
-- decay to a tenth of --lr (stepped once per training step).
local function lr_schedule(opt)
  local S = optim.lr_scheduler
  local warmup = math.max(1, math.floor(opts.steps / 10))
  return S.SequentialLR(opt, {S.LinearLR(opt, {start_factor = 1 / warmup, total_iters = warmup}),
                              S.CosineAnnealingLR(opt, {T_max = math.max(1, opts.steps - warmup), eta_min = opts.lr / 10})},
                        {warmup})
end

-- This rank's batches: windows of the corpus in a shuffled order split over the ranks
-- (DistributedSampler), rows per rank at a time; a new epoch begins when one runs out.
local function data_loader(corpus, rows)
  local windows = corpus:windows(opts.seq)
  local sampler = ms.data.DistributedSampler(windows, {seed = opts.seed})
  local loader = ms.data.DataLoader(windows, {batch_size = rows, sampler = sampler, drop_last = true,
                                              collate_fn = function(starts) return corpus:collate(starts, opts.seq) end})
  return loader, sampler
end

local function batches_of(loader, sampler)
  local batches = loader:iter()
  return function()
    local batch = batches()
    if batch == nil then
      sampler:set_epoch(sampler.epoch + 1)
      batches = loader:iter()
      batch = batches()
    end
    return batch
  end
end

local function device_mesh(world)
  if opts.strategy == "HYBRID_SHARD" or opts.strategy == "_HYBRID_SHARD_ZERO2" then
    if world % 2 ~= 0 then error("train: " .. opts.strategy .. " needs an even number of ranks", 0) end
    return dist.init_device_mesh({2, world / 2}, {mesh_dim_names = {"replicate", "shard"}})
  end
  return dist.init_device_mesh({world})
end

local function apply_checkpointing(model)
  if opts.ac == "none" then return end
  for _, block in model.transformer.h:ipairs() do
    if opts.ac == "full" then
      ac.checkpoint_wrapper(block)
    elseif opts.ac == "offload" then
      ac.offload_wrapper(block)
    else -- selective: matmul outputs are saved, the rest of the block is recomputed
      ac.checkpoint_wrapper(block, {policy = ac.default_policy})
    end
  end
end

local function build(corpus, world)
  ms.manual_seed(opts.seed)
  local config = gpt.config(opts.model, {vocab = corpus:vocab_size(), seq = opts.seq, layers = opts.layers,
                                         dim = opts.dim, heads = opts.heads})
  -- built on the meta device: each rank materialises only its shards (bitwise a full build's)
  local model = ms.device("meta", function() return gpt.GPT(config) end)
  apply_checkpointing(model)
  -- --dtype bf16 | f16: gathered, computed and reduced in 16 bits; shards and optimizer state f32
  local mixed_precision = opts.dtype ~= "f32" and {param_dtype = opts.dtype, buffer_dtype = opts.dtype} or nil
  fsdp.FSDP(model, {sharding_strategy = opts.strategy, device_mesh = device_mesh(world),
                    auto_wrap_policy = fsdp.wrap_policy{gpt.Block}, param_init_fn = gpt.init_module,
                    mixed_precision = mixed_precision})
  local opt = optim.AdamW(model:parameters(), {lr = opts.lr, weight_decay = 0.01, betas = {0.9, 0.95}})
  return model, opt, lr_schedule(opt), config
end

-- f16 gradients need loss scaling (ms.amp.GradScaler); nil for the other dtypes.
local function grad_scaler()
  if opts.dtype ~= "f16" then return nil end
  local amp = ms.amp
  if not (amp and amp.GradScaler) then
    error("train: --dtype f16 needs amp.GradScaler (loss scaling), which this moonshard does not have; " ..
          "use --dtype bf16", 0)
  end
  return amp.GradScaler()
end

-- Gradients are DTensors whose local shards the optimizer's zero_grad leaves to the
-- collector; releasing them here keeps the memory figures exact.
local function release_grads(model)
  for _, p in ipairs(model:parameters()) do
    local grad = rawget(p, "grad")
    if grad and grad.release then grad:release() end
  end
end

-- The mean over ranks of each rank's loss on its slice of the global batch.
local function global_loss(loss)
  local value = ms.tensor({loss:item()}, {dtype = "f64"})
  dist.all_reduce(value, "avg")
  local mean = value:item()
  value:free()
  return mean
end

local function train(rank, world)
  if opts.batch % world ~= 0 then
    error(("train: --batch %d must be a multiple of the number of ranks (%d)"):format(opts.batch, world), 0)
  end
  local corpus = chars.load(opts.data)
  local model, opt, scheduler, config = build(corpus, world)
  local scaler = grad_scaler()
  local rows = opts.batch / world
  local loader, sampler = data_loader(corpus, rows)
  local stateful = {scheduler = scheduler, loader = loader, scaler = scaler}
  local first_step = 1
  if opts.resume then
    first_step = checkpointing.resume(model, opt, stateful, opts.ckpt) + 1
  elseif opts.ckpt then
    checkpointing.check_fresh(opts.ckpt)
  end
  local meter
  if rank == 0 then
    make_directories(opts.out)
    local params = 0
    for _, p in model:named_parameters() do params = params + p:numel() end
    print(("model: %d layers, dim %d, %d heads, vocab %d, %d parameters%s; world size %d, %s, --ac %s, --dtype %s"):format(
      config.layers, config.dim, config.heads, config.vocab, params, config.tie and " (tied embeddings)" or "",
      world, opts.strategy, opts.ac, opts.dtype))
    meter = progress.new{total_steps = opts.steps, first_step = first_step, tokens_per_step = opts.batch * opts.seq,
                         metrics_path = opts.out .. "/metrics.jsonl", log_every = opts.log_every,
                         append = opts.resume}
  end
  local last_step = opts.stop_after and math.min(opts.stop_after, opts.steps) or opts.steps
  local next_batch = batches_of(loader, sampler)
  for step = first_step, last_step do
    local batch = next_batch()
    local tokens, targets = batch.tokens, batch.targets
    local lr = scheduler:get_last_lr()[1]
    release_grads(model)
    opt:zero_grad()
    local loss = model(tokens, targets)
    if scaler then
      scaler:scale(loss):backward()
      scaler:unscale_(opt)
    else
      loss:backward()
    end
    fsdp.clip_grad_norm_(model, 1.0)
    if scaler then
      scaler:step(opt)
      scaler:update()
    else
      opt:step()
    end
    scheduler:step()
    local mean_loss = global_loss(loss)
    loss:free(); tokens:free(); targets:free()
    if meter then meter:step(step, mean_loss, lr) end
    local save_now = opts.ckpt and ((opts.save_every > 0 and step % opts.save_every == 0) or step == last_step)
    if save_now then
      checkpointing.save(model, opt, stateful, opts.ckpt, step, config)
    end
  end
  checkpointing.finish()
  progress.report_peaks(meter)
  if meter then meter:close() end
  local text = sampling.generate_on_rank0(model, config, corpus, {length = opts.sample, seed = opts.seed})
  if rank == 0 and text then
    print("\n--- sample ---\n" .. text .. "\n--------------")
    local file = assert(io.open(opts.out .. "/sample.txt", "w"))
    file:write(text, "\n")
    file:close()
  end
  if opts.repl then ms.repl{model = model, store = opts.ckpt} end
end

-- The ranks' errors, without the tracebacks of those this script raised on purpose
-- ("train: ..."), which describe bad input rather than a fault.
local function readable(message)
  local lines, skipping = {}, false
  for line in (tostring(message) .. "\n"):gmatch("(.-)\n") do
    if line == "stack traceback:" and skipping then
      skipping = "traceback"
    elseif skipping == "traceback" and line:sub(1, 1) == "\t" then
      -- part of a traceback being dropped
    else
      skipping = line:match("^%[rank %d+%] train: ") ~= nil
      lines[#lines + 1] = line
    end
  end
  return table.concat(lines, "\n")
end

if dist.is_initialized() then
  train(dist.get_rank(), dist.get_world_size())
else
  local ok, err = pcall(dist.spawn, opts.nproc, train)
  if not ok then
    io.stderr:write(readable(err), "\n")
    os.exit(1)
  end
end
