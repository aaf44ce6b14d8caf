-- Deferred initialisation inside FSDP: a unit whose parameters were built on the meta
-- device gets only its local shards, which param_init_fn (default: reset_parameters) fills.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local init_fns = require "moonshard.nn.init_fns"

local fail = C.fail

local M = {}

-- PyTorch's default: each module with meta state resets its own parameters.
function M.default_init(module)
  if module.reset_parameters then module:reset_parameters() end
end

-- Give the meta buffers of module uninitialised storage in pool (kept for undo).
local function materialise_buffers(unit, module, pool)
  for name, b in module:named_buffers({recurse = false, remove_duplicate = false}) do
    if Tensor.is_meta(b) then
      local fresh = Tensor.empty_raw(b:shape(), Tensor.dtype_id(b:dtype(), "FSDP"), pool)
      rawset(fresh, "_init_draws", rawget(b, "_init_draws"))
      module:set_buffer(name, fresh)
      unit.materialised_buffers[#unit.materialised_buffers + 1] =
        {module = module, name = name, original = b, fresh = fresh, version = fresh:_version()}
    end
  end
end

local function has_meta_buffer(module)
  for _, b in module:named_buffers({recurse = false, remove_duplicate = false}) do
    if Tensor.is_meta(b) then return true end
  end
  return false
end

-- Run init_fn on every module of the unit that holds meta parameters or buffers (in
-- registration order), then check that each of them was written.
function M.run(unit, modules, init_fn, pool)
  unit.materialised_buffers = {}
  local targets, seen = {}, {}
  local function add(m)
    if not seen[m] then
      seen[m] = true
      targets[#targets + 1] = m
    end
  end
  local versions = {}
  for _, p in ipairs(unit.params) do
    if p.meta then
      versions[p] = p.sharded._local:_version()
      for _, slot in ipairs(p.slots) do add(slot.module) end
    end
  end
  for _, m in ipairs(modules) do
    if has_meta_buffer(m) then
      add(m)
      materialise_buffers(unit, m, pool)
    end
  end
  for _, m in ipairs(targets) do init_fns.run_init(m, init_fn) end
  for _, p in ipairs(unit.params) do
    if p.meta then
      rawset(p.sharded, "_init_draws", nil)
      rawset(p.sharded, "_init_next", nil)
      if p.sharded._local:_version() == versions[p] then
        fail("FSDP", "parameter '%s' was built on the meta device and is still uninitialised after " ..
             "param_init_fn ran on its module (%s has no reset_parameters, or it does not write the " ..
             "parameter); give FSDP a param_init_fn that initialises it", p.fqn, p.module.__name or "?")
      end
    end
  end
  for _, b in ipairs(unit.materialised_buffers) do
    rawset(b.fresh, "_init_draws", nil)
    rawset(b.fresh, "_init_next", nil)
    if b.fresh:_version() == b.version then
      fail("FSDP", "buffer '%s' of %s was built on the meta device and is still uninitialised after " ..
           "param_init_fn ran on its module", b.name, b.module.__name or "?")
    end
  end
end

return M
