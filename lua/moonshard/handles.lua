-- Ownership of tensor handles without a finalizer per handle. A finalizer per handle (ffi.gc)
-- costs more than a small op itself and aborts any trace being recorded when it runs.
-- Instead each handle takes a slot that keeps its address (to free it) and its cdata weakly:
-- the handle lives while anything holds its cdata (t._c), as it would with ffi.gc. One
-- sentinel finalizer notices each completed collection; the next flush then frees the handles
-- whose cdata that collection found dead. The tensor constructor flushes before allocating
-- (so freed storage is reused at once) and the memory statistics flush before reading.
-- The state is kept in the Lua registry: modules reloaded in one Lua state (busted) share it,
-- so tensors made before a reload are still freed. At lua_close every handle left is freed.
local ffi = require "ffi"
local lib = require("moonshard.ffi").lib

local M = {}

local registry = debug.getregistry()
local S = registry.moonshard_handles
if not S then
  S = {
    cdata = setmetatable({}, {__mode = "v"}), -- slot -> the handle's cdata (weak)
    addresses = ffi.new("ms_tensor*[?]", 1025), -- slot -> the handle (1-based; NULL when free)
    capacity = 1024,
    top = 0,        -- highest slot used
    free = {},      -- stack of free slots below top
    nfree = 0,
    due = false,    -- a collection completed since the last flush
  }
  registry.moonshard_handles = S
  -- The sentinel is garbage from birth: its finalizer runs at the end of each collection
  -- cycle and makes the next one.
  local function arm()
    getmetatable(newproxy(true)).__gc = function()
      S.due = true
      arm()
    end
  end
  arm()
  -- Lives as long as the registry: its finalizer runs at lua_close.
  S.closer = ffi.gc(ffi.new("char[1]"), function()
    local addresses = S.addresses
    for slot = 1, S.top do
      local handle = addresses[slot]
      if handle ~= nil then
        addresses[slot] = nil
        lib.ms_tensor_free(handle)
      end
    end
  end)
end

local cdata, free = S.cdata, S.free

-- Free the handles whose cdata were collected.
local function flush()
  S.due = false
  local addresses = S.addresses
  for slot = 1, S.top do
    if cdata[slot] == nil then
      local handle = addresses[slot]
      if handle ~= nil then
        addresses[slot] = nil
        lib.ms_tensor_free(handle)
        local n = S.nfree + 1
        free[n] = slot
        S.nfree = n
      end
    end
  end
end

-- Flush when a collection completed since the last flush (cheap otherwise).
function M.flush_due()
  if S.due then flush() end
end

local function grow()
  local capacity = 2 * S.capacity
  local bigger = ffi.new("ms_tensor*[?]", capacity + 1)
  ffi.copy(bigger, S.addresses, ffi.sizeof("ms_tensor*") * (S.capacity + 1))
  S.addresses, S.capacity = bigger, capacity
end

-- Own handle (a fresh ms_tensor* cdata): returns its slot, for release.
function M.own(handle)
  local slot
  local n = S.nfree
  if n > 0 then
    slot = free[n]
    S.nfree = n - 1
  else
    slot = S.top + 1
    S.top = slot
    if slot > S.capacity then grow() end
  end
  cdata[slot] = handle
  S.addresses[slot] = handle
  return slot
end

-- Free handle, owned in slot, now.
function M.release(slot, handle)
  cdata[slot] = nil
  S.addresses[slot] = nil
  local n = S.nfree + 1
  free[n] = slot
  S.nfree = n
  lib.ms_tensor_free(handle)
end

return M
