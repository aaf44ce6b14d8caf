-- moonshard.ac: activation checkpointing (checkpoint, checkpoint_wrapper, selective
-- policies, apply_activation_checkpointing) and activation offload (offload_wrapper,
-- save_on_cpu). Wrappers work in place: parameter and state-dict names do not change.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
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
local option_list = "use_reentrant, preserve_rng_state, policy"

-- Edit distance between two short strings (for misspelt option names).
local function distance(a, b)
  local previous = {}
  for j = 0, #b do previous[j] = j end
  for i = 1, #a do
    local current = {[0] = i}
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      current[j] = math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
    end
    previous = current
  end
  return previous[#b]
end

-- The option name key looks like a misspelling of, or nil.
local function misspelt(key)
  if type(key) ~= "string" then return nil end
  local lower = key:lower()
  for name in pairs(option_keys) do
    if lower == name or distance(lower, name) <= 2 then return name end
  end
  return nil
end

-- The options table is the last argument when it is a plain table holding option keys;
-- a table mixing option keys with other keys is refused rather than passed on, and so is
-- a last table of non-tensor values whose key is a misspelt option name.
local function split_options(...)
  local n = select("#", ...)
  local last = select(n, ...)
  if n == 0 or type(last) ~= "table" or getmetatable(last) ~= nil then return {n = n, ...}, {} end
  local known, unknown = 0, nil
  for key in pairs(last) do
    if option_keys[key] then known = known + 1 else unknown = unknown or key end
  end
  if next(last) ~= nil and known == 0 then
    for key, value in pairs(last) do
      local meant = misspelt(key)
      if meant and not Tensor.is_tensor(value) then
        fail("checkpoint", "unknown option '%s' (did you mean %s? expected %s)", key, meant, option_list)
      end
    end
    return {n = n, ...}, {}
  end
  if unknown ~= nil then
    fail("checkpoint", "unknown option '%s' (expected %s)", tostring(unknown), option_list)
  end
  return {n = n - 1, ...}, last
end

local is_callable = C.is_callable

local function check_boolean(what, opts, key)
  local value = opts[key]
  if value ~= nil and type(value) ~= "boolean" then
    fail(what, "%s must be true or false, got %s", key, type(value) == "string" and "'" .. value .. "'" or tostring(value))
  end
end

local function region_options(what, opts)
  if opts.policy ~= nil and not is_callable(opts.policy) then
    fail(what, "policy must be callable as policy(op_name) -> 'save' | 'recompute', got %s", type(opts.policy))
  end
  check_boolean(what, opts, "preserve_rng_state")
  check_boolean(what, opts, "use_reentrant")
  return {preserve_rng_state = opts.preserve_rng_state ~= false, policy = opts.policy}
end

-- opts: nil or a table holding only keys of allowed (an array); returns a table.
local function checked_options(what, opts, allowed, hints)
  if opts == nil then return {} end
  if type(opts) ~= "table" or getmetatable(opts) ~= nil then
    fail(what, "options must be a table, got %s", type(opts))
  end
  local set = {}
  for _, key in ipairs(allowed) do set[key] = true end
  for key in pairs(opts) do
    if not set[key] then
      local hint = hints and hints[key]
      fail(what, "unknown option '%s' (expected %s)%s", tostring(key), table.concat(allowed, ", "),
           hint and "; " .. hint or "")
    end
  end
  return opts
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

-- The wrapper kind each wrapped module got (weak keys: the entry goes with the module).
local wrapped = setmetatable({}, {__mode = "k"})

-- "checkpoint_wrapper" or "offload_wrapper" for a module wrapped by one, else nil.
function ac.wrapper_of(module) return wrapped[module] end

-- The module's call (its hooks and forward) runs inside around(call, ...).
local function wrap_call(module, kind, around)
  if not Module.is_module(module) then fail(kind, "expected an nn.Module, got %s", type(module)) end
  if wrapped[module] then
    fail(kind, "module %s is already wrapped by %s", module.__name or "?", wrapped[module])
  end
  wrapped[module] = kind
  module:register_call_wrapper(around)
  return module
end

-- checkpoint_wrapper(module, {checkpoint_impl = "no_reentrant" | "reentrant",
--                             preserve_rng_state = true, policy = fn})
function ac.checkpoint_wrapper(module, opts)
  opts = checked_options("checkpoint_wrapper", opts, {"checkpoint_impl", "preserve_rng_state", "policy"},
                         {use_reentrant = "checkpoint_impl = 'reentrant' or 'no_reentrant' chooses the implementation"})
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
-- checkpoint_wrapper_fn (default: checkpoint_wrapper, non-reentrant). auto_wrap_policy
-- (function(module) -> bool, as fsdp.wrap_policy makes) takes precedence over check_fn.
function ac.apply_activation_checkpointing(model, opts)
  local what = "apply_activation_checkpointing"
  opts = checked_options(what, opts, {"check_fn", "checkpoint_wrapper_fn", "auto_wrap_policy"})
  if not Module.is_module(model) then fail(what, "expected an nn.Module, got %s", type(model)) end
  for _, key in ipairs({"check_fn", "checkpoint_wrapper_fn", "auto_wrap_policy"}) do
    if opts[key] ~= nil and not is_callable(opts[key]) then
      fail(what, "%s must be a function, got %s", key, type(opts[key]))
    end
  end
  local check_fn = opts.auto_wrap_policy or opts.check_fn or function() return true end
  local wrapper = opts.checkpoint_wrapper_fn or ac.checkpoint_wrapper
  local targets = {}
  for name, m in model:named_modules() do
    if name ~= "" and not wrapped[m] and check_fn(m) then targets[#targets + 1] = m end
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
