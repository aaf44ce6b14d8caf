-- Loss modules: MSELoss and CrossEntropyLoss ({reduction, ignore_index, label_smoothing}
-- like PyTorch).
local Module = require "moonshard.nn.module"
local nn_ops = require "moonshard.ops.nn"
local raw = require "moonshard.ops.raw"

local M = {}

M.MSELoss = Module:extend("MSELoss")
function M.MSELoss:__init(opts)
  self.reduction = raw.options("MSELoss", opts, {reduction = true}).reduction or "mean"
end
function M.MSELoss:forward(input, target)
  return nn_ops.mse_loss(input, target, {reduction = self.reduction})
end

M.CrossEntropyLoss = Module:extend("CrossEntropyLoss")
function M.CrossEntropyLoss:__init(opts)
  opts = raw.options("CrossEntropyLoss", opts, {reduction = true, ignore_index = true, label_smoothing = true})
  self.reduction, self.ignore_index = opts.reduction or "mean", opts.ignore_index or -100
  self.label_smoothing = opts.label_smoothing or 0
end
function M.CrossEntropyLoss:forward(input, target)
  return nn_ops.cross_entropy(input, target, {reduction = self.reduction, ignore_index = self.ignore_index,
                                              label_smoothing = self.label_smoothing})
end

return M
