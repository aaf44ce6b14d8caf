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

function M.is_placement(p)
  local mt = getmetatable(p)
  return type(p) == "table" and (mt == Shard or mt == Replicate)
end

-- Check that placements is an array of ndim placements (ms.Shard(d) or ms.Replicate()).
function M.check(placements, ndim, what)
  if type(placements) ~= "table" or M.is_placement(placements) then
    fail(what, "placements must be an array with one ms.Shard(d) or ms.Replicate() per mesh dim, got %s",
         M.is_placement(placements) and tostring(placements) or type(placements))
  end
  for i = 1, #placements do
    local p = placements[i]
    if not M.is_placement(p) then
      fail(what, "placement %d must be ms.Shard(d) or ms.Replicate(), got %s%s", i,
           type(p) == "string" and "the string " or "", type(p) == "string" and ("'" .. p .. "'") or type(p))
    end
  end
  if #placements ~= ndim then fail(what, "%d placements for a %d-D mesh", #placements, ndim) end
end

-- Rows [start, start + length) of n held by rank of size ranks: chunks of ceil(n / size);
-- later ranks may hold fewer rows or none.
function M.shard_range(n, size, rank)
  local chunk = math.ceil(n / size)
  local start = math.min(n, rank * chunk)
  local stop = math.min(n, start + chunk)
  return start, stop - start, chunk
end

return M
