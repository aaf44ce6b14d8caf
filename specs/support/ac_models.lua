-- Models shared by the activation-checkpointing specs: a residual block with dropout (so
-- recomputation must replay the RNG) and a three-block model with a linear head.
local ms = require "moonshard"
local nn = ms.nn

local M = {}

M.DIM, M.HIDDEN = 6, 10

local Block = nn.Module:extend("Block")
function Block:__init()
  self.norm = nn.LayerNorm(M.DIM)
  self.fc1 = nn.Linear(M.DIM, M.HIDDEN)
  self.act = nn.GELU()
  self.drop = nn.Dropout(0.25)
  self.fc2 = nn.Linear(M.HIDDEN, M.DIM)
end
function Block:forward(x) return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x))))) end
M.Block = Block

local Model = nn.Module:extend("Model")
function Model:__init()
  self.blocks = nn.ModuleList({Block(), Block(), Block()})
  self.head = nn.Linear(M.DIM, 1)
end
function Model:forward(x)
  for _, block in self.blocks:ipairs() do x = block(x) end
  return self.head(x)
end
M.Model = Model

-- A function applying wrapper to every block of a Model.
function M.each_block(wrapper)
  return function(model)
    for _, block in model.blocks:ipairs() do wrapper(block) end
    return model
  end
end

return M
