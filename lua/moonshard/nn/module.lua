-- nn.Module: PyTorch-style modules with ordered registration of parameters, buffers and
-- children (names like "ffn.0.weight"), hooks, state dicts and train/eval.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local scope = require "moonshard.scope"
local traceback = require "moonshard.traceback"
local state_keys = require "moonshard.state_keys"

local fail, is_callable = C.fail, C.is_callable

local Module = {__name = "Module"}
Module.__index = Module

local function is_module(v)
  return type(v) == "table" and rawget(v, "_modules") ~= nil
end
Module.is_module = is_module

-- Mark t as a parameter: a leaf that requires grad and is never a scope temporary.
local function Parameter(t, requires_grad)
  if not Tensor.is_tensor(t) then fail("Parameter", "expected a tensor, got %s", type(t)) end
  if t.grad_fn then t = t:detach() end
  t._is_param = true
  t.requires_grad = requires_grad ~= false or nil
  return scope.keep(t)
end
Module.Parameter = Parameter

local function ordered_set(registry, order, name, value)
  if registry[name] == nil then order[#order + 1] = name end
  registry[name] = value
end

local function ordered_remove(registry, order, name)
  if registry[name] == nil then return end
  registry[name] = nil
  for i, n in ipairs(order) do
    if n == name then table.remove(order, i) break end
  end
end

-- Instances resolve parameters, buffers and children before methods; in list containers
-- (Sequential, ModuleList) a number i is child "i-1".
local function instance_index(self, key)
  if type(key) == "number" then
    return rawget(self, "_class").__numbered_children and rawget(self, "_modules")[tostring(key - 1)] or nil
  end
  local params = rawget(self, "_parameters")
  local v = params[key]
  if v ~= nil then return v end
  v = rawget(self, "_modules")[key]
  if v ~= nil then return v end
  v = rawget(self, "_buffers")[key]
  if v ~= nil then return v end
  return rawget(self, "_class")[key]
end

local function instance_newindex(self, key, value)
  local params, modules, buffers = rawget(self, "_parameters"), rawget(self, "_modules"), rawget(self, "_buffers")
  if is_module(value) then
    ordered_remove(params, self._param_order, key)
    ordered_set(modules, self._module_order, key, value)
  elseif Tensor.is_tensor(value) and value._is_param then
    if Tensor.is_meta(value) and not rawget(value, "_meta_name") then rawset(value, "_meta_name", key) end
    local old = params[key]
    if old ~= nil and old ~= value and rawget(old, "_init_calls") then -- a tie on a meta build
      local replaced = rawget(self, "_init_replaced") or {}
      replaced[key] = (replaced[key] or 0) + old._init_calls
      rawset(self, "_init_replaced", replaced)
    end
    ordered_remove(modules, self._module_order, key)
    ordered_set(params, self._param_order, key, value)
  elseif params[key] ~= nil and value == nil then
    ordered_remove(params, self._param_order, key)
  elseif modules[key] ~= nil and value == nil then
    ordered_remove(modules, self._module_order, key)
  elseif buffers[key] ~= nil then
    if value == nil then ordered_remove(buffers, self._buffer_order, key)
    else buffers[key] = scope.keep(value) end
  else
    if Tensor.is_tensor(value) then scope.keep(value) end
    rawset(self, key, value)
  end
end

local function instance_call(self, ...)
  return self:_call(...)
end

local function instance_tostring(self) return self:_repr("") end

-- Make a subclass: local Model = nn.Module:extend("Model").
function Module:extend(name)
  local class = setmetatable({__name = name or "Module", __parent = self}, {__index = self, __call = function(cls, ...)
    return cls:new(...)
  end})
  class.__index = class
  return class
end

-- Create an instance and run __init.
function Module:new(...)
  local instance = {
    _class = self, _parameters = {}, _param_order = {}, _modules = {}, _module_order = {},
    _buffers = {}, _buffer_order = {}, _non_persistent = {}, training = true,
    _forward_pre_hooks = {}, _forward_hooks = {}, _state_dict_pre_hooks = {}, _state_dict_hooks = {},
    _load_state_dict_pre_hooks = {}, _load_state_dict_post_hooks = {}, _call_wrappers = {},
  }
  setmetatable(instance, {
    __index = instance_index, __newindex = instance_newindex, __call = instance_call,
    __tostring = instance_tostring, __module = true,
  })
  if self.__init then self.__init(instance, ...) end
  return instance
end

-- A module instance's class, then each class it derives from, up to Module. Called as
-- Module.class_chain(instance), so an instance field of that name changes nothing.
function Module.class_chain(instance)
  local classes, c = {}, rawget(instance, "_class")
  while type(c) == "table" do
    classes[#classes + 1] = c
    c = rawget(c, "__parent")
  end
  return classes
end

-- True when the instance's class is class or derives from it (Python's isinstance).
function Module:is_instance_of(class)
  for _, c in ipairs(Module.class_chain(self)) do
    if c == class then return true end
  end
  return false
end

function Module:forward()
  fail(self.__name or "Module", "forward is not implemented")
end

local function run_call(self, ...)
  if #self._forward_pre_hooks == 0 and #self._forward_hooks == 0 then
    local output = self:forward(...) -- not a tail call: tracebacks name the forward
    return output
  end
  local args = {...}
  local nargs = select("#", ...)
  for _, hook in ipairs(self._forward_pre_hooks) do
    local replaced = hook(self, args)
    if replaced ~= nil then args, nargs = replaced, table.maxn(replaced) end
  end
  local output = self:forward(unpack(args, 1, nargs))
  for _, hook in ipairs(self._forward_hooks) do
    local replaced = hook(self, args, output)
    if replaced ~= nil then output = replaced end
  end
  return output
end

-- The call in its scope; an error leaves its traceback with moonshard.traceback.
local function scoped_call(self, ...)
  return scope.close(scope.enter(), xpcall(run_call, traceback.remember, self, ...))
end

-- The call through wrappers i, i - 1, ..., 1 (the last registered outermost). The closure a
-- wrapper gets is made apart, so a call without wrappers closes no upvalues (which LuaJIT
-- cannot compile).
local call_through
local function wrapped_call(self, i, ...)
  return self._call_wrappers[i](function(...) return call_through(self, i - 1, ...) end, ...)
end
call_through = function(self, i, ...)
  if i == 0 then return scoped_call(self, ...) end
  return wrapped_call(self, i, ...)
end

local SIGNAL_NAMES = {[2] = "SIGINT", [15] = "SIGTERM"}

-- module(...) runs hooks and forward in a scope: temporaries of the call are released as
-- soon as it returns (tensors saved for backward keep their own references); an error
-- leaves its traceback with moonshard.traceback (ms.traceback). A pending
-- SIGINT or SIGTERM (ms_interrupt_*, ms.h) stops it here, so compiled loops notice it.
function Module:_call(...)
  if C.lib.ms_interrupt_pending() ~= 0 then
    local sig = C.lib.ms_interrupt_take()
    fail(self.__name or "Module", "interrupted by %s", SIGNAL_NAMES[sig] or "a signal")
  end
  if not scope.active() then traceback.forget() end
  return call_through(self, #self._call_wrappers, ...)
end

-- True when calling the module runs exactly the forward of `class` (its own class): no
-- hooks, no call wrappers (FSDP, activation checkpointing), no forward replaced on the
-- instance. A caller may then fuse the call with its neighbour's (nn.Sequential's Linear ->
-- GELU) without skipping anything the module's call would do.
function Module:_plain_call(class)
  return rawget(self, "_class") == class and rawget(self, "forward") == nil and #self._forward_pre_hooks == 0
         and #self._forward_hooks == 0 and #self._call_wrappers == 0
end

-- Add hook to a hook list; returns a handle whose remove() takes it out again.
local function add_hook(hooks, hook)
  hooks[#hooks + 1] = hook
  return {remove = function() for i, h in ipairs(hooks) do if h == hook then table.remove(hooks, i) break end end end}
end

-- around(call, ...) runs the module's whole call (its hooks and forward) as call(...), e.g.
-- inside a checkpointed region; returns a handle with remove().
function Module:register_call_wrapper(around) return add_hook(self._call_wrappers, around) end

-- hook(module, args) -> nil or a replacement args array.
function Module:register_forward_pre_hook(hook) return add_hook(self._forward_pre_hooks, hook) end

-- hook(module, args, output) -> nil or a replacement output.
function Module:register_forward_hook(hook) return add_hook(self._forward_hooks, hook) end

-- State-dict hooks, as PyTorch's, run for the module state_dict / load_state_dict is called
-- on: hook(module, prefix) before state_dict; hook(module, state_dict, prefix) -> nil or a
-- replacement table after it; hook(module, state_dict, strict) -> nil or a replacement table
-- before load_state_dict copies; hook(module, {missing_keys, unexpected_keys}) after it.
function Module:register_state_dict_pre_hook(hook) return add_hook(self._state_dict_pre_hooks, hook) end
function Module:register_state_dict_post_hook(hook) return add_hook(self._state_dict_hooks, hook) end
function Module:register_load_state_dict_pre_hook(hook) return add_hook(self._load_state_dict_pre_hooks, hook) end
function Module:register_load_state_dict_post_hook(hook) return add_hook(self._load_state_dict_post_hooks, hook) end

-- A wrapper that synchronises gradients (FSDP) says how to pause it: handler(module, fn, ...)
-- runs fn(...) without synchronising and returns its results. The last registered wins;
-- returns a handle with remove().
function Module:register_no_sync_handler(handler)
  if not is_callable(handler) then fail("register_no_sync_handler", "handler must be callable, got %s", type(handler)) end
  rawset(self, "_no_sync_handler", handler)
  return {remove = function() if rawget(self, "_no_sync_handler") == handler then rawset(self, "_no_sync_handler", nil) end end}
end

-- module:no_sync(fn, ...) runs fn(...) with gradient synchronisation off (gradients
-- accumulate locally), through the handler its wrapper registered; returns fn's results.
function Module:no_sync(fn, ...)
  local handler = rawget(self, "_no_sync_handler")
  if not handler then
    fail("no_sync", "%s does not synchronise gradients (wrap it with FSDP first)", self.__name or "Module")
  end
  return handler(self, fn, ...)
end

function Module:register_parameter(name, t)
  if t == nil then
    ordered_set(self._parameters, self._param_order, name, nil)
    return
  end
  self[name] = Parameter(t)
end

-- Replace the value registered as parameter name (a tensor or a DTensor) in its place; no
-- Parameter wrapping (FSDP swaps sharded and unsharded values this way).
function Module:set_parameter(name, value)
  if self._parameters[name] == nil then fail("set_parameter", "%s has no parameter '%s'", self.__name or "Module", tostring(name)) end
  self._parameters[name] = value
end

-- Replace the value of buffer name in its place.
function Module:set_buffer(name, t)
  if self._buffers[name] == nil then fail("set_buffer", "%s has no buffer '%s'", self.__name or "Module", tostring(name)) end
  self._buffers[name] = t and scope.keep(t)
end

function Module:register_buffer(name, t, persistent)
  if t ~= nil and not Tensor.is_tensor(t) then fail("register_buffer", "'%s' must be a tensor", name) end
  ordered_set(self._buffers, self._buffer_order, name, t and scope.keep(t))
  self._non_persistent[name] = persistent == false or nil
end

function Module:add_module(name, module)
  if not is_module(module) then fail("add_module", "'%s' is not a module", tostring(name)) end
  ordered_set(self._modules, self._module_order, name, module)
end

-- ---- traversal ----

function Module:named_children()
  local order, i = self._module_order, 0
  return function()
    i = i + 1
    local name = order[i]
    if name then return name, self._modules[name] end
  end
end

function Module:children()
  local next_child = self:named_children()
  return function()
    local _, m = next_child()
    return m
  end
end

local function collect_modules(module, prefix, out, seen)
  if seen[module] then return end
  seen[module] = true
  out[#out + 1] = {prefix, module}
  for _, name in ipairs(module._module_order) do
    local child = module._modules[name]
    collect_modules(child, prefix == "" and name or prefix .. "." .. name, out, seen)
  end
end

local function iterate(list)
  local i = 0
  return function()
    i = i + 1
    local entry = list[i]
    if entry then return entry[1], entry[2] end
  end
end

function Module:named_modules()
  local list = {}
  collect_modules(self, "", list, {})
  return iterate(list)
end

function Module:modules()
  local iter = self:named_modules()
  return function()
    local _, m = iter()
    return m
  end
end

-- Members in registration order; a tensor reachable under several names is listed once
-- unless keep_duplicates (state dicts list tied weights under every name, as PyTorch's do;
-- named_parameters / named_buffers take {remove_duplicate = false} for it).
local function named_members(self, registry_name, order_name, recurse, keep_duplicates)
  local list, seen = {}, {}
  local modules = {}
  if recurse == false then modules = {{"", self}} else collect_modules(self, "", modules, {}) end
  for _, entry in ipairs(modules) do
    local prefix, module = entry[1], entry[2]
    local registry = module[registry_name]
    for _, name in ipairs(module[order_name]) do
      local value = registry[name]
      if value and (keep_duplicates or not seen[value]) then
        seen[value] = true
        list[#list + 1] = {prefix == "" and name or prefix .. "." .. name, value}
      end
    end
  end
  return list
end

function Module:named_parameters(opts)
  return iterate(named_members(self, "_parameters", "_param_order", opts and opts.recurse,
                               opts and opts.remove_duplicate == false))
end

function Module:named_buffers(opts)
  return iterate(named_members(self, "_buffers", "_buffer_order", opts and opts.recurse,
                               opts and opts.remove_duplicate == false))
end

function Module:parameters(opts)
  local out = {}
  for _, entry in ipairs(named_members(self, "_parameters", "_param_order", opts and opts.recurse)) do
    out[#out + 1] = entry[2]
  end
  return out
end

function Module:buffers()
  local out = {}
  for _, entry in ipairs(named_members(self, "_buffers", "_buffer_order")) do out[#out + 1] = entry[2] end
  return out
end

-- fn(module) on every submodule (children first) and then on self.
function Module:apply(fn)
  for child in self:children() do child:apply(fn) end
  fn(self)
  return self
end

function Module:train(mode)
  if mode == nil then mode = true end
  if type(mode) ~= "boolean" then fail("train", "mode must be a boolean, got %s", type(mode)) end
  self:apply(function(m) rawset(m, "training", mode) end)
  return self
end

function Module:eval() return self:train(false) end

-- Drop gradients (set_to_none, the default, releases them; false fills them with zeros).
function Module:zero_grad(set_to_none)
  for _, p in ipairs(self:parameters()) do
    local grad = rawget(p, "grad")
    if grad then
      if set_to_none == false then
        autograd.no_grad(function() grad:zero_() end)
      else
        p.grad = nil
        if Tensor.is_tensor(grad) then grad:_release() elseif grad.release then grad:release() end
      end
    end
    -- FSDP drops what no_sync accumulated outside p.grad
    local on_zero = rawget(p, "_on_zero_grad")
    if on_zero then on_zero(p, set_to_none) end
  end
end

-- ---- state dicts ----

-- What a state dict holds, in registration order: {name, value, is_buffer} for every
-- parameter and persistent buffer, under each of its names (tied tensors appear under all).
function Module:state_dict_entries()
  local out = {}
  for _, entry in ipairs(named_members(self, "_parameters", "_param_order", true, true)) do
    out[#out + 1] = {entry[1], entry[2], false}
  end
  local modules = {}
  collect_modules(self, "", modules, {})
  for _, entry in ipairs(modules) do
    local prefix, m = entry[1], entry[2]
    for _, name in ipairs(m._buffer_order) do
      local b = m._buffers[name]
      if b and not m._non_persistent[name] then out[#out + 1] = {prefix == "" and name or prefix .. "." .. name, b, true} end
    end
  end
  return out
end

function Module:state_dict(opts)
  local out = {}
  local prefix = opts and opts.prefix or ""
  for _, hook in ipairs(self._state_dict_pre_hooks) do hook(self, prefix) end
  for _, entry in ipairs(self:state_dict_entries()) do out[prefix .. entry[1]] = entry[2]:detach() end
  for _, hook in ipairs(self._state_dict_hooks) do out = hook(self, out, prefix) or out end
  return out
end

-- Copy values of sd into parameters and buffers; strict (default) requires the same keys.
function Module:load_state_dict(sd, opts)
  if type(sd) ~= "table" then fail("load_state_dict", "expected a table, got %s", type(sd)) end
  local strict = not (opts and opts.strict == false)
  for _, hook in ipairs(self._load_state_dict_pre_hooks) do sd = hook(self, sd, strict) or sd end
  local entries, seen, names = self:state_dict_entries(), {}, {}
  for _, entry in ipairs(entries) do
    if not seen[entry[1]] then seen[entry[1]] = true; names[#names + 1] = entry[1] end
  end
  table.sort(names)
  local missing, unexpected = state_keys.compare(names, sd)
  if strict and (#missing > 0 or #unexpected > 0) then
    fail("load_state_dict", "%s", state_keys.describe(missing, unexpected))
  end
  -- every value checked before any is copied; then copied in registration order, so a tensor
  -- with several names (tied, shared) ends with its last name's value, as PyTorch's
  local copies = {}
  for _, entry in ipairs(entries) do
    local name, target = entry[1], entry[2]
    local value = sd[name]
    if value ~= nil then
      if type(value) == "table" and value.full_tensor and not Tensor.is_tensor(value) then
        value = value:full_tensor()
      end
      if not Tensor.is_tensor(value) then
        fail("load_state_dict", "value for '%s' is %s, not a tensor", name, type(value))
      end
      local target_tensor = Tensor.is_tensor(target) and target or target:to_local()
      if not (value:shape() == target_tensor:shape()) then
        fail("load_state_dict", "size mismatch for '%s': checkpoint has shape %s, model has %s",
             name, tostring(value:shape()), tostring(target_tensor:shape()))
      end
      copies[#copies + 1] = {target_tensor, value}
    end
  end
  autograd.no_grad(function()
    for _, copy in ipairs(copies) do copy[1]:copy_(copy[2]) end
  end)
  local result = {missing_keys = missing, unexpected_keys = unexpected}
  for _, hook in ipairs(self._load_state_dict_post_hooks) do hook(self, result) end
  return result
end

-- ---- moving ----

function Module:to(target)
  local modules = {}
  for _, m in self:named_modules() do modules[#modules + 1] = m end
  autograd.no_grad(function()
    for _, module in ipairs(modules) do
      for _, name in ipairs(module._param_order) do
        local p = module._parameters[name]
        local moved = p:to(target)
        if moved ~= p then
          module._parameters[name] = Parameter(moved, p.requires_grad)
        end
      end
      for _, name in ipairs(module._buffer_order) do
        local b = module._buffers[name]
        module._buffers[name] = scope.keep(b:to(target))
      end
    end
  end)
  return self
end

-- Give every meta parameter and buffer uninitialised storage on device ("cpu" by default);
-- an initialiser then replays the random counters the meta tensor's initialisation drew.
function Module:to_empty(opts)
  local device = opts and opts.device or "cpu"
  local pool = Tensor.pool_id(device, "to_empty")
  local function materialise(t)
    local fresh = Tensor.empty_raw(t:shape(), Tensor.dtype_id(t:dtype(), "to_empty"), pool)
    rawset(fresh, "_init_draws", rawget(t, "_init_draws"))
    return fresh
  end
  local done = {}
  for _, module in self:named_modules() do
    for _, name in ipairs(module._param_order) do
      local p = module._parameters[name]
      if Tensor.is_meta(p) then
        done[p] = done[p] or Parameter(materialise(p), p.requires_grad)
        module._parameters[name] = done[p]
      end
    end
    for _, name in ipairs(module._buffer_order) do
      local b = module._buffers[name]
      if Tensor.is_meta(b) then module._buffers[name] = scope.keep(materialise(b)) end
    end
  end
  return self
end

function Module:double() return self:to("f64") end
function Module:float() return self:to("f32") end

-- ---- printing ----

function Module:extra_repr() return "" end

function Module:_repr(indent)
  local head = (self.__name or "Module") .. "(" .. self:extra_repr()
  if #self._module_order == 0 then return head .. ")" end
  local lines = {head}
  for _, name in ipairs(self._module_order) do
    lines[#lines + 1] = indent .. "  (" .. name .. "): " .. self._modules[name]:_repr(indent .. "  ")
  end
  lines[#lines + 1] = indent .. ")"
  return table.concat(lines, "\n")
end

return Module
