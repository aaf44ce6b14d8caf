-- Optimizers with PyTorch's update formulas (SGD with momentum/nesterov, Adam, AdamW),
-- param groups and state dicts; each step is one fused C loop per parameter (Adam's
-- parameters at one step count share one).
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local scope = require "moonshard.scope"
local raw = require "moonshard.ops.raw"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

-- Sharded parameters (DTensors) are stepped through their local tensors.
local function local_of(t)
  if t == nil or Tensor.is_tensor(t) then return t end
  return t:to_local()
end

local function non_negative(name, group, key)
  local v = group[key]
  if type(v) ~= "number" or not (v >= 0 and v < math.huge) then
    fail(name, "%s must be a finite non-negative number, got %s", key, tostring(v))
  end
end

local Optimizer = {}
Optimizer.__index = Optimizer
M.Optimizer = Optimizer

local function new_optimizer(class, name, params, opts, defaults)
  if type(params) ~= "table" or #params == 0 then
    fail(name, "params must be a non-empty array of tensors or of param groups")
  end
  opts = opts or {}
  for key, value in pairs(opts) do
    if defaults[key] == nil then fail(name, "unknown option '%s'", tostring(key)) end
    defaults[key] = value
  end
  local self = setmetatable({name = name, defaults = defaults, param_groups = {}, state = {},
                             _grouped = {}}, class)
  local groups = (type(params[1]) == "table" and params[1].params) and params or {{params = params}}
  for _, group in ipairs(groups) do self:add_param_group(group) end
  return self
end

