-- moonshard.ac: activation checkpointing (checkpoint, checkpoint_wrapper,
-- apply_activation_checkpointing) and activation offload (offload_wrapper, save_on_cpu).
-- Wrappers work in place: names of parameters and state-dict keys do not change.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local Module = require "moonshard.nn.module"
local scope = require "moonshard.scope"
local checkpointing = require "moonshard.ac.checkpoint"
local stats = require "moonshard.ac.stats"

local lib, check, fail = C.lib, C.check, C.fail

local ac = {}

-- ac.checkpoint(fn, arg1, ..., [{use_reentrant = false, preserve_rng_state = true}])
-- The options table is recognised as the last argument when it is a plain table holding
-- only these keys.
local option_keys = {use_reentrant = true, preserve_rng_state = true}
local function split_options(...)
  local n = select("#", ...)
  local last = select(n, ...)
  if n > 0 and type(last) == "table" and getmetatable(last) == nil then
    local only_options = next(last) ~= nil
    for key in pairs(last) do if not option_keys[key] then only_options = false end end
    if only_options then return {n = n - 1, ...}, last end
  end
  return {n = n, ...}, {}
end

function ac.checkpoint(fn, ...)
  if type(fn) ~= "function" and not (type(fn) == "table" and getmetatable(fn) and getmetatable(fn).__call) then
    fail("checkpoint", "expected a function or a module to run, got %s", type(fn))
  end
  local args, opts = split_options(...)
  local preserve = opts.preserve_rng_state ~= false
  if opts.use_reentrant then return checkpointing.checkpoint_reentrant(fn, args, preserve) end
  return checkpointing.checkpoint_non_reentrant(fn, args, preserve)
end

local function wrap_call(module, kind, around)
  if not Module.is_module(module) then fail(kind, "expected an nn.Module, got %s", type(module)) end
  if rawget(module, "_ac_wrapper") then
    fail(kind, "module %s is already wrapped by %s", module.__name or "?", rawget(module, "_ac_wrapper"))
  end
  local inner_call = module._call
  rawset(module, "_ac_wrapper", kind)
  rawset(module, "_call", function(self, ...)
    return around(function(...) return inner_call(self, ...) end, ...)
  end)
  return module
end

-- checkpoint_wrapper(module, {checkpoint_impl = "no_reentrant" | "reentrant",
--                             preserve_rng_state = true})
function ac.checkpoint_wrapper(module, opts)
  opts = opts or {}
  local impl = opts.checkpoint_impl or "no_reentrant"
  if impl ~= "no_reentrant" and impl ~= "reentrant" then
    fail("checkpoint_wrapper", "checkpoint_impl must be 'reentrant' or 'no_reentrant', got '%s'", tostring(impl))
  end
  local preserve = opts.preserve_rng_state ~= false
  return wrap_call(module, "checkpoint_wrapper", function(call, ...)
    local args = {n = select("#", ...), ...}
    if impl == "reentrant" then return checkpointing.checkpoint_reentrant(call, args, preserve) end
    return checkpointing.checkpoint_non_reentrant(call, args, preserve)
  end)
end

-- Saved tensors go to the host pool when packed and come back when backward needs them.
local host_pool = Tensor.pool_id("host", "save_on_cpu")

local function release_packed(packed) packed.tensor:_release() end

local function offload_pack(t)
  local kept = scope.keep(Tensor.alias_raw(t))
  if t._c.storage.pool == host_pool then return {tensor = kept, _release = release_packed} end
  local copy = scope.keep(Tensor.empty_raw(t:shape(), t._c.dtype, host_pool))
  check(lib.ms_copy(copy._c, t._c), "save_on_cpu")
  kept:_release()
  stats.add_offloaded(copy:nbytes())
  return {tensor = copy, pool = t._c.storage.pool, _release = release_packed}
end

local function offload_unpack(packed)
  local t = packed.tensor
  if not packed.pool then return t end
  local back = Tensor.empty_raw(t:shape(), t._c.dtype, packed.pool)
  check(lib.ms_copy(back._c, t._c), "save_on_cpu")
  return back
end

-- Run fn(...) with every tensor saved for backward kept in the host pool; returns fn's
-- results. pin_memory is accepted (the host pool is pinned when CUDA is present).
function ac.save_on_cpu(fn, ...)
  local args = {n = select("#", ...), ...}
  local last = args[args.n]
  if type(last) == "table" and getmetatable(last) == nil and (last.pin_memory ~= nil) then
    args.n = args.n - 1
  end
  return autograd.saved_tensors_hooks(offload_pack, offload_unpack, fn, unpack(args, 1, args.n))
end

function ac.offload_wrapper(module)
  return wrap_call(module, "offload_wrapper", function(call, ...)
    return autograd.saved_tensors_hooks(offload_pack, offload_unpack, call, ...)
  end)
end

-- Wrap every submodule for which check_fn(module) is true (default: all children of the
-- root are left alone unless check_fn says so) with checkpoint_wrapper_fn.
function ac.apply_activation_checkpointing(model, opts)
  opts = opts or {}
  local check_fn = opts.check_fn or function() return true end
  local wrapper = opts.checkpoint_wrapper_fn or ac.checkpoint_wrapper
  local targets = {}
  for name, m in model:named_modules() do
    if name ~= "" and not rawget(m, "_ac_wrapper") and check_fn(m) then targets[#targets + 1] = m end
  end
  for _, m in ipairs(targets) do wrapper(m) end
  return model
end

function ac.stats() return stats.snapshot() end
function ac.reset_stats() stats.reset() end

return ac
