-- The collectives of a distributed save: every rank learns every rank's outcome (its chunk
-- table, or its error), so all ranks succeed or fail together instead of waiting forever.
local ffi = require "ffi"
local Tensor = require "moonshard.tensor"
local lib = require("moonshard.ffi").lib
local finally = require "moonshard.finally"

local M = {}

local function dist() return require "moonshard.dist" end

-- This process's rank and the world size (0 and 1 outside dist.spawn and mpirun).
function M.world()
  local d = dist()
  if not d.is_initialized() then return 0, 1 end
  return d.get_rank(), d.get_world_size()
end

-- Every rank passes ok and a string (its chunk table or its error message); returns an
-- array, by rank + 1, of {ok =, bytes =}.
function M.all_gather(ok, bytes)
  local _, world_size = M.world()
  if world_size == 1 then return {{ok = ok, bytes = bytes}} end
  local d = dist()
  local buffers = {}
  local function buffer(n, dtype)
    buffers[#buffers + 1] = Tensor.empty_raw({n}, Tensor.dtype_ids[dtype], lib.MS_POOL_CPU)
    return buffers[#buffers]
  end
  -- the buffers go back to the pool also when a collective raises
  return finally(function()
    for _, t in ipairs(buffers) do t:_release() end
  end, function()
    local header = buffer(2, "i64")
    local fields = ffi.cast("int64_t *", header:data_ptr())
    fields[0], fields[1] = ok and 1 or 0, #bytes
    local headers = buffer(2 * world_size, "i64")
    d.all_gather_into_tensor(headers, header)
    local all = ffi.cast("int64_t *", headers:data_ptr())
    local longest = 1
    for r = 0, world_size - 1 do longest = math.max(longest, tonumber(all[2 * r + 1])) end
    local send = buffer(longest, "u8")
    ffi.copy(send:data_ptr(), bytes, #bytes)
    local received = buffer(longest * world_size, "u8")
    d.all_gather_into_tensor(received, send)
    local data = ffi.cast("const char *", received:data_ptr())
    local out = {}
    for r = 0, world_size - 1 do
      out[r + 1] = {ok = all[2 * r] == 1, bytes = ffi.string(data + r * longest, all[2 * r + 1])}
    end
    return out
  end)
end

-- A raised message without its "moonshard: <function>: " prefix.
function M.detail(message)
  return (tostring(message):gsub("^moonshard: [^:]+: ", ""))
end

-- The error every rank raises when some ranks failed: nil when all succeeded.
function M.failure(outcomes)
  if #outcomes == 1 then return (not outcomes[1].ok) and M.detail(outcomes[1].bytes) or nil end
  local lines = {}
  for r, o in ipairs(outcomes) do
    if not o.ok then lines[#lines + 1] = string.format("rank %d: %s", r - 1, M.detail(o.bytes)) end
  end
  if #lines == 0 then return nil end
  return table.concat(lines, "; ")
end

return M
