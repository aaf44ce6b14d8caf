-- State dicts of a model and its optimizers as torch.distributed.checkpoint.state_dict gives
-- them: FQN keys, PyTorch's optimizer layout, sharded (DTensors) or full, for FSDP, HSDP and plain modules.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local autograd = require "moonshard.autograd"
local placement = require "moonshard.placement"
local scope = require "moonshard.scope"
local Module = require "moonshard.nn.module"
local state_keys = require "moonshard.state_keys"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}
local OPTION_KEYS = {full_state_dict = true, cpu_offload = true, strict = true}

-- The options {full_state_dict = false, cpu_offload = false, strict = true}: booleans, no other key.
local function options(opts, what)
  if opts == nil then return {strict = true} end
  if type(opts) ~= "table" or getmetatable(opts) ~= nil then
    fail(what, "options must be a table, got %s", type(opts) == "table" and "an object" or type(opts))
  end
  for key, value in pairs(opts) do
    if not OPTION_KEYS[key] then
      fail(what, "unknown option '%s' (expected full_state_dict, cpu_offload, strict)", tostring(key))
    end
    if type(value) ~= "boolean" then
      fail(what, "option '%s' must be a boolean, got %s", key, type(value) == "string" and "'" .. value .. "'" or type(value))
    end
  end
  return {full_state_dict = opts.full_state_dict == true, cpu_offload = opts.cpu_offload == true,
          strict = opts.strict ~= false}
end

local function check_model(model, what)
  if not Module.is_module(model) then fail(what, "expected an nn.Module as the model, got %s", type(model)) end
end

local function is_optimizer(v)
  return type(v) == "table" and type(v.param_groups) == "table" and type(v.state) == "table"
end

-- One optimizer or an array of them (nil or {} for none).
local function optimizer_list(optimizers, what)
  if optimizers == nil then return {} end
  if is_optimizer(optimizers) then return {optimizers} end
  if type(optimizers) ~= "table" then fail(what, "expected an optimizer or an array of optimizers, got %s", type(optimizers)) end
  for i, opt in ipairs(optimizers) do
    if not is_optimizer(opt) then fail(what, "optimizer %d is a %s, not an optimizer", i, type(opt)) end
  end
  return optimizers
end

