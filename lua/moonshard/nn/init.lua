-- moonshard.nn: modules, the functional forms (nn.F) and initialisers (nn.init).
local Module = require "moonshard.nn.module"
local layers = require "moonshard.nn.layers"
local containers = require "moonshard.nn.containers"
local losses = require "moonshard.nn.losses"
local nn_ops = require "moonshard.ops.nn"
local pointwise = require "moonshard.ops.pointwise"
local linalg = require "moonshard.ops.linalg"

local nn = {
  Module = Module,
  Parameter = Module.Parameter,
  CausalSelfAttention = require "moonshard.nn.attention",
  init = require "moonshard.nn.init_fns",
  utils = require "moonshard.nn.utils",
}
for _, family in ipairs({layers, containers, losses}) do
  for name, class in pairs(family) do nn[name] = class end
end

nn.F = {
  linear = linalg.linear,
  relu = pointwise.relu,
  gelu = pointwise.gelu,
  tanh = pointwise.tanh,
  sigmoid = pointwise.sigmoid,
}
for name, fn in pairs(nn_ops) do nn.F[name] = fn end

return nn
