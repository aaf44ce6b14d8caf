-- moonshard.fsdp: fully sharded data parallelism. FSDP(module, opts) shards a module in
-- place (names are unchanged) into units that gather parameters around their forward and
-- backward and reduce-scatter gradients when a unit's backward is done.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local Module = require "moonshard.nn.module"
local Unit = require "moonshard.fsdp.unit"
local state_dict = require "moonshard.fsdp.state_dict"
local grad_norm = require "moonshard.nn.utils"
local stats = require "moonshard.fsdp.stats"
local prefetch = require "moonshard.fsdp.prefetch"
local materialize = require "moonshard.fsdp.materialize"
local mixed_precision = require "moonshard.fsdp.mixed_precision"
local Tree = require "moonshard.fsdp.tree"
local finally = require "moonshard.finally"

local lib, check, fail = C.lib, C.check, C.fail

local fsdp = {}

local function dist() return require "moonshard.dist" end

local unit_of = Unit.of
fsdp.unit_of = unit_of

-- Units of the tree under root (root's own unit first), in registration order.
local function units_under(root)
  local units = {}
  for _, m in root:named_modules() do
    local unit = unit_of(m)
    if unit then units[#units + 1] = unit end
  end
  return units
end
fsdp.units_under = units_under

-- ---- hooks ----

local function tensors_in(value, out)
  if Tensor.is_tensor(value) then
    out[#out + 1] = value
  elseif type(value) == "table" and getmetatable(value) == nil then
    for _, v in pairs(value) do tensors_in(v, out) end
  end
  return out
end

local function finish_backward(tree)
  for _, unit in ipairs(tree.units) do
    if not unit.no_sync then unit:reduce_grads() end
    unit:reshard()
    unit:reset_iteration()
  end
  tree.callback_queued = false
end

local function pre_backward(unit)
  return function()
    local tree = unit.tree
    if tree:is_root(unit) and not tree.callback_queued then
      tree.callback_queued = true
      autograd.queue_callback(function() finish_backward(tree) end)
    end
    unit:unshard()
    prefetch.on_backward(unit, "BACKWARD_PRE")
    -- checkpointed regions inside the unit's forward read the parameters when recomputed
    unit:expose(true)
  end
end

local function pre_forward(unit)
  return function(_, args)
    local tree = unit.tree
    if tree:is_root(unit) and not autograd.in_backward() then
      for _, u in ipairs(tree.units) do
        u:reshard()
        u:reset_iteration()
      end
      prefetch.begin_forward(tree)
    end
    unit:unshard()
    prefetch.on_forward(unit)
    unit:expose(true)
    local mp = unit.mp
    if mp and mp.param_dtype and (mp.cast_forward_inputs or (tree:is_root(unit) and mp.cast_root_forward_params)) then
      return mixed_precision.cast_inputs(args, mp.param_dtype)
    end
  end
end

-- After forward: hooks on the outputs gather the unit again for backward. Parameters stay
-- whole when backward will need them soon (root, SHARD_GRAD_OP, recomputation inside
-- backward); otherwise they are freed now.
local function post_forward(unit)
  local gather_for_backward = pre_backward(unit)
  return function(_, _, output)
    local is_root = unit.tree:is_root(unit)
    local grad_on = autograd.is_grad_enabled()
    if grad_on then
      for _, t in ipairs(tensors_in(output, {})) do
        if t.requires_grad then t:register_hook(gather_for_backward) end
      end
    end
    local keep = autograd.in_backward() or
                 (grad_on and (is_root or not unit.strategy.reshard_after_forward))
    if keep then
      unit:expose(false)
    else
      unit:reshard()
    end
    if is_root and not autograd.in_backward() then prefetch.end_forward(unit.tree) end
  end
end

-- ---- wrapping ----

-- The mesh sharding follows: device_mesh, process_group (a group, or a pair {shard group,
-- replicate group} for the hybrid strategies), or the whole world.
local function resolve_mesh(opts, strategy)
  local d = dist()
  local hybrid = Unit.STRATEGIES[strategy].hybrid
  local mesh, group = opts.device_mesh, opts.process_group
  if mesh ~= nil and group ~= nil then fail("FSDP", "give either device_mesh or process_group, not both") end
  if group ~= nil then
    local mesh_mod = require "moonshard.mesh"
    if getmetatable(group) == d.ProcessGroup then
      if hybrid then
        fail("FSDP", "%s takes process_group as a pair {shard_group, replicate_group}, got one group", strategy)
      end
      return mesh_mod.from_group(group, "FSDP: process_group")
    end
    if type(group) ~= "table" or #group ~= 2 or getmetatable(group[1]) ~= d.ProcessGroup or
       getmetatable(group[2]) ~= d.ProcessGroup then
      fail("FSDP", "process_group must be a group from dist.new_group or a pair {shard_group, replicate_group}")
    end
    if not hybrid then fail("FSDP", "a process_group pair is for HYBRID_SHARD or _HYBRID_SHARD_ZERO2, not %s", strategy) end
    return mesh_mod.from_groups(group[1], group[2], "FSDP: process_group")
  end
  if mesh == nil then
    local world = d.get_world_size()
    if hybrid then
      fail("FSDP", "%s needs a 2-D device_mesh (replicate, shard), e.g. " ..
           "dist.init_device_mesh({2, %d}, {mesh_dim_names = {'replicate', 'shard'}}), or a process_group pair",
           strategy, math.max(1, math.floor(world / 2)))
    end
    mesh = d.init_device_mesh({world})
  end
  if hybrid and mesh:ndim() ~= 2 then
    fail("FSDP", "%s needs a 2-D device_mesh (replicate, shard), got a %d-D mesh", strategy, mesh:ndim())
  end
  if not hybrid and mesh:ndim() ~= 1 then
    fail("FSDP", "%s takes a 1-D device_mesh, got a %d-D mesh (use HYBRID_SHARD for 2-D)", strategy, mesh:ndim())
  end
  return mesh
end

local KNOWN_OPTIONS = {
  sharding_strategy = true, device_mesh = true, process_group = true, cpu_offload = true, use_orig_params = true,
  auto_wrap_policy = true, sync_module_states = true, forward_prefetch = true, backward_prefetch = true,
  param_init_fn = true, ignored_modules = true, ignored_states = true, limit_all_gathers = true, device_id = true,
  mixed_precision = true,
}

local function check_options(opts)
  local strategy = opts.sharding_strategy or "FULL_SHARD"
  if not Unit.STRATEGIES[strategy] then
    fail("FSDP", "unknown sharding_strategy '%s' (expected FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, " ..
         "HYBRID_SHARD or _HYBRID_SHARD_ZERO2)", tostring(strategy))
  end
  for key in pairs(opts) do
    if not KNOWN_OPTIONS[key] then fail("FSDP", "unknown option '%s'", tostring(key)) end
  end
  if opts.auto_wrap_policy ~= nil and not C.is_callable(opts.auto_wrap_policy) then
    fail("FSDP", "auto_wrap_policy must be a function(module) -> bool (see fsdp.wrap_policy)")
  end
  if opts.param_init_fn ~= nil and not C.is_callable(opts.param_init_fn) then
    fail("FSDP", "param_init_fn must be a function(module), got %s", type(opts.param_init_fn))
  end
  if opts.cpu_offload ~= nil then
    if type(opts.cpu_offload) ~= "table" then
      fail("FSDP", "cpu_offload must be a table such as {offload_params = true}")
    end
    for key in pairs(opts.cpu_offload) do
      if key ~= "offload_params" then fail("FSDP", "unknown cpu_offload option '%s' (expected offload_params)", tostring(key)) end
    end
    local offload = opts.cpu_offload.offload_params
    if offload ~= nil and type(offload) ~= "boolean" then
      fail("FSDP", "cpu_offload.offload_params must be true or false, got %s", tostring(offload))
    end
  end
  if opts.device_mesh ~= nil and getmetatable(opts.device_mesh) ~= require("moonshard.mesh").DeviceMesh then
    fail("FSDP", "device_mesh must be a DeviceMesh from dist.init_device_mesh, got %s",
         type(opts.device_mesh) == "string" and "'" .. opts.device_mesh .. "'" or type(opts.device_mesh))
  end
  for _, key in ipairs({"forward_prefetch", "limit_all_gathers", "sync_module_states", "use_orig_params"}) do
    if opts[key] ~= nil and type(opts[key]) ~= "boolean" then
      fail("FSDP", "%s must be true or false, got %s", key, tostring(opts[key]))
    end
  end
  local backward = opts.backward_prefetch
  if backward ~= nil and backward ~= false and not prefetch.BACKWARD[backward] then
    fail("FSDP", "unknown backward_prefetch '%s' (expected BACKWARD_PRE, BACKWARD_POST or false)",
         tostring(backward))
  end
  return strategy
end

-- device_id: a device name ("cpu", "host", "cuda:N") or N for "cuda:N"; its pool id.
local function resolve_device(device_id)
  if device_id == nil then return nil end
  if type(device_id) == "number" then device_id = "cuda:" .. device_id end
  if type(device_id) ~= "string" then fail("FSDP", "device_id must be a device name or a number, got %s", type(device_id)) end
  return Tensor.pool_id(device_id, "FSDP: device_id")
end

-- ignored_modules (modules: their subtrees stay unsharded) and ignored_states (parameters
-- or modules) as sets.
local function ignored_sets(module, opts)
  local modules, params = {}, {}
  local function add_module(m, key)
    if not Module.is_module(m) then fail("FSDP", "%s must hold modules, got %s", key, type(m)) end
    if m == module then fail("FSDP", "%s cannot hold the module being wrapped", key) end
    modules[m] = true
  end
  for _, key in ipairs({"ignored_modules", "ignored_states"}) do
    local list = opts[key]
    if list ~= nil then
      if type(list) ~= "table" or Module.is_module(list) or Tensor.is_tensor(list) then
        fail("FSDP", "%s must be an array, got %s", key, type(list))
      end
      for _, v in ipairs(list) do
        if key == "ignored_states" and Tensor.is_tensor(v) then params[v] = true else add_module(v, key) end
      end
    end
  end
  if opts.ignored_modules and opts.ignored_states then
    fail("FSDP", "give either ignored_modules or ignored_states, not both")
  end
  return {modules = modules, params = params}
end

-- Modules to wrap, children before parents, the root last.
local function plan_wrap(module, policy, ignored)
  local list = {}
  local function visit(m, is_top)
    if ignored.modules[m] then return end
    for _, child in m:named_children() do visit(child, false) end
    if is_top or (policy and not unit_of(m) and policy(m)) then list[#list + 1] = m end
  end
  visit(module, true)
  return list
end

-- The parameters each wrapped module's unit owns, and the modules whose buffers it
-- materialises. A parameter reachable under several names (tied) is one entry with
-- aliases; a tie across two units raises naming both names.
local function assign(module, to_wrap, ignored)
  local wrapping, owned, modules, unit_name = {}, {}, {}, {}
  for _, m in ipairs(to_wrap) do
    wrapping[m], owned[m], modules[m] = true, {}, {}
  end
  local first_use = {}
  local function visit(m, prefix, owner)
    if m ~= module and (unit_of(m) or ignored.modules[m]) then return end
    if wrapping[m] then
      owner = m
      unit_name[m] = prefix == "" and "the root" or "'" .. prefix:sub(1, -2) .. "'"
    end
    local own_modules = modules[owner]
    own_modules[#own_modules + 1] = m
    for name, p in m:named_parameters({recurse = false, remove_duplicate = false}) do
      if Tensor.is_tensor(p) and not ignored.params[p] then
        local use = first_use[p]
        if use == nil then
          use = {module = m, name = name, fqn = prefix .. name, tensor = p, aliases = {}, owner = owner}
          first_use[p] = use
          owned[owner][#owned[owner] + 1] = use
        elseif use.owner ~= owner then
          fail("FSDP", "'%s' and '%s' are one tied parameter in two FSDP units (%s and %s); wrap the " ..
               "modules that share it in one unit", use.fqn, prefix .. name, unit_name[use.owner], unit_name[owner])
        else
          use.aliases[#use.aliases + 1] = {module = m, name = name, fqn = prefix .. name}
        end
      end
    end
    for child_name, child in m:named_children() do
      visit(child, prefix .. child_name .. ".", owner)
    end
  end
  visit(module, "", module)
  return owned, modules
end

local function wrap_one(module, owned, modules, config)
  local unit = Unit.new(module, owned, config)
  Unit.attach(module, unit)
  unit.hooks[#unit.hooks + 1] = module:register_forward_pre_hook(pre_forward(unit))
  unit.hooks[#unit.hooks + 1] = module:register_forward_hook(post_forward(unit))
  if config.sync then materialize.sync_params(unit, config.sync) end
  materialize.run(unit, modules, config.param_init_fn, config.pool or lib.MS_POOL_CPU, config.materialised)
  if config.mp and config.mp.buffer_dtype then
    unit.cast_buffers = mixed_precision.cast_buffers(modules, config.mp.buffer_dtype, config.buffer_casts)
  end
  return unit
end

local function unwrap(module, unit)
  if unit.cast_buffers then mixed_precision.restore_buffers(unit.cast_buffers) end
  unit:undo()
  Unit.detach(module)
end

-- FSDP(module, {sharding_strategy, device_mesh | process_group, cpu_offload = {offload_params},
--               use_orig_params, auto_wrap_policy, sync_module_states, forward_prefetch,
--               backward_prefetch, limit_all_gathers, param_init_fn, ignored_modules |
--               ignored_states, device_id, mixed_precision}) -> module
function fsdp.FSDP(module, opts)
  opts = opts or {}
  if not Module.is_module(module) then fail("FSDP", "expected an nn.Module, got %s", type(module)) end
  if type(opts) ~= "table" then fail("FSDP", "options must be a table, got %s", type(opts)) end
  if unit_of(module) then
    fail("FSDP", "module %s is already wrapped by FSDP; wrap each module once", module.__name or "?")
  end
  local strategy = check_options(opts)
  local mesh = resolve_mesh(opts, strategy)
  local ignored = ignored_sets(module, opts)
  local to_wrap = plan_wrap(module, opts.auto_wrap_policy, ignored)
  local owned, modules = assign(module, to_wrap, ignored)
  local config = {strategy = strategy, mesh = mesh, pool = resolve_device(opts.device_id),
                  offload = opts.cpu_offload and opts.cpu_offload.offload_params or false,
                  param_init_fn = opts.param_init_fn or materialize.default_init,
                  mp = mixed_precision.resolve(opts.mixed_precision),
                  -- shared by the units, so a buffer under several names stays one tensor:
                  -- meta buffer -> its materialised tensor, buffer -> its buffer_dtype cast
                  materialised = {}, buffer_casts = {}}
  if opts.sync_module_states then
    config.sync = autograd.no_grad(materialize.prepare_sync, to_wrap, owned, modules, mesh,
                                   config.pool or lib.MS_POOL_CPU)
  end
  local built = {}
  local function wrap_all()
    for _, m in ipairs(to_wrap) do
      built[#built + 1] = {m, false}
      built[#built][2] = wrap_one(m, owned[m], modules[m], config)
    end
  end
  local ok, err = pcall(autograd.no_grad, function()
    if config.sync then return materialize.with_rng(config.sync.rng, wrap_all) end
    return wrap_all()
  end)
  if not ok then
    for i = #built, 1, -1 do
      local m = built[i][1]
      local unit = built[i][2] or unit_of(m)
      if unit then unwrap(m, unit) end
    end
    if config.sync then materialize.undo_sync(config.sync) end
    error(err, 0)
  end
  for _, entry in ipairs(built) do
    local unit = entry[2]
    unit:commit()
    materialize.commit(unit)
    mixed_precision.commit(unit.cast_buffers)
  end
  local tree = Tree.new(units_under(module), {
    forward_prefetch = opts.forward_prefetch or false, limit_all_gathers = opts.limit_all_gathers ~= false,
    backward_prefetch = prefetch.resolve_backward(opts.backward_prefetch, mesh:get_group(mesh:ndim() - 1).backend),
  })
  tree.hooks = state_dict.install(module)
  module:register_no_sync_handler(fsdp.no_sync)
  return module
end

-- Whether v is nn.Module or a class made from it with extend (not an instance).
local function is_module_class(v)
  if type(v) ~= "table" or rawget(v, "_class") ~= nil then return false end
  local c = v
  while c ~= nil do
    if c == Module then return true end
    c = rawget(c, "__parent")
  end
  return false
end

-- A policy wrapping every module that is an instance of one of the given classes.
function fsdp.wrap_policy(classes)
  if is_module_class(classes) then
    fail("wrap_policy", "expected an array of module classes, got the class %s (pass an array: {%s})",
         tostring(rawget(classes, "__name")), tostring(rawget(classes, "__name")))
  end
  if type(classes) ~= "table" or getmetatable(classes) ~= nil then
    fail("wrap_policy", "expected an array of module classes, got %s", type(classes))
  end
  local list = {}
  for i, class in ipairs(classes) do
    if not is_module_class(class) then
      fail("wrap_policy", "element %d is not a module class (nn.Linear, a class from nn.Module:extend), got %s",
           i, type(class) == "string" and "'" .. class .. "'" or type(class))
    end
    list[i] = class
  end
  for key in pairs(classes) do
    if type(key) ~= "number" or key < 1 or key > #list or key % 1 ~= 0 then
      fail("wrap_policy", "expected an array of module classes, got a table with key '%s'", tostring(key))
    end
  end
  return function(module)
    for _, class in ipairs(list) do
      if module:is_instance_of(class) then return true end
    end
    return false
  end
end

-- Run fn with gradient reduction off: gradients accumulate unsharded until a backward
-- outside no_sync reduces them all.
function fsdp.no_sync(model, fn, ...)
  local tree = Tree.rooted_at(unit_of(model))
  if not tree then fail("no_sync", "expects the root FSDP module") end
  for _, unit in ipairs(tree.units) do unit.no_sync = true end
  return finally(function() for _, unit in ipairs(tree.units) do unit.no_sync = false end end, fn, ...)
end

local SUMMON_OPTIONS = {writeback = true, rank0_only = true, recurse = true, offload_to_cpu = true, with_grads = true}

-- Run fn with every unit's full parameters exposed (in full precision under mixed
-- precision); with writeback (default) changes made to them are copied back into the shards.
-- opts as PyTorch's: writeback, rank0_only (only the mesh's first rank sees the full
-- parameters, the others their shards; needs writeback = false), recurse (false: the root
-- unit's parameters only); offload_to_cpu and with_grads = true are refused.
function fsdp.summon_full_params(model, fn, opts)
  local what = "summon_full_params"
  local tree = Tree.rooted_at(unit_of(model))
  if not tree then fail(what, "expects the root FSDP module") end
  if not C.is_callable(fn) then fail(what, "expected a function to run, got %s", type(fn)) end
  if opts ~= nil and (type(opts) ~= "table" or getmetatable(opts) ~= nil) then
    fail(what, "options must be a table, got %s", type(opts))
  end
  opts = opts or {}
  for key, value in pairs(opts) do
    if not SUMMON_OPTIONS[key] then
      fail(what, "unknown option '%s' (expected writeback, rank0_only, recurse, offload_to_cpu, with_grads)", tostring(key))
    end
    if type(value) ~= "boolean" then fail(what, "%s must be true or false, got %s", tostring(key), tostring(value)) end
  end
  if opts.with_grads then fail(what, "with_grads = true is not supported (the full gradients are not gathered)") end
  if opts.offload_to_cpu then fail(what, "offload_to_cpu = true is not supported") end
  local writeback = opts.writeback ~= false
  if opts.rank0_only and writeback then
    fail(what, "rank0_only = true needs writeback = false (as PyTorch's)")
  end
  local units = opts.recurse == false and {tree.root} or tree.units
  local first = true
  if opts.rank0_only then
    for _, r in ipairs(tree.root.mesh:get_coordinate() or {}) do if r ~= 0 then first = false end end
  end
  local full, fresh = {}, {}
  for i, unit in ipairs(units) do
    full[i], fresh[i] = unit:full_params()
    if first then unit:expose(true, full[i]) end
  end
  local results = {pcall(fn)}
  if results[1] and writeback then
    autograd.no_grad(function()
      for i, unit in ipairs(units) do
        for j, p in ipairs(unit.params) do
          local whole = full[i][j]
          if p.local_rows > 0 then
            local rows = #p.shape > 0 and whole:narrow(0, p.local_start, p.local_rows) or whole
            check(lib.ms_copy(p.sharded._local._c, rows._c), "summon_full_params")
            p.sharded._local:_bump_version()
          end
        end
      end
    end)
  end
  for i, unit in ipairs(units) do
    unit:expose(false)
    unit:reshard()
    if fresh[i] then for _, t in ipairs(full[i]) do t:_release() end end
  end
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, table.maxn(results))
end

-- Scale gradients so their global norm (over every shard and replica) is at most
-- max_norm; norm_type 2 (default), any p > 0, or math.huge for the largest magnitude.
-- Returns the norm before clipping.
function fsdp.clip_grad_norm_(model, max_norm, norm_type)
  if type(max_norm) ~= "number" or max_norm < 0 then
    fail("clip_grad_norm_", "max_norm must be a non-negative number, got %s", tostring(max_norm))
  end
  local p = grad_norm.norm_type(norm_type, "clip_grad_norm_")
  local tree = Tree.rooted_at(unit_of(model))
  if not tree then fail("clip_grad_norm_", "expects the root FSDP module") end
  -- a sharded unit's terms are summed over its own shard group (units sharing one group
  -- share one all-reduce); replicated gradients count once
  local replicated = 0
  local groups, group_terms = {}, {}
  local grads = {}
  for _, unit in ipairs(tree.units) do
    local key
    if unit.strategy.shard then
      key = table.concat(unit.shard_group:ranks(), ",")
      if group_terms[key] == nil then
        groups[#groups + 1] = {key = key, group = unit.shard_group}
        group_terms[key] = 0
      end
    end
    for _, param in ipairs(unit.params) do
      local grad = rawget(param.sharded, "grad")
      if grad then
        local g = grad._local
        grads[#grads + 1] = g
        local term = grad_norm.norm_term(g, p)
        if key then
          group_terms[key] = grad_norm.combine(group_terms[key], term, p)
        else
          replicated = grad_norm.combine(replicated, term, p)
        end
      end
    end
  end
  for _, m in model:named_modules() do
    for _, param in m:named_parameters({recurse = false, remove_duplicate = false}) do
      local g = Tensor.is_tensor(param) and rawget(param, "grad")
      if g then
        grads[#grads + 1] = g
        replicated = grad_norm.combine(replicated, grad_norm.norm_term(g, p), p)
      end
    end
  end
  local total = replicated
  for _, entry in ipairs(groups) do
    local t = Tensor.empty_raw({1}, lib.MS_F64, lib.MS_POOL_CPU)
    check(lib.ms_fill(t._c, group_terms[entry.key]), "clip_grad_norm_")
    dist().all_reduce(t, p == math.huge and "max" or "sum", {group = entry.group})
    total = grad_norm.combine(total, t:item(), p)
    t:_release()
  end
  local norm = grad_norm.finish(total, p)
  grad_norm.scale(grads, norm, max_norm)
  return norm
end

fsdp.MixedPrecision = function(policy) return mixed_precision.validate(policy) end
fsdp.BackwardPrefetch = {BACKWARD_PRE = "BACKWARD_PRE", BACKWARD_POST = "BACKWARD_POST"}
fsdp.stats, fsdp.reset_stats = stats.snapshot, stats.reset
fsdp.set_state_dict_type = state_dict.set_state_dict_type
-- The optimizer argument of the optimizer state-dict functions: an optimizer over the model's
-- parameters (it has param_groups).
local function check_optimizer(what, opt)
  if type(opt) ~= "table" or type(rawget(opt, "param_groups") or opt.param_groups) ~= "table" then
    fail(what, "expected an optimizer (from ms.optim) as the second argument, got %s", type(opt))
  end
end

function fsdp.optim_state_dict(model, opt, ...)
  check_optimizer("optim_state_dict", opt)
  return state_dict.optim_state_dict(model, opt, ...)
end

function fsdp.optim_state_dict_to_load(model, opt, ...)
  check_optimizer("optim_state_dict_to_load", opt)
  return state_dict.optim_state_dict_to_load(model, opt, ...)
end
fsdp.ShardedGradScaler = require("moonshard.amp").GradScaler

return fsdp
