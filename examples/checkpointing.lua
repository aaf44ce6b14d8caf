-- Saving and resuming the example's training state with ms.dcp (model, optimizer, step,
-- RNG state and the model's configuration in one store).
local ms = require "moonshard"
local fsdp = ms.fsdp
local function dcp() return ms.dcp end -- loaded only when checkpoints are used

local M = {}

-- Release the tensor handles of a state dict (views of parameters and optimizer state, or
-- copies made for loading) now rather than at collection.
local function release_tensors(tree)
  for _, value in pairs(tree) do
    if ms.is_tensor(value) then
      value:free()
    elseif type(value) == "table" and getmetatable(value) == nil then
      release_tensors(value)
    elseif type(value) == "table" and value.release then
      value:release()
    end
  end
end

-- fsdp.optim_state_dict makes intermediate views of the optimizer state that only the
-- collector releases; a full collection after each save or load returns their memory.
local function collect_dropped_views() collectgarbage("collect") end

local function training_state(model, opt, step, config)
  return {model = model:state_dict(), optim = fsdp.optim_state_dict(model, opt), step = step,
          rng = ms.get_rng_state(), config = config}
end

local pending -- the save in flight

-- Wait for the save in flight, if any: its step is committed when this returns.
function M.finish()
  if pending then
    pending:wait()
    pending = nil
  end
end

-- Save the training state at step in the background: the call returns once the state is
-- staged (copy-on-write, so training goes on at once); the next save or M.finish commits it.
function M.save(model, opt, dir, step, config)
  M.finish()
  local state = training_state(model, opt, step, {vocab = config.vocab, seq = config.seq,
                                                  layers = config.layers, dim = config.dim, heads = config.heads})
  pending = dcp().async_save(state, dir, {step = step})
  release_tensors(state)
  collect_dropped_views()
end

-- A run without --resume must not mix its steps into a store that already holds some.
function M.check_fresh(dir)
  local ok, store = pcall(dcp().open, dir)
  if not ok then return end
  local steps = store:steps()
  store:close()
  if #steps > 0 then
    error(("train: the store %s already holds steps %s; continue it with --resume or choose another --ckpt")
          :format(dir, table.concat(steps, ", ")), 0)
  end
end

-- Optimizer state exists only after a first step; make it (zeros, step 0) so a load has
-- tensors of the right layout to fill.
local function materialise_optimizer_state(opt, placeholders)
  for _, group in ipairs(opt.param_groups) do
    for _, p in ipairs(group.params) do
      if not opt.state[p] then
        local shard = p:to_local()
        opt.state[p] = {step = 0, exp_avg = ms.keep(ms.zeros_like(shard)),
                        exp_avg_sq = ms.keep(ms.zeros_like(shard))}
        placeholders[#placeholders + 1] = opt.state[p]
      end
    end
  end
end

-- Load the latest step of the store into model and opt; returns that step.
function M.resume(model, opt, dir)
  local store = dcp().open(dir)
  local steps = store:steps()
  store:close()
  if #steps == 0 then error("train: --resume: the store " .. dir .. " has no committed step", 0) end
  local latest = steps[#steps]
  local placeholders = {}
  materialise_optimizer_state(opt, placeholders)
  local state = training_state(model, opt, -1, {vocab = -1, seq = -1, layers = -1, dim = -1, heads = -1})
  dcp().load(state, dir, {step = latest})
  local config = model.config
  for key, value in pairs(state.config) do
    if config[key] ~= value then
      error(("train: --resume: the store was trained with %s = %s, this run has %s"):format(
        key, tostring(value), tostring(config[key])), 0)
    end
  end
  local loadable = fsdp.optim_state_dict_to_load(model, opt, state.optim)
  opt:load_state_dict(loadable)
  ms.set_rng_state(state.rng)
  release_tensors(loadable)
  release_tensors(state)
  release_tensors(placeholders)
  collect_dropped_views()
  return state.step
end

return M
