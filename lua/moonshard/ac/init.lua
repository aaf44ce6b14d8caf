-- moonshard.ac: activation checkpointing (checkpoint, checkpoint_wrapper, selective
-- policies, apply_activation_checkpointing) and activation offload (offload_wrapper,
-- save_on_cpu). Wrappers work in place: parameter and state-dict names do not change.
local C = require "moonshard.ffi"
local Module = require "moonshard.nn.module"
local checkpointing = require "moonshard.ac.checkpoint"
local selective = require "moonshard.ac.selective"
local offload = require "moonshard.ac.offload"
local stats = require "moonshard.ac.stats"

local fail = C.fail

local ac = {}

ac.default_policy = selective.default_policy
ac.policy_ops = selective.OPS

local option_keys = {use_reentrant = true, preserve_rng_state = true, policy = true}

-- The options table is the last argument when it is a plain table holding option keys;
-- a table mixing option keys with other keys is refused rather than passed on.
local function split_options(...)
  local n = select("#", ...)
  local last = select(n, ...)
  if n == 0 or type(last) ~= "table" or getmetatable(last) ~= nil then return {n = n, ...}, {} end
  local known, unknown = 0, nil
  for key in pairs(last) do
    if option_keys[key] then known = known + 1 else unknown = unknown or key end
  end
  if next(last) ~= nil and known == 0 then return {n = n, ...}, {} end
  if unknown ~= nil then
    fail("checkpoint", "unknown option '%s' (expected use_reentrant, preserve_rng_state, policy)", tostring(unknown))
  end
  return {n = n - 1, ...}, last
end

local is_callable = C.is_callable

local function region_options(what, opts)
  if opts.policy ~= nil and type(opts.policy) ~= "function" then
    fail(what, "policy must be a function(op_name) -> 'save' | 'recompute', got %s", type(opts.policy))
  end
  return {preserve_rng_state = opts.preserve_rng_state ~= false, policy = opts.policy}
end

local function run_region(fn, args, reentrant, opts)
  if reentrant then return checkpointing.checkpoint_reentrant(fn, args, opts) end
  return checkpointing.checkpoint_non_reentrant(fn, args, opts)
end

-- ac.checkpoint(fn, arg1, ..., [{use_reentrant = false, preserve_rng_state = true, policy = fn}])
function ac.checkpoint(fn, ...)
  if not is_callable(fn) then
    fail("checkpoint", "expected a function or a module to run, got %s", type(fn))
  end
  local args, opts = split_options(...)
  return run_region(fn, args, opts.use_reentrant, region_options("checkpoint", opts))
end

-- The module's call (its hooks and forward) runs inside around(call, ...).
local function wrap_call(module, kind, around)
  if not Module.is_module(module) then fail(kind, "expected an nn.Module, got %s", type(module)) end
  if rawget(module, "_ac_wrapper") then
    fail(kind, "module %s is already wrapped by %s", module.__name or "?", rawget(module, "_ac_wrapper"))
  end
  rawset(module, "_ac_wrapper", kind)
  module:register_call_wrapper(around)
  return module
end

-- checkpoint_wrapper(module, {checkpoint_impl = "no_reentrant" | "reentrant",
--                             preserve_rng_state = true, policy = fn})
function ac.checkpoint_wrapper(module, opts)
  opts = opts or {}
  local impl = opts.checkpoint_impl or "no_reentrant"
  if impl ~= "no_reentrant" and impl ~= "reentrant" then
    fail("checkpoint_wrapper", "checkpoint_impl must be 'reentrant' or 'no_reentrant', got '%s'", tostring(impl))
  end
  local region_opts = region_options("checkpoint_wrapper", opts)
  local reentrant = impl == "reentrant"
  return wrap_call(module, "checkpoint_wrapper", function(call, ...)
    return run_region(call, {n = select("#", ...), ...}, reentrant, region_opts)
  end)
end

-- Run fn(...) with every tensor saved for backward kept in the host pool; returns fn's
-- results. pin_memory is accepted (the host pool is pinned when CUDA is present).
function ac.save_on_cpu(fn, ...)
  if not is_callable(fn) then fail("save_on_cpu", "expected a function to run, got %s", type(fn)) end
  local args = {n = select("#", ...), ...}
  local last = args[args.n]
  if type(last) == "table" and getmetatable(last) == nil and last.pin_memory ~= nil then
    args.n = args.n - 1
  end
  return offload.run(fn, unpack(args, 1, args.n))
end

function ac.offload_wrapper(module)
  return wrap_call(module, "offload_wrapper", offload.run)
end

-- Wrap every submodule (not the root) for which check_fn(module) is true with
-- checkpoint_wrapper_fn (default: checkpoint_wrapper, non-reentrant).
function ac.apply_activation_checkpointing(model, opts)
  opts = opts or {}
  if not Module.is_module(model) then
    fail("apply_activation_checkpointing", "expected an nn.Module, got %s", type(model))
  end
  local check_fn = opts.check_fn or function() return true end
  local wrapper = opts.checkpoint_wrapper_fn or ac.checkpoint_wrapper
  if not is_callable(check_fn) or not is_callable(wrapper) then
    fail("apply_activation_checkpointing", "check_fn and checkpoint_wrapper_fn must be functions")
  end
  local targets = {}
  for name, m in model:named_modules() do
    if name ~= "" and not rawget(m, "_ac_wrapper") and check_fn(m) then targets[#targets + 1] = m end
  end
  for _, m in ipairs(targets) do wrapper(m) end
  return model
end

-- {recomputed = regions recomputed, reused_outputs = op outputs a policy kept and handed
--  back, offload_regions = regions run with activation offload, offloaded_bytes = bytes
--  packed to the host pool}, cumulative.
function ac.stats() return stats.snapshot() end
function ac.reset_stats() stats.reset() end

return ac