-- Parameters and persistent buffers in registration order, each under every name it has
-- (as Module:state_dict lists them): {fqn, value}.
local function model_entries(model)
  local out = {}
  for prefix, m in model:named_modules() do
    local base = prefix == "" and "" or prefix .. "."
    for _, name in ipairs(m._param_order) do
      local p = m._parameters[name]
      if p then out[#out + 1] = {base .. name, p} end
    end
    for _, name in ipairs(m._buffer_order) do
      local b = m._buffers[name]
      if b and not m._non_persistent[name] then out[#out + 1] = {base .. name, b} end
    end
  end
  return out
end

-- Each parameter's first name.
local function parameter_names(model)
  local names = {}
  for fqn, p in model:named_parameters() do if not names[p] then names[p] = fqn end end
  return names
end

local function offload(t) -- a meta tensor has no data to move: it stays as it is
  if Tensor.is_meta(t) or t._c.storage.pool == 0 then return t end
  return t:to("cpu")
end

-- A state-dict value for tensor t laid out like parameter p: t itself (detached), a DTensor
-- over p's mesh for a sharded p, its full tensor with full_state_dict.
local function export(t, p, opts)
  local value = t:detach()
  if DTensor.is_dtensor(p) then
    if not opts.full_state_dict then
      return DTensor.new(opts.cpu_offload and offload(value) or value, p.device_mesh, p.placements, p:shape())
    end
    value = DTensor.new(value, p.device_mesh, p.placements, p:shape()):full_tensor()
  end
  return opts.cpu_offload and offload(value) or value
end

local function local_of(t) return DTensor.is_dtensor(t) and t:to_local() or t end

-- ---- getting ----

-- get_model_state_dict(model, {full_state_dict, cpu_offload}): fqn -> tensor or DTensor.
local function get_model(model, opts)
  local out = {}
  for _, entry in ipairs(model_entries(model)) do
    local fqn, value = entry[1], entry[2]
    out[fqn] = export(local_of(value), value, opts)
  end
  return out
end

function M.get_model_state_dict(model, opts)
  local what = "get_model_state_dict"
  check_model(model, what)
  return get_model(model, options(opts, what))
end

-- A Lua array as PyTorch's list: keys 0 .. n-1.
local function zero_based(list)
  local out = {}
  for i, v in ipairs(list) do out[i - 1] = v end
  return out
end

local function one_based(list)
  if list[0] == nil then return list end
  local out = {}
  local i = 0
  while list[i] ~= nil do
    out[i + 1] = list[i]
    i = i + 1
  end
  return out
end

local function is_array(v) return type(v) == "table" and getmetatable(v) == nil and v[1] ~= nil end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- get_optimizer_state_dict(model, optimizers, opts): {state = {fqn = {step =, exp_avg =, ...}},
-- param_groups = {[0] = {lr =, betas = {[0] =, [1] =}, ..., params = {[0] = fqn, ...}}}}.
-- Parameters without state get the state a first step would make (zeros, step 0).
local function get_optimizers(model, optimizers, opts, what)
  local names = parameter_names(model)
  local out = {state = {}, param_groups = {}}
  local index = 0
  for o, opt in ipairs(optimizers) do
    if opt._init_state then opt:_init_state() end
    for g, group in ipairs(opt.param_groups) do
      local entry = {}
      for key, value in pairs(group) do
        if key ~= "params" then entry[key] = is_array(value) and zero_based(value) or value end
      end
      local params = {}
      for i, p in ipairs(group.params) do
        local fqn = names[p]
        if not fqn then
          fail(what, "parameter %d of param group %d of optimizer %d is not a parameter of the model", i - 1, g - 1, o)
        end
        params[i] = fqn
        local state = opt.state[p]
        if state then
          local copy = {}
          for _, key in ipairs(sorted_keys(state)) do -- full tensors gather: the same order on every rank
            local value = state[key]
            copy[key] = Tensor.is_tensor(value) and export(value, p, opts) or value
          end
          out.state[fqn] = copy
        end
      end
      entry.params = zero_based(params)
      out.param_groups[index] = entry
      index = index + 1
    end
  end
  return out
end

function M.get_optimizer_state_dict(model, optimizers, opts)
  local what = "get_optimizer_state_dict"
  check_model(model, what)
  opts = options(opts, what)
  return get_optimizers(model, optimizer_list(optimizers, what), opts, what)
end

-- get_state_dict(model, optimizers, opts) -> model state dict, optimizer state dict.
function M.get_state_dict(model, optimizers, opts)
  local what = "get_state_dict"
  check_model(model, what)
  opts = options(opts, what)
  local osd = get_optimizers(model, optimizer_list(optimizers, what), opts, what)
  return get_model(model, opts), osd
end

-- ---- setting: every check first, then the copies ----

local function is_tensor_like(v) return Tensor.is_tensor(v) or DTensor.is_dtensor(v) end

local function check_data(fqn, t, whose, what)
  if Tensor.is_meta(t) then
    fail(what, "'%s' of the %s is a meta tensor (%s %s, no data); materialise it first (fsdp.FSDP with " ..
         "param_init_fn, or module:to_empty() and an initialiser)", fqn, whose, tostring(t:shape()), t:dtype())
  end
end

local function check_value(fqn, target, source, what)
  if not is_tensor_like(source) then
    fail(what, "the value for '%s' is a %s, not a tensor", fqn, type(source))
  end
  check_data(fqn, target, "model", what)
  check_data(fqn, source, "state dict", what)
  local want, got = target:shape(), source:shape()
  if not (want == got) then
    fail(what, "shape mismatch for '%s': the state dict has %s, the model has %s", fqn, tostring(got), tostring(want))
  end
  local td, sd = target:dtype(), source:dtype()
  if td ~= sd and not (FLOATING[td] and FLOATING[sd]) then
    fail(what, "dtype mismatch for '%s': the state dict has %s, the model has %s", fqn, sd, td)
  end
end

-- This rank's rows of full tensor for DTensor target (nil when it holds none).
local function local_rows(full, target)
  local mesh_dim = target._shard_dim
  if not mesh_dim then return full end
  local mesh = target.device_mesh
  local start, length = placement.shard_range(target:size(0), mesh:size(mesh_dim), mesh:get_local_rank(mesh_dim))
  return length > 0 and full:narrow(0, start, length) or nil
end

-- Copy source (a tensor or DTensor of target's global shape) into target (a tensor, or a
-- DTensor whose local rows are written), casting between float dtypes.
local function import(target, source, what)
  local dst = local_of(target)
  local value, made = nil, nil
  if DTensor.is_dtensor(target) then
    if DTensor.is_dtensor(source) and source._shard_dim == target._shard_dim and
       source.device_mesh == target.device_mesh and source:to_local():shape() == dst:shape() then
      value = source:to_local()
    else
      local full = source
      if DTensor.is_dtensor(source) then
        full = source:full_tensor()
        made = full
      end
      value = local_rows(full, target)
    end
  else
    value = source
    if DTensor.is_dtensor(source) then
      value = source:full_tensor()
      made = value
    end
  end
  if value and value._c ~= dst._c then
    check(lib.ms_copy(dst._c, value._c), what)
    dst:_bump_version()
  end
  if made then made:_release() end
end

-- Plan a model load: the copies to make and the keys that did not match.
local function plan_model(model, msd, opts, what)
  if type(msd) ~= "table" or getmetatable(msd) ~= nil then
    fail(what, "the model state dict must be a table, got %s", type(msd))
  end
  local copies, known, missing, unexpected = {}, {}, {}, {}
  for _, entry in ipairs(model_entries(model)) do
    local fqn, target = entry[1], entry[2]
    known[fqn] = true
    local source = msd[fqn]
    if source == nil then
      missing[#missing + 1] = fqn
    else
      copies[#copies + 1] = {fqn = fqn, target = target, source = source}
    end
  end
  for key in pairs(msd) do
    if not known[key] then unexpected[#unexpected + 1] = tostring(key) end
  end
  table.sort(missing)
  table.sort(unexpected)
  if opts.strict and (#missing > 0 or #unexpected > 0) then
    fail(what, "the model state dict does not match the model (nothing was loaded; strict = false loads " ..
         "the keys that match): %s", state_keys.describe(missing, unexpected))
  end
  for _, c in ipairs(copies) do check_value(c.fqn, c.target, c.source, what) end
  return copies, {missing_keys = missing, unexpected_keys = unexpected}
end

local function state_target(opt, p)
  local state = opt.state[p]
  if not state then
    state = {}
    opt.state[p] = state
  end
  return state
end

-- Plan an optimizer load: hyper-parameters per group, state copies, unmatched fqns.
local function plan_optimizers(model, optimizers, osd, opts, what)
  if type(osd) ~= "table" or type(osd.state) ~= "table" or type(osd.param_groups) ~= "table" then
    fail(what, "the optimizer state dict must be a table with state and param_groups")
  end
  local names = parameter_names(model)
  local groups, by_fqn = {}, {}
  for o, opt in ipairs(optimizers) do
    if opt._init_state then opt:_init_state() end
    for g, group in ipairs(opt.param_groups) do
      groups[#groups + 1] = group
      for i, p in ipairs(group.params) do
        local fqn = names[p]
        if not fqn then
          fail(what, "parameter %d of param group %d of optimizer %d is not a parameter of the model", i - 1, g - 1, o)
        end
        by_fqn[fqn] = {opt = opt, param = p}
      end
    end
  end
  local saved_groups = one_based(osd.param_groups)
  if #saved_groups ~= #groups then
    fail(what, "the optimizer state dict has %d param groups, the optimizers have %d", #saved_groups, #groups)
  end
  local missing, unexpected = {}, {}
  for fqn in pairs(by_fqn) do
    if osd.state[fqn] == nil then missing[#missing + 1] = fqn end
  end
  for fqn in pairs(osd.state) do
    if not by_fqn[fqn] then unexpected[#unexpected + 1] = tostring(fqn) end
  end
  table.sort(missing)
  table.sort(unexpected)
  if opts.strict and (#missing > 0 or #unexpected > 0) then
    fail(what, "the optimizer state dict does not match the optimizers' parameters (nothing was loaded; " ..
         "strict = false loads the keys that match): %s", state_keys.describe(missing, unexpected))
  end
  local hyper = {}
  for g, saved in ipairs(saved_groups) do
    if type(saved) ~= "table" then fail(what, "param group %d is a %s, not a table", g - 1, type(saved)) end
    local listed, held = {}, {}
    for _, fqn in ipairs(one_based(type(saved.params) == "table" and saved.params or {})) do listed[fqn] = true end
    for _, p in ipairs(groups[g].params) do held[names[p]] = true end
    for fqn in pairs(held) do
      if not listed[fqn] and opts.strict then
        fail(what, "param group %d of the state dict does not hold '%s', which the optimizer's group %d does", g - 1, fqn, g - 1)
      end
    end
    local values = {}
    for key, value in pairs(saved) do
      if key ~= "params" then values[key] = type(value) == "table" and one_based(value) or value end
    end
    hyper[g] = values
  end
  local copies = {}
  for _, group in ipairs(groups) do
    for _, p in ipairs(group.params) do
      local fqn = names[p]
      local saved = osd.state[fqn]
      if saved ~= nil then
        if type(saved) ~= "table" then fail(what, "the state of '%s' is a %s, not a table", fqn, type(saved)) end
        for _, key in ipairs(sorted_keys(saved)) do
          local value = saved[key]
          local where = fqn .. "." .. tostring(key)
          if is_tensor_like(value) then check_value(where, p, value, what) end
          copies[#copies + 1] = {where = where, owner = by_fqn[fqn], key = key, source = value}
        end
      end
    end
  end
  return {groups = groups, hyper = hyper, copies = copies}, {missing_keys = missing, unexpected_keys = unexpected}
end

local function apply_model(copies, what)
  autograd.no_grad(function()
    for _, c in ipairs(copies) do import(c.target, c.source, what) end
  end)
end

local function apply_optimizers(plan, what)
  for g, group in ipairs(plan.groups) do
    for key, value in pairs(plan.hyper[g]) do group[key] = value end
  end
  autograd.no_grad(function()
    for _, c in ipairs(plan.copies) do
      local p, state = c.owner.param, state_target(c.owner.opt, c.owner.param)
      if is_tensor_like(c.source) then
        local shard = local_of(p)
        local t = state[c.key]
        if not Tensor.is_tensor(t) then
          t = scope.keep(Tensor.empty_raw(shard:shape(), shard._c.dtype, shard._c.storage.pool))
          state[c.key] = t
        end
        local target = DTensor.is_dtensor(p) and DTensor.new(t, p.device_mesh, p.placements, p:shape()) or t
        import(target, c.source, what)
      else
        state[c.key] = c.source
      end
    end
  end)
end

-- set_model_state_dict(model, model_state_dict, {strict = true}) -> {missing_keys, unexpected_keys}.
-- Values may be DTensors of any layout or full tensors; every key, shape and dtype is checked
-- before anything is copied.
function M.set_model_state_dict(model, msd, opts)
  local what = "set_model_state_dict"
  check_model(model, what)
  opts = options(opts, what)
  local copies, report = plan_model(model, msd, opts, what)
  apply_model(copies, what)
  return report
end

-- set_optimizer_state_dict(model, optimizers, optim_state_dict, {strict = true}); a fresh
-- optimizer loads directly.
function M.set_optimizer_state_dict(model, optimizers, osd, opts)
  local what = "set_optimizer_state_dict"
  check_model(model, what)
  opts = options(opts, what)
  local plan, report = plan_optimizers(model, optimizer_list(optimizers, what), osd, opts, what)
  apply_optimizers(plan, what)
  return report
end

-- set_state_dict(model, optimizers, {model_state_dict =, optim_state_dict =}, opts): both
-- checked before either is loaded. Returns the model's {missing_keys, unexpected_keys} with
-- the optimizers' under optim.
function M.set_state_dict(model, optimizers, state, opts)
  local what = "set_state_dict"
  check_model(model, what)
  opts = options(opts, what)
  if type(state) ~= "table" or (state.model_state_dict == nil and state.optim_state_dict == nil) then
    fail(what, "expected {model_state_dict = ..., optim_state_dict = ...} as the third argument")
  end
  for key in pairs(state) do
    if key ~= "model_state_dict" and key ~= "optim_state_dict" then
      fail(what, "unknown key '%s' in the third argument (expected model_state_dict, optim_state_dict)", tostring(key))
    end
  end
  local list = optimizer_list(optimizers, what)
  local copies, report = {}, {missing_keys = {}, unexpected_keys = {}}
  if state.model_state_dict ~= nil then copies, report = plan_model(model, state.model_state_dict, opts, what) end
  local plan
  if state.optim_state_dict ~= nil then
    plan, report.optim = plan_optimizers(model, list, state.optim_state_dict, opts, what)
  end
  apply_model(copies, what)
  if plan then apply_optimizers(plan, what) end
  return report
end

return M
