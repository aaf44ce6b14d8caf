-- Learning-rate schedulers with PyTorch's names and update rules (torch.optim.lr_scheduler):
-- each step() sets every param group's lr from the chainable formula PyTorch uses.
local C = require "moonshard.ffi"

local fail = C.fail

local M = {}

local LRScheduler = {}
LRScheduler.__index = LRScheduler
M.LRScheduler = LRScheduler

local function is_optimizer(v)
  if type(v) ~= "table" or type(v.param_groups) ~= "table" or #v.param_groups == 0 then return false end
  for _, group in ipairs(v.param_groups) do
    if type(group) ~= "table" or type(group.lr) ~= "number" then return false end
  end
  return type(v.step) == "function"
end

local function is_options(v)
  if type(v) ~= "table" or getmetatable(v) ~= nil or next(v) == nil then return false end
  for key in pairs(v) do if type(key) ~= "string" then return false end end
  return true
end

-- Arguments after the optimizer as PyTorch's positional order, an options table last, or
-- both: spec is an array of {name, default}; a default of `required` must be given.
local required = {}
local function arguments(name, spec, ...)
  local n = select("#", ...)
  local args = {...}
  local opts = {}
  if n > 0 and is_options(args[n]) then
    opts = args[n]
    n = n - 1
  end
  if n > #spec then fail(name, "takes at most %d arguments after the optimizer, got %d", #spec, n) end
  local known, out = {}, {}
  for i, entry in ipairs(spec) do
    known[entry[1]] = true
    local value = args[i]
    if i > n then value = nil end
    if value ~= nil and opts[entry[1]] ~= nil then fail(name, "%s is given twice", entry[1]) end
    if value == nil then value = opts[entry[1]] end
    if value == nil then
      if entry[2] == required then fail(name, "%s is required", entry[1]) end
      value = entry[2]
    end
    out[entry[1]] = value
  end
  for key in pairs(opts) do
    if not known[key] then fail(name, "unknown option '%s'", tostring(key)) end
  end
  return out
end

local function check_number(name, key, value, low, high, open_low)
  if type(value) ~= "number" or value ~= value or value < low or value > high or (open_low and value == low) then
    fail(name, "%s must be a number in %s%s, %s], got %s", key, open_low and "(" or "[", tostring(low),
         tostring(high), tostring(value))
  end
end

local function check_count(name, key, value, minimum)
  if type(value) ~= "number" or value % 1 ~= 0 or value < minimum then
    fail(name, "%s must be an integer >= %d, got %s", key, minimum, tostring(value))
  end
end

-- A scheduler over optimizer: sets initial_lr on each group (first construction), reads
-- base_lrs from it, and takes PyTorch's initial step (last_epoch -1 -> 0).
local function new_scheduler(class, name, optimizer, last_epoch, fields)
  if not is_optimizer(optimizer) then
    fail(name, "expected an optimizer (a table with param_groups and step), got %s",
         type(optimizer) == "table" and "a table without param_groups" or type(optimizer))
  end
  check_count(name, "last_epoch", last_epoch, -1)
  local self = setmetatable(fields or {}, class)
  self.name, self.optimizer = name, optimizer
  self.base_lrs = {}
  for i, group in ipairs(optimizer.param_groups) do
    if last_epoch == -1 then
      if group.initial_lr == nil then group.initial_lr = group.lr end
    elseif group.initial_lr == nil then
      fail(name, "param group %d has no initial_lr: last_epoch other than -1 resumes a schedule " ..
           "whose optimizer already ran under one", i - 1)
    end
    self.base_lrs[i] = group.initial_lr
  end
  self.last_epoch = last_epoch
  self:_initial_step()
  return self
end

function LRScheduler:_initial_step()
  self._step_count = 0
  self:step()
end

-- The learning rates the last step set, one per param group.
function LRScheduler:get_last_lr()
  local out = {}
  for i, lr in ipairs(self._last_lr) do out[i] = lr end
  return out
end

local function group_lrs(self)
  local out = {}
  for i, group in ipairs(self.optimizer.param_groups) do out[i] = group.lr end
  return out
