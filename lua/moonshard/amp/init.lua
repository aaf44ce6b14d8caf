-- Loss scaling for 16-bit training, as torch.amp.GradScaler: scale the loss, unscale and check the
-- gradients, skip a step whose gradients hold inf/NaN on any rank, back off or grow the scale.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local unscale = require "moonshard.amp.unscale"

local fail = C.fail

local M = {}

local GradScaler = {}
GradScaler.__index = GradScaler
GradScaler.__name = "GradScaler"

local READY, UNSCALED, STEPPED = "READY", "UNSCALED", "STEPPED"
local DEFAULTS = {init_scale = 2.0 ^ 16, growth_factor = 2.0, backoff_factor = 0.5, growth_interval = 2000,
                  enabled = true, process_group = false}
local NOT_SCALED = "This may indicate your script did not use scaler:scale(loss or outputs) earlier in " ..
                   "the iteration."

-- The scale is an f32 value, as PyTorch keeps it in a float32 tensor.
local f32_box = ffi.new("float[1]")
local function to_f32(x)
  f32_box[0] = x
  return tonumber(f32_box[0])
end

local function is_finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

-- ---- options ----

local function check_growth_factor(what, v)
  if type(v) ~= "number" or not (v > 1) or v == math.huge then
    fail(what, "growth_factor must be a finite number > 1, got %s", tostring(v))
  end
end

local function check_backoff_factor(what, v)
  if type(v) ~= "number" or not (v > 0 and v < 1) then
    fail(what, "backoff_factor must be a number in (0, 1), got %s", tostring(v))
  end
end

local function check_growth_interval(what, v)
  if type(v) ~= "number" or v < 1 or v % 1 ~= 0 or v == math.huge then
    fail(what, "growth_interval must be a positive integer, got %s", tostring(v))
  end
end

local function check_scale(what, name, v)
  if type(v) ~= "number" or not (v > 0) or not is_finite(to_f32(v)) then
    fail(what, "%s must be a positive number that fits in f32, got %s", name, tostring(v))
  end
end

local function is_group(g)
  return type(g) == "table" and getmetatable(g) == require("moonshard.dist").ProcessGroup
end

-- GradScaler([device,] {init_scale, growth_factor, backoff_factor, growth_interval, enabled,
-- process_group}); the device string is accepted for PyTorch's call form and changes nothing.
function M.GradScaler(device, opts)
  local what = "GradScaler"
  if type(device) ~= "string" then opts = device end
  if opts ~= nil and (type(opts) ~= "table" or getmetatable(opts) ~= nil) then
    fail(what, "options must be a table, got %s", type(opts))
  end
  local o = {}
  for key, value in pairs(DEFAULTS) do o[key] = value end
  for key, value in pairs(opts or {}) do
    if DEFAULTS[key] == nil then fail(what, "unknown option '%s'", tostring(key)) end
    o[key] = value
  end
  if type(o.enabled) ~= "boolean" then fail(what, "enabled must be true or false, got %s", tostring(o.enabled)) end
  check_scale(what, "init_scale", o.init_scale)
  check_growth_factor(what, o.growth_factor)
  check_backoff_factor(what, o.backoff_factor)
  check_growth_interval(what, o.growth_interval)
  if o.process_group and not is_group(o.process_group) then
    fail(what, "process_group must come from dist.new_group or a device mesh, got %s", tostring(o.process_group))
  end
  return setmetatable({
    _enabled = o.enabled,
    _init_scale = o.init_scale, _scale = nil,  -- the f32 scale, made by the first scale()
    _growth_factor = o.growth_factor, _backoff_factor = o.backoff_factor,
    _growth_interval = o.growth_interval, _growth_tracker = 0,
    _process_group = o.process_group or nil,
    _per_optimizer = setmetatable({}, {__mode = "k"}),  -- optimizer -> {stage, found_inf}
    _scaled = false,  -- scale() ran since the last update()
  }, GradScaler)
end

function GradScaler:is_enabled() return self._enabled end

function GradScaler:get_scale()
  if not self._enabled then return 1.0 end
  return self._scale or self._init_scale
end

