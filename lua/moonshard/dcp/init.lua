-- moonshard.dcp: distributed checkpoints in an LMDB store, like torch.distributed.checkpoint.
-- save / async_save write sharded state dicts, load reshards in place, open inspects.
local save = require "moonshard.dcp.save"
local load = require "moonshard.dcp.load"
local store = require "moonshard.dcp.store"
local state_dict = require "moonshard.dcp.state_dict"

local dcp = {}

-- dcp.save(state_dict, dir, {step =, keep_last =}) on every rank (a collective). The state
-- dict nests tables of tensors, DTensors, numbers, strings, booleans and Stateful objects
-- (state_dict() / load_state_dict(), also as the state dict itself: dcp.save(model, dir));
-- keys flatten to "model.net1.weight". Each rank writes its own DTensor shards (replicas once); plain tensors
-- and values count as replicated and rank 0's are written. step defaults to the latest + 1;
-- keep_last = n then keeps the newest n steps (by number), which always include the one
-- written: a step with n newer ones committed is refused before anything is written. The
-- step exists once save returns. Returns it.
function dcp.save(state_dict, dir, opts) return save.save(state_dict, dir, opts, "dcp.save") end

-- Like save, but returns after copying this rank's shards to staging buffers (kept for the
-- next async save of the same directory); a thread writes them. h:wait() on every rank
-- commits the step and returns it; any later save or load waits for it first.
function dcp.async_save(state_dict, dir, opts) return save.async_save(state_dict, dir, opts, "dcp.async_save") end

-- dcp.load(state_dict, dir, {step =, strict = true}) fills state_dict in place from step (the
-- latest by default), each tensor in its own layout (any mesh, any world size). Keys of the
-- state dict missing from the checkpoint raise; keys only in the checkpoint raise unless
-- strict = false. Without a step it is a collective: rank 0 picks the latest step and every
-- rank loads that one. Returns {step =, unexpected_keys =}.
function dcp.load(state_dict, dir, opts) return load.load(state_dict, dir, opts, "dcp.load") end

-- dcp.delete(dir, step): remove a committed step and reclaim its space, from one process;
-- it takes the store's writer lock, so it fails while another job writes the store. dir
-- must hold a store ("no such checkpoint directory" otherwise; nothing is created).
function dcp.delete(dir, step) return save.delete(dir, step, "dcp.delete") end

-- State dicts of a model and its optimizers (torch.distributed.checkpoint.state_dict):
-- get_state_dict(model, optimizers, {full_state_dict, cpu_offload, strict}) -> model sd, optim sd;
-- set_state_dict(model, optimizers, {model_state_dict =, optim_state_dict =}, opts); and the
-- get_/set_model_state_dict, get_/set_optimizer_state_dict halves.
for _, name in ipairs({"get_state_dict", "set_state_dict", "get_model_state_dict", "get_optimizer_state_dict",
                       "set_model_state_dict", "set_optimizer_state_dict"}) do
  dcp[name] = state_dict[name]
end

-- dcp.open(dir): a read-only store with :steps(), :entries(step), :chunks(fqn, step),
-- :read(fqn, step), :verify(step) and :close().
dcp.open = store.open

return dcp