end

-- step(): the next epoch's rates from the chainable rule; step(epoch) jumps to epoch using
-- the closed form where the scheduler has one (PyTorch's deprecated form, used by SequentialLR).
function LRScheduler:step(epoch)
  self._step_count = self._step_count + 1
  local lrs
  if epoch == nil then
    self.last_epoch = self.last_epoch + 1
    lrs = self:get_lr()
  else
    check_count(self.name .. ".step", "epoch", epoch, 0)
    self.last_epoch = epoch
    lrs = self.closed_form_lr and self:closed_form_lr() or self:get_lr()
  end
  for i, group in ipairs(self.optimizer.param_groups) do group.lr = lrs[i] end
  self._last_lr = group_lrs(self)
end

local function copy_value(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = copy_value(x) end
  return out
end

-- Every field but the optimizer and what a class marks transient (functions, derived
-- tables), as PyTorch's state_dict leaves out the optimizer and lambdas: numbers,
-- booleans, strings and arrays of numbers.
local transient = {optimizer = true, name = true}

function LRScheduler:state_dict()
  local out = {}
  local own = self.transient or {}
  for key, value in pairs(self) do
    if not transient[key] and not own[key] and type(value) ~= "function" then out[key] = copy_value(value) end
  end
  return out
end

function LRScheduler:load_state_dict(sd)
  if type(sd) ~= "table" then
    fail(self.name .. ".load_state_dict", "expected a state dict table, got %s", type(sd))
  end
  for _, key in ipairs({"last_epoch", "_step_count", "base_lrs", "_last_lr"}) do
    if sd[key] == nil then fail(self.name .. ".load_state_dict", "the state dict has no '%s'", key) end
  end
  for key, value in pairs(sd) do self[key] = copy_value(value) end
end

local function extend(name)
  local class = setmetatable({}, {__index = LRScheduler})
  class.__index = class
  class.__name = name
  class.__tostring = function(self) return string.format("%s(last_epoch=%d)", name, self.last_epoch) end
  return class
end

local function map_groups(self, fn)
  local out = {}
  for i, group in ipairs(self.optimizer.param_groups) do out[i] = fn(group.lr, self.base_lrs[i], i) end
  return out
end

-- ---- LambdaLR ----

local LambdaLR = extend("LambdaLR")
LambdaLR.transient = {lr_lambdas = true}

-- LambdaLR(optimizer, lr_lambda, {last_epoch = -1}): lr = base_lr * lr_lambda(epoch);
-- lr_lambda is one function or one per param group.
function M.LambdaLR(optimizer, ...)
  local a = arguments("LambdaLR", {{"lr_lambda", required}, {"last_epoch", -1}}, ...)
  local groups = is_optimizer(optimizer) and #optimizer.param_groups or 0
  local lambdas = {}
  if type(a.lr_lambda) == "function" then
    for i = 1, groups do lambdas[i] = a.lr_lambda end
  elseif type(a.lr_lambda) == "table" then
    if groups > 0 and #a.lr_lambda ~= groups then
      fail("LambdaLR", "expected %d lr_lambdas (one per param group), got %d", groups, #a.lr_lambda)
    end
    for i, fn in ipairs(a.lr_lambda) do
      if type(fn) ~= "function" then fail("LambdaLR", "lr_lambda %d is a %s, not a function", i, type(fn)) end
      lambdas[i] = fn
    end
  else
    fail("LambdaLR", "lr_lambda must be a function or an array of functions, got %s", type(a.lr_lambda))
  end
  return new_scheduler(LambdaLR, "LambdaLR", optimizer, a.last_epoch, {lr_lambdas = lambdas})
end

function LambdaLR:get_lr()
  return map_groups(self, function(_, base, i)
    local factor = self.lr_lambdas[i](self.last_epoch)
    if type(factor) ~= "number" then
      fail("LambdaLR", "lr_lambda returned a %s for epoch %d, not a number", type(factor), self.last_epoch)
    end
    return base * factor
  end)
end

-- ---- StepLR ----

local StepLR = extend("StepLR")

-- StepLR(optimizer, step_size, {gamma = 0.1, last_epoch = -1})
function M.StepLR(optimizer, ...)
  local a = arguments("StepLR", {{"step_size", required}, {"gamma", 0.1}, {"last_epoch", -1}}, ...)
  check_count("StepLR", "step_size", a.step_size, 1)
  check_number("StepLR", "gamma", a.gamma, 0, math.huge)
  return new_scheduler(StepLR, "StepLR", optimizer, a.last_epoch, {step_size = a.step_size, gamma = a.gamma})
end

function StepLR:get_lr()
  local decay = self.last_epoch ~= 0 and self.last_epoch % self.step_size == 0
  return map_groups(self, function(lr) return decay and lr * self.gamma or lr end)
end

function StepLR:closed_form_lr()
  return map_groups(self, function(_, base)
    return base * self.gamma ^ math.floor(self.last_epoch / self.step_size)
  end)
end

-- ---- MultiStepLR ----

local MultiStepLR = extend("MultiStepLR")

-- MultiStepLR(optimizer, milestones, {gamma = 0.1, last_epoch = -1}); a milestone given
-- twice decays twice there, as PyTorch's Counter does.
function M.MultiStepLR(optimizer, ...)
  local a = arguments("MultiStepLR", {{"milestones", required}, {"gamma", 0.1}, {"last_epoch", -1}}, ...)
  if type(a.milestones) ~= "table" then
    fail("MultiStepLR", "milestones must be an array of epochs, got %s", type(a.milestones))
  end
  local milestones = {}
  for i, m in ipairs(a.milestones) do
    check_count("MultiStepLR", "milestone " .. i, m, 0)
    milestones[i] = m
  end
  table.sort(milestones)
  check_number("MultiStepLR", "gamma", a.gamma, 0, math.huge)
  return new_scheduler(MultiStepLR, "MultiStepLR", optimizer, a.last_epoch,
                       {milestones = milestones, gamma = a.gamma})
end

function MultiStepLR:get_lr()
  local count = 0
  for _, m in ipairs(self.milestones) do if m == self.last_epoch then count = count + 1 end end
  return map_groups(self, function(lr) return count > 0 and lr * self.gamma ^ count or lr end)
end

function MultiStepLR:closed_form_lr()
  local passed = 0
  for _, m in ipairs(self.milestones) do if m <= self.last_epoch then passed = passed + 1 end end
  return map_groups(self, function(_, base) return base * self.gamma ^ passed end)
end

-- ---- ConstantLR ----

local ConstantLR = extend("ConstantLR")

-- ConstantLR(optimizer, {factor = 1/3, total_iters = 5, last_epoch = -1})
function M.ConstantLR(optimizer, ...)
  local a = arguments("ConstantLR", {{"factor", 1 / 3}, {"total_iters", 5}, {"last_epoch", -1}}, ...)
  check_number("ConstantLR", "factor", a.factor, 0, 1)
  check_count("ConstantLR", "total_iters", a.total_iters, 0)
  return new_scheduler(ConstantLR, "ConstantLR", optimizer, a.last_epoch,
                       {factor = a.factor, total_iters = a.total_iters})
end

function ConstantLR:get_lr()
  local e = self.last_epoch
  return map_groups(self, function(lr)
    if e == 0 then return lr * self.factor end
    if e ~= self.total_iters then return lr end
    return lr * (1 / self.factor)
  end)
end

function ConstantLR:closed_form_lr()
  local done = self.last_epoch >= self.total_iters and 1 or 0
  return map_groups(self, function(_, base) return base * (self.factor + done * (1 - self.factor)) end)
end

-- ---- LinearLR ----

local LinearLR = extend("LinearLR")

-- LinearLR(optimizer, {start_factor = 1/3, end_factor = 1, total_iters = 5, last_epoch = -1})
function M.LinearLR(optimizer, ...)
  local a = arguments("LinearLR", {{"start_factor", 1 / 3}, {"end_factor", 1}, {"total_iters", 5},
                                   {"last_epoch", -1}}, ...)
  check_number("LinearLR", "start_factor", a.start_factor, 0, 1, true)
  check_number("LinearLR", "end_factor", a.end_factor, 0, 1)
  check_count("LinearLR", "total_iters", a.total_iters, 1)
  return new_scheduler(LinearLR, "LinearLR", optimizer, a.last_epoch,
                       {start_factor = a.start_factor, end_factor = a.end_factor, total_iters = a.total_iters})
end

function LinearLR:get_lr()
  local e, s, f, n = self.last_epoch, self.start_factor, self.end_factor, self.total_iters
  return map_groups(self, function(lr)
    if e == 0 then return lr * s end
    if e > n then return lr end
    return lr * (1 + (f - s) / (n * s + (e - 1) * (f - s)))
  end)
end

function LinearLR:closed_form_lr()
  local e, s, f, n = self.last_epoch, self.start_factor, self.end_factor, self.total_iters
  return map_groups(self, function(_, base) return base * (s + (f - s) * math.min(n, e) / n) end)
end

-- ---- ExponentialLR ----

local ExponentialLR = extend("ExponentialLR")

-- ExponentialLR(optimizer, gamma, {last_epoch = -1})
function M.ExponentialLR(optimizer, ...)
  local a = arguments("ExponentialLR", {{"gamma", required}, {"last_epoch", -1}}, ...)
  check_number("ExponentialLR", "gamma", a.gamma, 0, math.huge)
  return new_scheduler(ExponentialLR, "ExponentialLR", optimizer, a.last_epoch, {gamma = a.gamma})
end

function ExponentialLR:get_lr()
  local first = self.last_epoch == 0
  return map_groups(self, function(lr) return first and lr or lr * self.gamma end)
end

function ExponentialLR:closed_form_lr()
  return map_groups(self, function(_, base) return base * self.gamma ^ self.last_epoch end)
end

-- ---- CosineAnnealingLR ----

local CosineAnnealingLR = extend("CosineAnnealingLR")

-- CosineAnnealingLR(optimizer, T_max, {eta_min = 0, last_epoch = -1})
function M.CosineAnnealingLR(optimizer, ...)
  local a = arguments("CosineAnnealingLR", {{"T_max", required}, {"eta_min", 0}, {"last_epoch", -1}}, ...)
  check_count("CosineAnnealingLR", "T_max", a.T_max, 1)
  check_number("CosineAnnealingLR", "eta_min", a.eta_min, 0, math.huge)
  return new_scheduler(CosineAnnealingLR, "CosineAnnealingLR", optimizer, a.last_epoch,
                       {T_max = a.T_max, eta_min = a.eta_min})
end

function CosineAnnealingLR:get_lr()
  local e, T, eta = self.last_epoch, self.T_max, self.eta_min
  local pi, cos = math.pi, math.cos
  return map_groups(self, function(lr, base)
    if e == 0 then return lr end
    if self._step_count == 1 and e > 0 then return eta + (base - eta) * (1 + cos(e * pi / T)) / 2 end
    if (e - 1 - T) % (2 * T) == 0 then return lr + (base - eta) * (1 - cos(pi / T)) / 2 end
    return (1 + cos(pi * e / T)) / (1 + cos(pi * (e - 1) / T)) * (lr - eta) + eta
  end)
end

function CosineAnnealingLR:closed_form_lr()
  local e, T, eta = self.last_epoch, self.T_max, self.eta_min
  return map_groups(self, function(_, base) return eta + (base - eta) * (1 + math.cos(math.pi * e / T)) / 2 end)
end

-- ---- SequentialLR ----

local SequentialLR = extend("SequentialLR")

local function upper_bound(sorted, x)
  local i = 0
  while i < #sorted and sorted[i + 1] <= x do i = i + 1 end
  return i
end

-- SequentialLR(optimizer, schedulers, milestones, {last_epoch = -1}): schedulers[i + 1]
-- runs from milestones[i] on (each restarted at epoch 0 there).
function M.SequentialLR(optimizer, ...)
  local name = "SequentialLR"
  local a = arguments(name, {{"schedulers", required}, {"milestones", required}, {"last_epoch", -1}}, ...)
  if not is_optimizer(optimizer) then
    fail(name, "expected an optimizer (a table with param_groups and step), got %s", type(optimizer))
  end
  if type(a.schedulers) ~= "table" or #a.schedulers < 1 then
    fail(name, "schedulers must be a non-empty array of schedulers")
  end
  for i, s in ipairs(a.schedulers) do
    if type(s) ~= "table" or getmetatable(s) == nil or s.get_lr == nil then
      fail(name, "scheduler %d is a %s, not a scheduler", i, type(s))
    end
    if s.optimizer ~= optimizer then
      fail(name, "scheduler %d (%s) drives another optimizer than the one given", i, s.name)
    end
  end
  if type(a.milestones) ~= "table" or #a.milestones ~= #a.schedulers - 1 then
    fail(name, "expected %d milestones (one fewer than schedulers), got %s", #a.schedulers - 1,
         type(a.milestones) == "table" and tostring(#a.milestones) or type(a.milestones))
  end
  for i, m in ipairs(a.milestones) do
    check_count(name, "milestone " .. i, m, 0)
    if i > 1 and m < a.milestones[i - 1] then fail(name, "milestones must be ascending") end
  end
  check_count(name, "last_epoch", a.last_epoch, -1)
  local self = setmetatable({name = name, optimizer = optimizer, _schedulers = a.schedulers,
                             _milestones = {unpack(a.milestones)}, last_epoch = a.last_epoch + 1}, SequentialLR)
  for _, group in ipairs(optimizer.param_groups) do group.lr = group.initial_lr end
  for _, s in ipairs(a.schedulers) do s.last_epoch = s.last_epoch - 1 end
  a.schedulers[1]:_initial_step()
  self._last_lr = a.schedulers[1]:get_last_lr()
  return self
end

function SequentialLR:step()
  self.last_epoch = self.last_epoch + 1
  local idx = upper_bound(self._milestones, self.last_epoch)
  local scheduler = self._schedulers[idx + 1]
  if idx > 0 and self._milestones[idx] == self.last_epoch then
    scheduler:step(0)
  else
    scheduler:step()
  end
  self._last_lr = scheduler:get_last_lr()
end

function SequentialLR:state_dict()
  local subs = {}
  for i, s in ipairs(self._schedulers) do subs[i] = s:state_dict() end
  return {last_epoch = self.last_epoch, _milestones = copy_value(self._milestones),
          _last_lr = copy_value(self._last_lr), _schedulers = subs}
end

function SequentialLR:load_state_dict(sd)
  if type(sd) ~= "table" or type(sd._schedulers) ~= "table" or #sd._schedulers ~= #self._schedulers then
    fail("SequentialLR.load_state_dict", "expected a SequentialLR state dict with %d schedulers",
         #self._schedulers)
  end
  self.last_epoch, self._milestones, self._last_lr = sd.last_epoch, copy_value(sd._milestones), copy_value(sd._last_lr)
  for i, s in ipairs(self._schedulers) do s:load_state_dict(sd._schedulers[i]) end
end

-- ---- OneCycleLR ----

local OneCycleLR = extend("OneCycleLR")
OneCycleLR.transient = {_phases = true}

local function anneal_cos(start, stop, pct) return stop + (start - stop) / 2 * (math.cos(math.pi * pct) + 1) end
local function anneal_linear(start, stop, pct) return (stop - start) * pct + start end

local function per_group(name, key, value, groups)
  local out = {}
  if type(value) == "table" then
    if #value ~= groups then fail(name, "expected %d values of %s (one per param group), got %d", groups, key, #value) end
    for i, v in ipairs(value) do out[i] = v end
  else
    for i = 1, groups do out[i] = value end
  end
  for i, v in ipairs(out) do
    if type(v) ~= "number" then fail(name, "%s must be a number or one per param group, got %s", key, type(v)) end
    out[i] = v
  end
  return out
end

local function set_momentum(group, use_beta1, value)
  if use_beta1 then group.betas = {value, group.betas[2]} else group.momentum = value end
end

-- OneCycleLR(optimizer, max_lr, {total_steps | epochs and steps_per_epoch, pct_start = 0.3,
--   anneal_strategy = "cos", cycle_momentum = true, base_momentum = 0.85, max_momentum = 0.95,
--   div_factor = 25, final_div_factor = 1e4, three_phase = false, last_epoch = -1})
function M.OneCycleLR(optimizer, ...)
  local name = "OneCycleLR"
  local a = arguments(name, {{"max_lr", required}, {"total_steps", false}, {"epochs", false},
    {"steps_per_epoch", false}, {"pct_start", 0.3}, {"anneal_strategy", "cos"}, {"cycle_momentum", true},
    {"base_momentum", 0.85}, {"max_momentum", 0.95}, {"div_factor", 25}, {"final_div_factor", 1e4},
    {"three_phase", false}, {"last_epoch", -1}}, ...)
  if not is_optimizer(optimizer) then
    fail(name, "expected an optimizer (a table with param_groups and step), got %s", type(optimizer))
  end
  local total = a.total_steps
  if total then
    check_count(name, "total_steps", total, 1)
  elseif a.epochs and a.steps_per_epoch then
    check_count(name, "epochs", a.epochs, 1)
    check_count(name, "steps_per_epoch", a.steps_per_epoch, 1)
    total = a.epochs * a.steps_per_epoch
  else
    fail(name, "give total_steps, or epochs and steps_per_epoch")
  end
  check_number(name, "pct_start", a.pct_start, 0, 1)
  local anneal = ({cos = anneal_cos, linear = anneal_linear})[a.anneal_strategy]
  if not anneal then
    fail(name, "anneal_strategy must be 'cos' or 'linear', got %s", tostring(a.anneal_strategy))
  end
  local groups = optimizer.param_groups
  local phases
  if a.three_phase then
    phases = {{a.pct_start * total - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"},
              {2 * a.pct_start * total - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"},
              {total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"}}
  else
    phases = {{a.pct_start * total - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"},
              {total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"}}
  end
  local max_lrs = per_group(name, "max_lr", a.max_lr, #groups)
  if a.last_epoch == -1 then
    for i, group in ipairs(groups) do
      group.initial_lr = max_lrs[i] / a.div_factor
      group.max_lr = max_lrs[i]
      group.min_lr = group.initial_lr / a.final_div_factor
    end
  end
  local use_beta1 = false
  if a.cycle_momentum then
    local defaults = optimizer.defaults or {}
    if defaults.momentum == nil and defaults.betas == nil then
      fail(name, "cycle_momentum needs an optimizer with momentum or betas (pass cycle_momentum = false)")
    end
    use_beta1 = defaults.betas ~= nil
    local maxes = per_group(name, "max_momentum", a.max_momentum, #groups)
    local bases = per_group(name, "base_momentum", a.base_momentum, #groups)
    if a.last_epoch == -1 then
      for i, group in ipairs(groups) do
        set_momentum(group, use_beta1, maxes[i])
        group.max_momentum, group.base_momentum = maxes[i], bases[i]
      end
    end
  end
  return new_scheduler(OneCycleLR, name, optimizer, a.last_epoch, {
    total_steps = total, _phases = phases, _anneal = anneal, anneal_strategy = a.anneal_strategy,
    cycle_momentum = a.cycle_momentum, use_beta1 = use_beta1})
end

function OneCycleLR:get_lr()
  local step = self.last_epoch
  if step > self.total_steps then
    fail("OneCycleLR.step", "stepped %d times, more than total_steps = %d", step, self.total_steps)
  end
  local phases, anneal = self._phases, self._anneal
  return map_groups(self, function(_, _, i)
    local group = self.optimizer.param_groups[i]
    local start = 0
    for p, phase in ipairs(phases) do
      local stop = phase[1]
      if step <= stop or p == #phases then
        local pct = (step - start) / (stop - start)
        if self.cycle_momentum then set_momentum(group, self.use_beta1, anneal(group[phase[4]], group[phase[5]], pct)) end
        return anneal(group[phase[2]], group[phase[3]], pct)
      end
      start = stop
    end
  end)
end

return M
