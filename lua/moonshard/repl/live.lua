-- A live model seen from the REPL on rank 0: parameter names, their DTensor layouts, full
-- values gathered on demand, and lines run on every rank (%all). The other ranks serve:
-- rank 0 broadcasts what it wants (a gather, a line, or that the REPL closed) and every
-- rank takes part. Between requests a plain line runs on rank 0 alone, and a collective
-- there fails at once instead of waiting for ranks that sit at the prompt.
local ffi = require "ffi"
local ms = require "moonshard"
local lib = require("moonshard.ffi").lib
local Tensor = require "moonshard.tensor"

local M = {}

local STOP, GATHER, RUN = 0, 1, 2
-- Ranks wait for rank 0's next request while a person types; collectives use this
-- timeout during the session and the world's own timeout again afterwards.
local SESSION_TIMEOUT = 7 * 24 * 3600
M.ALONE = "the other ranks are waiting at the REPL prompt; run the line on every rank " ..
          "with %all <line>"

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

-- fn(...) with collectives allowed on rank 0 (the serving ranks take part).
local function with_peers(fn, ...)
  local previous = ms.dist._set_alone(nil)
  local results = {pcall(fn, ...)}
  ms.dist._set_alone(previous)
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, table.maxn(results))
end

local function request(op, argument)
  local message = ms.tensor({op, argument}, {dtype = "i64"})
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
  if not self.distributed then return full_value(self.params[index]) end
  return with_peers(function()
    request(GATHER, index)
    return full_value(self.params[index])
  end)
end

function Live:parameter(fqn) return self.params[self.index[fqn]] end

-- Bytes of rank 0's text on every rank (its length already known to all).
local function broadcast_text(text, length)
  local bytes = Tensor.empty_raw({math.max(length, 1)}, Tensor.dtype_ids.u8, lib.MS_POOL_CPU)
  if text then ffi.copy(lib.ms_tensor_data(bytes._c), text, length) end
  ms.dist.broadcast(bytes, 0)
  local received = ffi.string(lib.ms_tensor_data(bytes._c), length)
  bytes:_release()
  return received
end

-- Every rank's text, in rank order, on every rank.
local function all_texts(text)
  local world = ms.dist.get_world_size()
  local lengths = ms.zeros(world, {dtype = "i64"})
  local mine = ms.tensor({#text}, {dtype = "i64"})
  ms.dist.all_gather_into_tensor(lengths, mine)
  local sizes = lengths:table()
  local longest = math.max(1, unpack(sizes))
  local send = Tensor.empty_raw({longest}, Tensor.dtype_ids.u8, lib.MS_POOL_CPU)
  ffi.copy(lib.ms_tensor_data(send._c), text, #text)
  local received = Tensor.empty_raw({longest * world}, Tensor.dtype_ids.u8, lib.MS_POOL_CPU)
  ms.dist.all_gather_into_tensor(received, send)
  local data = ffi.cast("const char *", lib.ms_tensor_data(received._c))
  local texts = {}
  for r = 1, world do texts[r] = ffi.string(data + (r - 1) * longest, sizes[r]) end
  for _, t in ipairs({lengths, mine, send, received}) do t:_release() end
  return texts
end

-- After a line every rank meets at a barrier, repeated while ranks that stopped early
-- (an error, an interrupt) meet peers still inside a collective of the line.
local function resynchronise()
  local world = ms.dist._world("repl")
  for _ = 1, 1000 do
    local status = lib.ms_dist_barrier(world._c)
    if status == 0 then return end
    if status ~= lib.MS_ERR_MISMATCH and status ~= lib.MS_ERR_INTERRUPTED then
      require("moonshard.ffi").check(status, "repl: %all")
    end
  end
  error("%all: the ranks could not agree to finish the line", 0)
end

-- Run run(source) on every rank (rank 0): returns each rank's text, in rank order.
function Live:run_everywhere(source, run)
  if not self.distributed then return {run(source)} end
  return with_peers(function()
    request(RUN, #source)
    broadcast_text(source, #source)
    local text = run(source)
    resynchronise()
    return all_texts(text)
  end)
end

-- Serve rank 0's requests until it closes the session (ranks other than 0). SIGINT is
-- rank 0's while this rank waits; during a line every rank handles it.
function Live:serve(run)
  while true do
    lib.ms_interrupt_ignore_sigint(1)
    local op, argument = request(STOP, 0)
    lib.ms_interrupt_ignore_sigint(0)
    if op == STOP then return end
    if op == GATHER then
      full_value(self.params[argument]):free()
    elseif op == RUN then
      local text = run(broadcast_text(nil, argument))
      resynchronise()
      all_texts(text)
    end
  end
end

function Live:begin_session()
  if self.distributed then
    self.timeout = ms.dist.get_timeout()
    ms.dist.set_timeout(SESSION_TIMEOUT)
  end
end

-- Rank 0: tell the serving ranks the session is over.
function Live:end_session()
  if self.distributed then
    if ms.dist.get_rank() == 0 then with_peers(request, STOP, 0) end
    ms.dist.set_timeout(self.timeout)
  end
end

return M
