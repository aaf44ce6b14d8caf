-- Device tensors travel through the host pool (page-locked once CUDA is in use), since the
-- store reads and writes host memory only: a save copies a device chunk into a host tensor,
-- a load reads into a host buffer and copies that to the device.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local lib, check = C.lib, C.check

local M = {}

function M.on_device(t)
  return t._c.storage.pool >= lib.MS_POOL_CUDA0
end

local function host_like(t)
  return Tensor.empty_raw(t:shape(), t._c.dtype, lib.MS_POOL_HOST)
end

-- A host tensor with t's values for a save: t itself unless it is on a device.
function M.saved(t, what)
  if not M.on_device(t) then return t end
  local copy = host_like(t)
  check(lib.ms_copy(copy._c, t._c), what)
  return copy
end

-- Fill t through read(target), which reads into a host tensor of t's shape: t itself unless
-- it is on a device, else a buffer copied to the device afterwards and released.
function M.read_into(t, read, what)
  if not M.on_device(t) then return read(t) end
  local buffer = host_like(t)
  local ok, err = pcall(function()
    read(buffer)
    check(lib.ms_copy(t._c, buffer._c), what)
  end)
  buffer:_release()
  if not ok then error(err, 0) end
end

return M
