-- nn.init: in-place parameter initialisers with PyTorch's distributions.
local C = require "moonshard.ffi"
local random = require "moonshard.random"
local autograd = require "moonshard.autograd"

local fail = C.fail

local M = {}

-- fan_in and fan_out of a weight shaped [out, in, ...] like torch.nn.init.
function M.calculate_fan_in_and_fan_out(t)
  local shape = t:shape()
  if #shape < 2 then fail("init", "fan in/out needs a tensor with at least 2 dims, got %d", #shape) end
  local receptive = 1
  for d = 3, #shape do receptive = receptive * shape[d] end
  return shape[2] * receptive, shape[1] * receptive
end

function M.uniform_(t, a, b)
  return autograd.no_grad(random.uniform_, t, a or 0, b or 1)
end

function M.normal_(t, mean, std)
  return autograd.no_grad(random.normal_, t, mean or 0, std or 1)
end

function M.zeros_(t) return autograd.no_grad(function() return t:zero_() end) end
function M.ones_(t) return autograd.no_grad(function() return t:fill_(1) end) end
function M.constant_(t, value) return autograd.no_grad(function() return t:fill_(value) end) end

-- The recommended gain of torch.nn.init.calculate_gain for the nonlinearities that have one.
function M.calculate_gain(nonlinearity, param)
  if nonlinearity == "linear" or nonlinearity == "sigmoid" then return 1 end
  if nonlinearity == "tanh" then return 5 / 3 end
  if nonlinearity == "relu" then return math.sqrt(2) end
  if nonlinearity == "leaky_relu" then
    local slope = param or 0.01
    return math.sqrt(2 / (1 + slope * slope))
  end
  fail("calculate_gain", "unsupported nonlinearity '%s' (expected linear, sigmoid, tanh, relu or " ..
       "leaky_relu)", tostring(nonlinearity))
end

-- kaiming_uniform_(t, {a = 0, mode = "fan_in", nonlinearity = "leaky_relu"}) like PyTorch's:
-- U(-bound, bound) with bound = gain * sqrt(3 / fan); Linear uses a = sqrt(5).
function M.kaiming_uniform_(t, opts)
  opts = opts or {}
  for key in pairs(opts) do
    if key ~= "a" and key ~= "mode" and key ~= "nonlinearity" then
      fail("kaiming_uniform_", "unknown option '%s' (expected a, mode or nonlinearity)", tostring(key))
    end
  end
  local mode = opts.mode or "fan_in"
  if mode ~= "fan_in" and mode ~= "fan_out" then
    fail("kaiming_uniform_", "mode must be 'fan_in' or 'fan_out', got '%s'", tostring(mode))
  end
  local fan_in, fan_out = M.calculate_fan_in_and_fan_out(t)
  local fan = mode == "fan_in" and fan_in or fan_out
  local gain = M.calculate_gain(opts.nonlinearity or "leaky_relu", opts.a or 0)
  local bound = fan > 0 and gain * math.sqrt(3 / fan) or 0
  return M.uniform_(t, -bound, bound)
end

function M.xavier_uniform_(t, gain)
  local fan_in, fan_out = M.calculate_fan_in_and_fan_out(t)
  local bound = (gain or 1) * math.sqrt(6 / (fan_in + fan_out))
  return M.uniform_(t, -bound, bound)
end

return M
