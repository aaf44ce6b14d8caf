-- moonshard.dcp: distributed checkpoints in an LMDB store, like torch.distributed.checkpoint.
-- save / async_save write sharded state dicts, load reshards in place, open inspects.
local save = require "moonshard.dcp.save"
local load = require "moonshard.dcp.load"
local store = require "moonshard.dcp.store"

local dcp = {}

-- Every rank calls it with its state dict (nested tables of tensors, DTensors, numbers,
-- strings and booleans). The step exists once every rank returned. Returns the step.
function dcp.save(state_dict, dir, opts) return save.save(state_dict, dir, opts, "dcp.save") end

-- Like save, but returns after a staging copy; h:wait() (every rank) commits the step.
function dcp.async_save(state_dict, dir, opts) return save.async_save(state_dict, dir, opts, "dcp.async_save") end

-- Fill state_dict in place from step opts.step (the latest by default).
function dcp.load(state_dict, dir, opts) return load.load(state_dict, dir, opts, "dcp.load") end

dcp.open = store.open

return dcp
