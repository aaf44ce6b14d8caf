-- Activation offload: saved-tensor hooks that pack every tensor saved for backward into
-- the host pool and unpack it back into the pool it came from when backward needs it.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local scope = require "moonshard.scope"
local checkpointing = require "moonshard.ac.checkpoint"
local stats = require "moonshard.ac.stats"

local lib, check = C.lib, C.check

local M = {}

local host_pool = Tensor.pool_id("host", "save_on_cpu")

local function release_packed(packed) packed.tensor:_release() end

local function pack(t)
  if t._c.storage.pool == host_pool then
    return {tensor = scope.keep(Tensor.alias_raw(t)), _release = release_packed}
  end
  local copy = scope.keep(Tensor.empty_raw(t:shape(), t._c.dtype, host_pool))
  check(lib.ms_copy(copy._c, t._c), "save_on_cpu")
  stats.add_offloaded(copy:nbytes())
  return {tensor = copy, pool = t._c.storage.pool, _release = release_packed}
end

local function unpack_saved(packed)
  local t = packed.tensor
  if not packed.pool then return Tensor.alias_raw(t) end
  local back = Tensor.empty_raw(t:shape(), t._c.dtype, packed.pool)
  check(lib.ms_copy(back._c, t._c), "save_on_cpu")
  return back
end

local function with_offload(fn, ...)
  stats.add_offload_region()
  return autograd.saved_tensors_hooks(pack, unpack_saved, fn, ...)
end

-- Run fn(...) with saved tensors offloaded; returns fn's results. Inside the recomputation
-- of an enclosing checkpointed region nothing is saved, so nothing is offloaded.
function M.run(fn, ...)
  return checkpointing.unless_recomputing(with_offload, fn, ...)
end

return M
