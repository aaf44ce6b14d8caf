-- DTensor placements: Shard(dim) and Replicate(), comparable with == and printable like
-- PyTorch's; plus the dim-0 row split every sharded tensor uses.
local C = require "moonshard.ffi"

local fail = C.fail

local M = {}

local Shard = {__name = "Shard"}
Shard.__index = Shard
Shard.__eq = function(a, b) return a.dim == b.dim end
Shard.__tostring = function(p) return "Shard(" .. p.dim .. ")" end
function Shard:is_shard(dim) return dim == nil or dim == self.dim end
function Shard:is_replicate() return false end

local Replicate = {__name = "Replicate"}
Replicate.__index = Replicate
Replicate.__eq = function() return true end
Replicate.__tostring = function() return "Replicate()" end
function Replicate:is_shard() return false end
function Replicate:is_replicate() return true end

function M.Shard(dim)
  if type(dim) ~= "number" or dim < 0 or dim % 1 ~= 0 then
    fail("Shard", "dim must be a non-negative integer, got %s", tostring(dim))
  end
  return setmetatable({dim = dim}, Shard)
end

local replicate = setmetatable({}, Replicate)
function M.Replicate() return replicate end

-- Rows [start, start + length) of n held by rank of size ranks: chunks of ceil(n / size);
-- later ranks may hold fewer rows or none.
function M.shard_range(n, size, rank)
  local chunk = math.ceil(n / size)
  local start = math.min(n, rank * chunk)
  local stop = math.min(n, start + chunk)
  return start, stop - start, chunk
end

return M
