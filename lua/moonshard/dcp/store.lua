-- dcp.open(dir): a read-only view of a store for inspection: its committed steps, the
-- entries of a step, one value read whole, and a checksum verification of every chunk.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local values = require "moonshard.dcp.values"
local handle = require "moonshard.dcp.handle"
local options = require "moonshard.dcp.options"

local ffi = require "ffi"
local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local Store = {}
Store.__index = Store
Store.__name = "dcp.Store"

function M.open(dir)
  return setmetatable({_s = handle.open(dir, handle.READ_ONLY, "dcp.open"), dir = dir}, Store)
end

local function live(self, what)
  if self._s == nil then fail(what, "the store %s was closed", self.dir) end
  return self._s
end

local function step_or_latest(self, step, what)
  if step ~= nil then return options.check_step(step, what) end
  local latest = handle.latest(live(self, what), what)
  if latest == nil then fail(what, "%s has no committed step", self.dir) end
  return latest
end

-- Committed steps, ascending.
function Store:steps() return handle.steps(live(self, "store:steps"), "store:steps") end

-- The entries of step (the latest by default), sorted by fqn: {fqn =, kind =, nbytes =}
-- plus dtype, shape and chunks for tensors; kind is "tensor", "number", "string" or "boolean".
function Store:entries(step)
  local what = "store:entries"
  local list = handle.entries(live(self, what), step_or_latest(self, step, what), what)
  local out = {}
  for i, e in ipairs(list) do
    out[i] = {fqn = e.fqn, kind = e.kind == "tensor" and "tensor" or values.kind(e.bytes, e.nbytes),
              nbytes = e.nbytes, dtype = e.dtype, shape = e.shape, chunks = e.chunks}
  end
  return out
end

local chunk_out = ffi.new("ms_store_chunk")

-- The stored chunks of tensor fqn: {rank =, offsets =, sizes =, nbytes =}.
function Store:chunks(fqn, step)
  local what = "store:chunks"
  local s = live(self, what)
  step = step_or_latest(self, step, what)
  local entry = type(fqn) == "string" and handle.entry(s, step, fqn, what) or nil
  if not entry or entry.kind ~= "tensor" then
    fail(what, "%s: step %d has no tensor '%s'", self.dir, step, tostring(fqn))
  end
  local out = {}
  for i = 0, entry.chunks - 1 do
    check(lib.ms_store_chunk_at(s, step, fqn, i, chunk_out), what)
    local offsets, sizes = {}, {}
    for d = 0, chunk_out.ndim - 1 do
      offsets[d + 1], sizes[d + 1] = tonumber(chunk_out.offsets[d]), tonumber(chunk_out.sizes[d])
    end
    out[#out + 1] = {rank = chunk_out.rank, offsets = offsets, sizes = sizes, nbytes = tonumber(chunk_out.nbytes)}
  end
  return out
end

-- The value of fqn at step (the latest by default): a new full tensor, or a Lua value.
function Store:read(fqn, step)
  local what = "store:read"
  local s = live(self, what)
  step = step_or_latest(self, step, what)
  if type(fqn) ~= "string" then fail(what, "fqn must be a string, got %s", type(fqn)) end
  local entry = handle.entry(s, step, fqn, what)
  if not entry then fail(what, "%s: step %d has no entry '%s'", self.dir, step, fqn) end
  if entry.kind ~= "tensor" then return values.decode(entry.bytes, entry.nbytes, fqn, what) end
  local out = Tensor.empty_raw(entry.shape, entry.dtype_id, lib.MS_POOL_CPU)
  check(lib.ms_store_read_tensor(s, step, fqn, out._c, nil), what)
  return out
end

local function deleted_meanwhile(message)
  return tostring(message):find("was deleted while reading", 1, true) ~= nil
end

-- A raised message without its "moonshard: <function>: " prefix.
local function detail(message)
  return (tostring(message):gsub("^moonshard: [^ ]+: ", ""))
end

-- Check every chunk of step (every committed step by default) against its checksum, or
-- only those of entry fqn. Returns the problems found, {step =, fqn =, message =} each
-- (empty when all is well; a step whose manifest cannot be read is one problem without an
-- fqn), and the steps deleted while they were checked (another process ran retention
-- meanwhile: not damage). A step that is not committed raises.
function Store:verify(step, fqn)
  local what = "store:verify"
  local s = live(self, what)
  if fqn ~= nil and type(fqn) ~= "string" then fail(what, "fqn must be a string, got %s", type(fqn)) end
  local every = step == nil and fqn == nil
  local steps = every and handle.steps(s, what) or {step_or_latest(self, step, what)}
  local problems, deleted = {}, {}
  for _, st in ipairs(steps) do
    local listed, entries = pcall(handle.entries, s, st, what)
    if not listed then
      local gone = deleted_meanwhile(entries)
      if not gone and every then
        gone = true
        for _, other in ipairs(handle.steps(s, what)) do gone = gone and other ~= st end
      end
      if gone then
        deleted[#deleted + 1] = st
      elseif not every and tostring(entries):find(("step %d is not committed"):format(st), 1, true) then
        error(entries, 0)
      else
        problems[#problems + 1] = {step = st, message = detail(entries)}
      end
      entries = {}
    end
    if fqn ~= nil and listed then
      local found
      for _, e in ipairs(entries) do
        if e.fqn == fqn then found = e end
      end
      if not found then fail(what, "%s: step %d has no entry '%s'", self.dir, st, fqn) end
      entries = {found}
    end
    for _, e in ipairs(entries) do
      if lib.ms_store_verify_entry(s, st, e.fqn) ~= 0 then
        local message = ffi.string(lib.ms_last_error())
        if deleted_meanwhile(message) then
          deleted[#deleted + 1] = st
          break
        end
        problems[#problems + 1] = {step = st, fqn = e.fqn, message = message}
      end
    end
  end
  return problems, deleted
end

function Store:close()
  if self._s ~= nil then
    handle.close(self._s)
    self._s = nil
  end
end

function Store:__tostring()
  return string.format("dcp.Store(%s)", self.dir)
end

return M
