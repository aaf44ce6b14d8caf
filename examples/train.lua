-- Trains a small MLP on a synthetic regression task in one process and prints the loss.
-- Usage (repository root): luajit examples/train.lua [--steps N] [--lr X] [--seed S]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ms = require "moonshard"
local nn, optim = ms.nn, ms.optim

local options = {steps = 200, lr = 0.01, seed = 0, batch = 64}
local i = 1
while i <= #arg do
  local key = arg[i]:match("^%-%-(.+)$")
  if not key or options[key] == nil then
    io.stderr:write("usage: luajit examples/train.lua [--steps N] [--lr X] [--seed S] [--batch B]\n")
    os.exit(2)
  end
  options[key] = tonumber(arg[i + 1]) or error("--" .. key .. " needs a number")
  i = i + 2
end

ms.manual_seed(options.seed)

local MLP = nn.Module:extend("MLP")
function MLP:__init(dim, hidden)
  self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, 1))
end
function MLP:forward(x) return self.net(x) end

local dim = 16
local teacher = ms.randn(dim, 1)
local model = MLP(dim, 64)
local opt = optim.AdamW(model:parameters(), {lr = options.lr})
print(model)

for step = 1, options.steps do
  local x = ms.randn(options.batch, dim)
  local target = ms.no_grad(function() return (x:matmul(teacher)):tanh() end)
  opt:zero_grad()
  local loss = nn.F.mse_loss(model(x), target)
  loss:backward()
  opt:step()
  if step == 1 or step % 20 == 0 then
    local mem = ms.memory_stats("cpu")
    print(string.format("step %4d  loss %.5f  memory %.1f KiB (peak %.1f KiB)", step, loss:item(),
                        mem.allocated / 1024, mem.peak / 1024))
  end
end