function GradScaler:get_growth_factor() return self._growth_factor end
function GradScaler:get_backoff_factor() return self._backoff_factor end
function GradScaler:get_growth_interval() return self._growth_interval end
function GradScaler:set_growth_factor(v)
  check_growth_factor("GradScaler.set_growth_factor", v)
  self._growth_factor = v
end
function GradScaler:set_backoff_factor(v)
  check_backoff_factor("GradScaler.set_backoff_factor", v)
  self._backoff_factor = v
end
function GradScaler:set_growth_interval(v)
  check_growth_interval("GradScaler.set_growth_interval", v)
  self._growth_interval = v
end

local function check_self(self, what)
  if getmetatable(self) ~= GradScaler then
    fail(what, "call it as a method (scaler:%s(...))", what:match("%.(.*)$"))
  end
end

-- ---- scale ----

local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}

-- scale(outputs): the tensor (or every tensor in a table, same keys) times the scale.
function GradScaler:scale(outputs)
  check_self(self, "GradScaler.scale")
  if not self._enabled then return outputs end
  local function apply(value)
    if Tensor.is_tensor(value) then
      if not FLOATING[value:dtype()] then
        fail("GradScaler.scale", "outputs must be floating-point tensors, got %s", value:dtype())
      end
      if self._scale == nil then self._scale = to_f32(self._init_scale) end
      self._scaled = true
      return value * self._scale
    end
    if type(value) == "table" and getmetatable(value) == nil then
      local out = {}
      for key, v in pairs(value) do out[key] = apply(v) end
      return out
    end
    fail("GradScaler.scale", "outputs must be a tensor or a table of tensors, got %s",
         DTensor.is_dtensor(value) and "a DTensor" or type(value))
  end
  return apply(outputs)
end

-- ---- unscale_ ----

local function check_optimizer(optimizer, what)
  if type(optimizer) ~= "table" or type(optimizer.param_groups) ~= "table" or type(optimizer.step) ~= "function" then
    fail(what, "expected an optimizer (with param_groups and step), got %s", type(optimizer))
  end
end

-- A step names the failed precondition after PyTorch's own step error.
local function prefix(what)
  return what == "GradScaler.step" and "No inf checks were recorded for this optimizer: " or ""
end

local function check_started(self, what)
  if self._scale == nil then
    fail(what, "%sAttempted %s but _scale is None. %s", prefix(what), what:match("%.(.*)$"), NOT_SCALED)
  end
end

-- Unscaling gradients that scale() never multiplied would shrink them by the scale.
local function check_scaled(self, what)
  if not self._scaled then
    fail(what, "%sthe gradients were not scaled: no scaler:scale(loss) since the last update(). %s",
         prefix(what), NOT_SCALED)
  end
end

local function optimizer_state(self, optimizer)
  local state = self._per_optimizer[optimizer]
  if state == nil then
    state = {stage = READY, found_inf = nil}
    self._per_optimizer[optimizer] = state
  end
  return state
end

-- unscale_(optimizer): divide the optimizer's gradients by the scale in place and record
-- whether any of them (on any rank, for sharded/replicated parameters) holds inf or NaN.
function GradScaler:unscale_(optimizer)
  local what = "GradScaler.unscale_"
  check_self(self, what)
  if not self._enabled then return end
  check_optimizer(optimizer, what)
  check_started(self, what)
  local state = optimizer_state(self, optimizer)
  if state.stage == UNSCALED then
    fail(what, "unscale_() has already been called on this optimizer since the last update().")
  elseif state.stage == STEPPED then
    fail(what, "unscale_() is being called after step().")
  end
  check_scaled(self, what)
  state.found_inf = unscale.unscale_grads(optimizer, to_f32(1 / self._scale), self._process_group, what)
  state.stage = UNSCALED
end

-- ---- step and update ----

-- step(optimizer, ...): unscale_ (unless done this iteration), then optimizer:step(...)
-- unless a gradient held inf/NaN. Returns what optimizer:step returned, nil when skipped.
function GradScaler:step(optimizer, ...)
  local what = "GradScaler.step"
  check_self(self, what)
  check_optimizer(optimizer, what)
  if not self._enabled then return optimizer:step(...) end
  for i = 1, select("#", ...) do
    if type((select(i, ...))) == "function" then
      fail(what, "Closure use is not currently supported if GradScaler is enabled.")
    end
  end
  check_started(self, what)
  local state = optimizer_state(self, optimizer)
  if state.stage == STEPPED then fail(what, "step() has already been called since the last update().") end
  if state.stage == READY then
    check_scaled(self, what)
    self:unscale_(optimizer)
  end
  if state.found_inf == nil then
    fail(what, "No inf checks were recorded for this optimizer: none of its parameters has a " ..
               "gradient (run scaler:scale(loss):backward() first).")
  end
  local retval
  if state.found_inf == 0 then retval = optimizer:step(...) end
  state.stage = STEPPED
  return retval
