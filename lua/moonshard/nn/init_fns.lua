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

-- kaiming_uniform_(t, {a = math.sqrt(5)}): gain sqrt(2 / (1 + a^2)), bound gain*sqrt(3/fan_in).
function M.kaiming_uniform_(t, opts)
  local a = opts and opts.a or 0
  local fan_in = M.calculate_fan_in_and_fan_out(t)
  local gain = math.sqrt(2 / (1 + a * a))
  local bound = gain * math.sqrt(3 / fan_in)
  return M.uniform_(t, -bound, bound)
end

function M.xavier_uniform_(t, gain)
  local fan_in, fan_out = M.calculate_fan_in_and_fan_out(t)
  local bound = (gain or 1) * math.sqrt(6 / (fan_in + fan_out))
  return M.uniform_(t, -bound, bound)
end

return M
