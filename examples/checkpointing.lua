-- Saving and resuming the example's training state with ms.dcp (model, optimizer, schedule,
-- data position, step, RNG state and the model's configuration in one store).
local ms = require "moonshard"
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

-- The state dicts hold intermediate views of the optimizer state that only the collector
-- releases; a full collection after each save or load returns their memory.
local function collect_dropped_views() collectgarbage("collect") end

-- stateful: {scheduler =, loader =, scaler =}, saved through their state_dict() (dcp's Stateful).
local function training_state(model, opt, stateful, step, config)
  local model_sd, optim_sd = dcp().get_state_dict(model, opt)
  return {model = model_sd, optim = optim_sd, scheduler = stateful.scheduler, loader = stateful.loader,
          scaler = stateful.scaler,
          step = step, rng = ms.get_rng_state(), config = config}
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
function M.save(model, opt, stateful, dir, step, config)
  M.finish()
  local state = training_state(model, opt, stateful, step, {vocab = config.vocab, seq = config.seq,
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

-- Load the latest step of the store into model, opt, the scheduler and the loader; returns
-- that step. A fresh optimizer loads directly (get_state_dict gives it its state).
function M.resume(model, opt, stateful, dir)
  local store = dcp().open(dir)
  local steps = store:steps()
  store:close()
  if #steps == 0 then error("train: --resume: the store " .. dir .. " has no committed step", 0) end
  local latest = steps[#steps]
  local state = training_state(model, opt, stateful, -1, {vocab = -1, seq = -1, layers = -1, dim = -1, heads = -1})
  dcp().load(state, dir, {step = latest})
  local config = model.config
  for key, value in pairs(state.config) do
    if config[key] ~= value then
      error(("train: --resume: the store was trained with %s = %s, this run has %s"):format(
        key, tostring(value), tostring(config[key])), 0)
    end
  end
  dcp().set_state_dict(model, opt, {model_state_dict = state.model, optim_state_dict = state.optim})
  ms.set_rng_state(state.rng)
  release_tensors(state)
  collect_dropped_views()
  return state.step
end

return M