function Optimizer:add_param_group(group)
  if type(group) ~= "table" then fail(self.name, "a param group must be a table, got %s", type(group)) end
  local entry = {params = {}}
  for key, value in pairs(self.defaults) do entry[key] = value end
  for key, value in pairs(group) do if key ~= "params" then entry[key] = value end end
  if type(entry.lr) ~= "number" or not (entry.lr >= 0 and entry.lr < math.huge) then
    fail(self.name, "lr must be a finite non-negative number, got %s", tostring(entry.lr))
  end
  if type(group.params) ~= "table" then
    fail(self.name, "a param group's params must be an array of tensors, got %s", type(group.params))
  end
  self:check_group(entry)
  for i, p in ipairs(group.params) do
    if type(p) ~= "table" or not (Tensor.is_tensor(p) or p.to_local) then
      fail(self.name, "parameter %d is %s, not a tensor", i, type(p))
    end
    if rawget(p, "_released_param") then
      fail(self.name, "parameter %d was replaced when its module was wrapped; build the optimizer " ..
           "after wrapping (over model:parameters() of the wrapped model)", i)
    end
    if self._grouped[p] then fail(self.name, "parameter %d appears more than once in the param groups", i) end
    self._grouped[p] = true
    entry.params[#entry.params + 1] = p
  end
  self.param_groups[#self.param_groups + 1] = entry
end

-- Drop the gradients of every parameter (set_to_none by default).
function Optimizer:zero_grad(set_to_none)
  for _, group in ipairs(self.param_groups) do
    for _, p in ipairs(group.params) do
      local grad = rawget(p, "grad")
      if grad then
        if set_to_none == false then
          check(lib.ms_fill(local_of(grad)._c, 0), "zero_grad")
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
end

local function state_tensor(like)
  local t = raw.zeros_like(like)
  return scope.keep(t)
end

function Optimizer:step(closure)
  local loss
  if closure ~= nil and not C.is_callable(closure) then
    fail(self.name, "step: the closure must be callable, got %s", type(closure))
  end
  if closure then loss = closure() end
  for _, group in ipairs(self.param_groups) do
    -- the group's parameters with a gradient, their gradients and states, stepped together
    local params, grads, states = {}, {}, {}
    for _, p in ipairs(group.params) do
      if rawget(p, "_released_param") then
        fail(self.name, "a parameter was released (its module was wrapped after this optimizer " ..
             "was built); build the optimizer over the wrapped model's parameters")
      end
      local grad = rawget(p, "grad")
      if grad ~= nil then
        local param_local = local_of(p)
        if rawget(param_local, "_c") == nil then
          fail(self.name, "a parameter's storage was released; build the optimizer over the wrapped " ..
               "model's parameters")
        end
        local state = self.state[p]
        if not state then
          state = {step = 0}
          self.state[p] = state
        end
        local n = #params + 1
        params[n], grads[n], states[n] = param_local, local_of(grad), state
      end
    end
    self:update_all(group, params, grads, states)
    for _, p in ipairs(params) do p:_bump_version() end
  end
  return loss
end

-- Step a group's parameters (with their gradients and states) one at a time; an optimizer
-- that can step several at once replaces this.
function Optimizer:update_all(group, params, grads, states)
  for i = 1, #params do self:update(group, params[i], grads[i], states[i]) end
end

-- Give every parameter without state the state a first step would make (zeros, step 0),
-- so a checkpoint can be loaded into a fresh optimizer; training from it is unchanged.
function Optimizer:_init_state()
  for _, group in ipairs(self.param_groups) do
    for _, p in ipairs(group.params) do
      if not self.state[p] then
        local state = {step = 0}
        self:init_group_state(group, local_of(p), state)
        self.state[p] = state
      end
    end
  end
end

-- Optimizer state in PyTorch's layout: state keyed by the parameter's index (0-based,
-- across groups in order), param_groups with hyper-parameters and index lists.
function Optimizer:state_dict()
  local out = {state = {}, param_groups = {}}
  local index = 0
  for _, group in ipairs(self.param_groups) do
    local entry = {params = {}}
    for key, value in pairs(group) do if key ~= "params" then entry[key] = value end end
    for _, p in ipairs(group.params) do
      entry.params[#entry.params + 1] = index
      local state = self.state[p]
      if state then
        local copy = {}
        for key, value in pairs(state) do copy[key] = value end
        out.state[index] = copy
      end
      index = index + 1
    end
    out.param_groups[#out.param_groups + 1] = entry
  end
  return out
end

function Optimizer:load_state_dict(sd)
  if type(sd) ~= "table" or type(sd.param_groups) ~= "table" then
    fail("load_state_dict", "expected an optimizer state dict with param_groups")
  end
  if #sd.param_groups ~= #self.param_groups then
    fail("load_state_dict", "state dict has %d param groups, optimizer has %d", #sd.param_groups, #self.param_groups)
  end
  local params = {}
  for g, group in ipairs(self.param_groups) do
    local saved = sd.param_groups[g]
    if #saved.params ~= #group.params then
      fail("load_state_dict", "param group %d has %d params in the state dict, %d in the optimizer",
           g - 1, #saved.params, #group.params)
    end
    for i, p in ipairs(group.params) do params[saved.params[i]] = p end
    for key, value in pairs(saved) do if key ~= "params" then group[key] = value end end
  end
  self.state = {}
  for index, state in pairs(sd.state or {}) do
    local p = params[index]
    if not p then fail("load_state_dict", "state for unknown parameter index %s", tostring(index)) end
    local copy = {}
    for key, value in pairs(state) do
      if Tensor.is_tensor(value) or (type(value) == "table" and value.to_local) then
        local target = state_tensor(local_of(p))
        check(lib.ms_copy(target._c, local_of(value)._c), "load_state_dict")
        copy[key] = target
      else
        copy[key] = value
      end
    end
    self.state[p] = copy
  end
end

-- ---- SGD ----

local SGD = setmetatable({}, {__index = Optimizer})
SGD.__index = SGD

-- SGD(params, {lr, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false, maximize = false})
function M.SGD(params, opts)
  if not opts or opts.lr == nil then fail("SGD", "lr is required") end
  return new_optimizer(SGD, "SGD", params, opts,
    {lr = 0, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false, maximize = false})
end

function SGD:check_group(group)
  for _, key in ipairs({"momentum", "dampening", "weight_decay"}) do non_negative("SGD", group, key) end
  if group.nesterov and (group.momentum <= 0 or group.dampening ~= 0) then
    fail("SGD", "nesterov momentum requires a momentum and zero dampening")
  end
end

function SGD:init_group_state(group, p, state)
  if group.momentum ~= 0 then state.momentum_buffer = state_tensor(p) end
end

function SGD:update(group, p, grad, state)
  local buf = state.momentum_buffer
  local first = buf == nil or state.step == 0
  if group.momentum ~= 0 and first then
    buf = state_tensor(p)
    state.momentum_buffer = buf
  end
  state.step = state.step + 1
  check(lib.ms_sgd_step(p._c, buf and buf._c, grad._c, group.lr, group.momentum, group.dampening,
                        group.weight_decay, group.nesterov and 1 or 0, first and 1 or 0,
                        group.maximize and 1 or 0), "SGD.step")
end

-- ---- Adam and AdamW ----

local Adam = setmetatable({}, {__index = Optimizer})
Adam.__index = Adam

local function adam(name, decoupled, default_decay)
  return function(params, opts)
    local self = new_optimizer(Adam, name, params, opts,
      {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = default_decay, amsgrad = false,
       maximize = false})
    self.decoupled = decoupled
    return self
  end
end

function Adam:check_group(group)
  local name = self.name
  if type(group.betas) ~= "table" then
    fail(name, "betas must be a pair {beta1, beta2}, got %s", type(group.betas))
  end
  local b1, b2 = group.betas[1], group.betas[2]
  if not (type(b1) == "number" and type(b2) == "number" and b1 >= 0 and b1 < 1 and b2 >= 0 and b2 < 1) then
    fail(name, "betas must be in [0, 1), got {%s, %s}", tostring(b1), tostring(b2))
  end
  non_negative(name, group, "eps")
  non_negative(name, group, "weight_decay")
  if type(group.amsgrad) ~= "boolean" then
    fail(name, "amsgrad must be true or false, got %s", tostring(group.amsgrad))
  end
end

M.Adam = adam("Adam", false, 0)
M.AdamW = adam("AdamW", true, 1e-2)

function Adam:init_group_state(group, p, state)
  state.exp_avg, state.exp_avg_sq = state_tensor(p), state_tensor(p)
  if group.amsgrad then state.max_exp_avg_sq = state_tensor(p) end
end

-- amsgrad: the moments step as in Adam (the fused step with lr 0 leaves the parameter as
-- it is), then the parameter moves by exp_avg over the running maximum of exp_avg_sq:
-- p -= lr / (1 - beta1^t) * exp_avg / (sqrt(max_exp_avg_sq) / sqrt(1 - beta2^t) + eps).
local function amsgrad_step(self, group, p, grad, state)
  local what = self.name .. ".step"
  local b1, b2 = group.betas[1], group.betas[2]
  check(lib.ms_adam_step(p._c, state.exp_avg._c, state.exp_avg_sq._c, grad._c, state.step, 0, b1, b2,
                         group.eps, group.weight_decay, self.decoupled and 1 or 0, group.maximize and 1 or 0), what)
  if self.decoupled and group.weight_decay ~= 0 then
    check(lib.ms_binary_scalar(p._c, p._c, 1 - group.lr * group.weight_decay, raw.MUL, 0), what)
  end
  local max_sq = state.max_exp_avg_sq
  check(lib.ms_binary(max_sq._c, max_sq._c, state.exp_avg_sq._c, raw.MAXIMUM), what)
  local update = Tensor.empty_like_raw(p)
  check(lib.ms_unary(update._c, max_sq._c, raw.SQRT), what)
  check(lib.ms_binary_scalar(update._c, update._c, math.sqrt(1 - b2 ^ state.step), raw.DIV, 0), what)
  check(lib.ms_binary_scalar(update._c, update._c, group.eps, raw.ADD, 0), what)
  check(lib.ms_binary(update._c, state.exp_avg._c, update._c, raw.DIV), what)
  check(lib.ms_binary_scalar(update._c, update._c, group.lr / (1 - b1 ^ state.step), raw.MUL, 0), what)
  check(lib.ms_binary(p._c, p._c, update._c, raw.SUB), what)
  update:_release()
end

function Adam:update(group, p, grad, state)
  if not state.exp_avg then self:init_group_state(group, p, state) end
  if group.amsgrad and not state.max_exp_avg_sq then state.max_exp_avg_sq = state_tensor(p) end
  state.step = state.step + 1
  if group.amsgrad then return amsgrad_step(self, group, p, grad, state) end
  check(lib.ms_adam_step(p._c, state.exp_avg._c, state.exp_avg_sq._c, grad._c, state.step,
                         group.lr, group.betas[1], group.betas[2], group.eps, group.weight_decay,
                         self.decoupled and 1 or 0, group.maximize and 1 or 0), self.name .. ".step")
end

-- Without amsgrad, the parameters at one step count go through one ms_adam_step_many (the
-- same numbers as one call each; on the CPU one pass split across threads).
function Adam:update_all(group, params, grads, states)
  if group.amsgrad or #params < 2 then return Optimizer.update_all(self, group, params, grads, states) end
  local by_step = {}
  for i = 1, #params do
    local state = states[i]
    if not state.exp_avg then self:init_group_state(group, params[i], state) end
    state.step = state.step + 1
    local same = by_step[state.step]
    if not same then
      same = {}
      by_step[state.step] = same
    end
    same[#same + 1] = i
  end
  for step, indices in pairs(by_step) do
    local n = #indices
    local ps, ms_, vs, gs = ffi.new("ms_tensor *[?]", n), ffi.new("ms_tensor *[?]", n),
                            ffi.new("ms_tensor *[?]", n), ffi.new("const ms_tensor *[?]", n)
    for k, i in ipairs(indices) do
      ps[k - 1], ms_[k - 1], vs[k - 1], gs[k - 1] = params[i]._c, states[i].exp_avg._c,
                                                    states[i].exp_avg_sq._c, grads[i]._c
    end
    check(lib.ms_adam_step_many(n, ps, ms_, vs, gs, step, group.lr, group.betas[1], group.betas[2], group.eps,
                                group.weight_decay, self.decoupled and 1 or 0, group.maximize and 1 or 0),
          self.name .. ".step")
  end
end

M.lr_scheduler = require "moonshard.lr_scheduler"

return M
