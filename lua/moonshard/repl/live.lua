-- A live model seen from the REPL on rank 0: parameter names, their DTensor layouts, and
-- full values gathered on demand. Every other rank serves the gathers: rank 0 broadcasts
-- which parameter it wants (or that the REPL closed) and all ranks join the all-gather.
local ms = require "moonshard"

local M = {}

local STOP, GATHER = 0, 1
-- Ranks wait for rank 0's next request while a person types; collectives use this
-- timeout during the session and the default 60 s again afterwards.
local SESSION_TIMEOUT, DEFAULT_TIMEOUT = 7 * 24 * 3600, 60

local Live = {}
Live.__index = Live

function M.new(model)
  local self = setmetatable({model = model, names = {}, params = {}, index = {}}, Live)
  for name, p in model:named_parameters() do
    self.names[#self.names + 1] = name
    self.params[#self.names] = p
    self.index[name] = #self.names
  end
  self.distributed = ms.dist.is_initialized() and ms.dist.get_world_size() > 1
  return self
end

function Live:has(fqn) return self.index[fqn] ~= nil end

local function request(op, index)
  local message = ms.tensor({op, index}, {dtype = "i64"})
  ms.dist.broadcast(message, 0)
  local values = message:table()
  message:free()
  return values[1], values[2]
end

local function full_value(p)
  if ms.is_dtensor(p) then return p:full_tensor() end
  return ms.no_grad(function() return p:detach():clone() end)
end

-- The full value of parameter fqn (rank 0; the other ranks take part in the gather).
function Live:gather(fqn)
  local index = self.index[fqn]
  if not index then error(("the model has no parameter '%s'"):format(tostring(fqn)), 0) end
  if self.distributed then request(GATHER, index) end
  return full_value(self.params[index])
end

function Live:parameter(fqn) return self.params[self.index[fqn]] end

-- Serve rank 0's gathers until it closes the session (ranks other than 0).
function Live:serve()
  while true do
    local op, index = request(STOP, 0)
    if op == STOP then return end
    local t = full_value(self.params[index])
    t:free()
  end
end

function Live:begin_session()
  if self.distributed then ms.dist.set_timeout(SESSION_TIMEOUT) end
end

-- Rank 0: tell the serving ranks the session is over.
function Live:end_session()
  if self.distributed then
    if ms.dist.get_rank() == 0 then request(STOP, 0) end
    ms.dist.set_timeout(DEFAULT_TIMEOUT)
  end
end

return M