end

local function new_scale_value(new_scale, what)
  if type(new_scale) == "number" then
    check_scale(what, "new_scale", new_scale)
    return new_scale
  end
  if Tensor.is_tensor(new_scale) and new_scale:numel() == 1 and not new_scale.requires_grad then
    local v = new_scale:item()
    check_scale(what, "new_scale", v)
    return v
  end
  fail(what, "new_scale should be a number or a 1-element tensor with requires_grad=false, got %s",
       Tensor.is_tensor(new_scale) and ("a tensor of %d elements"):format(new_scale:numel()) or type(new_scale))
end

-- update([new_scale]): back off the scale if any optimizer's step saw inf/NaN this
-- iteration, grow it after growth_interval clean iterations in a row; or set new_scale.
function GradScaler:update(new_scale)
  local what = "GradScaler.update"
  check_self(self, what)
  if not self._enabled then return end
  check_started(self, what)
  if new_scale ~= nil then
    self._scale = to_f32(new_scale_value(new_scale, what))
  else
    local any, found = false, false
    for _, state in pairs(self._per_optimizer) do
      if state.found_inf ~= nil then
        any = true
        found = found or state.found_inf > 0
      end
    end
    if not any then fail(what, "No inf checks were recorded prior to update().") end
    if found then
      self._scale = to_f32(self._scale * self._backoff_factor)
      self._growth_tracker = 0
    else
      local successful = self._growth_tracker + 1
      if successful == self._growth_interval then
        local grown = to_f32(self._scale * self._growth_factor)
        if is_finite(grown) then self._scale = grown end
        self._growth_tracker = 0
      else
        self._growth_tracker = successful
      end
    end
  end
  self._per_optimizer = setmetatable({}, {__mode = "k"})
  self._scaled = false
end

-- ---- state dict ----

function GradScaler:state_dict()
  check_self(self, "GradScaler.state_dict")
  if not self._enabled then return {} end
  return {scale = self:get_scale(), growth_factor = self._growth_factor, backoff_factor = self._backoff_factor,
          growth_interval = self._growth_interval, _growth_tracker = self._growth_tracker}
end

function GradScaler:load_state_dict(sd)
  local what = "GradScaler.load_state_dict"
  check_self(self, what)
  if not self._enabled then return end
  if type(sd) ~= "table" then fail(what, "expected a state dict table, got %s", type(sd)) end
  if next(sd) == nil then
    fail(what, "The source state dict is empty, possibly because it was saved from a disabled " ..
               "instance of GradScaler.")
  end
  for _, key in ipairs({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}) do
    if sd[key] == nil then fail(what, "the state dict has no '%s'", key) end
  end
  check_scale(what, "scale", sd.scale)
  check_growth_factor(what, sd.growth_factor)
  check_backoff_factor(what, sd.backoff_factor)
  check_growth_interval(what, sd.growth_interval)
  local tracker = sd._growth_tracker
  if type(tracker) ~= "number" or tracker < 0 or tracker % 1 ~= 0 then
    fail(what, "_growth_tracker must be a non-negative integer, got %s", tostring(tracker))
  end
  self._init_scale = sd.scale
  if self._scale ~= nil then self._scale = to_f32(sd.scale) end
  self._growth_factor, self._backoff_factor = sd.growth_factor, sd.backoff_factor
  self._growth_interval, self._growth_tracker = sd.growth_interval, tracker
end

function GradScaler:__tostring()
  if not self._enabled then return "GradScaler(enabled=false)" end
  return ("GradScaler(scale=%.9g, growth_factor=%g, backoff_factor=%g, growth_interval=%d, _growth_tracker=%d)")
    :format(self:get_scale(), self._growth_factor, self._backoff_factor, self._growth_interval, self._growth_tracker)
end

return M
