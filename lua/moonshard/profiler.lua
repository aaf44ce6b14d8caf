-- ms.profiler: where the time of a piece of work goes, by category (GEMM, attention, layer norm,
-- ...), with PyTorch's feel: ms.profiler.profile(fn) runs fn and returns its key_averages rows.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local autograd = require "moonshard.autograd"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

-- The runtime's categories, in the order of ms_profile_category (runtime/ops.h).
M.CATEGORIES = {"gemm", "attention", "layer_norm", "elementwise", "softmax_loss", "optimizer", "embedding",
                "reduce", "copy", "random", "allocator"}
local INDEX = {}
for i, name in ipairs(M.CATEGORIES) do INDEX[name] = i - 1 end
local N = #M.CATEGORIES

-- True while profile() runs: ops that group other ops (attention) then name their scope.
M.active = false

local ns_buf, count_buf = ffi.new("uint64_t[?]", N), ffi.new("uint64_t[?]", N)

local function read()
  check(lib.ms_profile_read(ns_buf, count_buf, N), "profiler")
  local ns, calls, total = {}, {}, 0
  for i = 0, N - 1 do
    ns[i + 1], calls[i + 1] = tonumber(ns_buf[i]), tonumber(count_buf[i])
    total = total + ns[i + 1]
  end
  return ns, calls, total
end

-- Seconds FSDP's collectives took so far (0 when FSDP is not loaded).
local function comm_seconds()
  local stats = package.loaded["moonshard.fsdp.stats"]
  return stats and stats.snapshot().comm_seconds or 0
end

-- Run fn(...) with every op in it charged to category (a name of M.CATEGORIES), whatever its
-- kind; outside profile() it just runs fn.
function M.within(category, fn, ...)
  if not M.active then return fn(...) end
  local index = INDEX[category] or fail("profiler.within", "unknown category %s", tostring(category))
  local previous = lib.ms_profile_scope(index)
  local result = {pcall(fn, ...)}
  lib.ms_profile_scope(previous)
  if not result[1] then error(result[2], 0) end
  return unpack(result, 2)
end

local Profile = {}
Profile.__index = Profile

-- Rows {key, count, self_ms, percent} by self time, largest first (PyTorch's key_averages).
-- Besides the runtime's categories: collectives (FSDP's, in Lua), autograd (backward's own
-- bookkeeping: its time less the ops and collectives it ran) and lua (everything else: op
-- dispatch, module code, the caller's own work).
function Profile:key_averages()
  local rows = {}
  for _, row in ipairs(self.rows) do rows[#rows + 1] = row end
  table.sort(rows, function(a, b) return a.self_ms > b.self_ms end)
  return rows
end

-- The rows as an aligned text table.
function Profile:table()
  local lines = {string.format("%-14s %8s %12s %8s", "category", "calls", "self ms", "%")}
  for _, row in ipairs(self:key_averages()) do
    lines[#lines + 1] = string.format("%-14s %8d %12.3f %8.1f", row.key, row.count, row.self_ms, row.percent)
  end
  lines[#lines + 1] = string.format("%-14s %8s %12.3f", "total", "", self.total_ms)
  return table.concat(lines, "\n")
end

-- Run fn(...) with the profiler on; returns the Profile (rows, by_key, total_ms) and fn's
-- results. Profiles do not nest.
function M.profile(fn, ...)
  if M.active then fail("profiler.profile", "a profile is already running") end
  if type(fn) ~= "function" then fail("profiler.profile", "expected a function, got %s", type(fn)) end
  local backward = autograd.backward
  local backward_seconds, backward_inner = 0, 0
  autograd.backward = function(...)
    local _, _, ops_before = read()
    local comm_before, start = comm_seconds(), lib.ms_clock_seconds()
    local ok, err = pcall(backward, ...)
    backward_seconds = backward_seconds + lib.ms_clock_seconds() - start
    local _, _, ops_after = read()
    backward_inner = backward_inner + (ops_after - ops_before) * 1e-9 + comm_seconds() - comm_before
    if not ok then error(err, 0) end
  end
  check(lib.ms_profile_enable(1), "profiler.profile")
  M.active = true
  local comm_start, start = comm_seconds(), lib.ms_clock_seconds()
  local result = {pcall(fn, ...)}
  local wall = lib.ms_clock_seconds() - start
  local ns, calls, ops_total = read()
  M.active = false
  lib.ms_profile_enable(0)
  autograd.backward = backward
  if not result[1] then error(result[2], 0) end
  local comm = comm_seconds() - comm_start
  local autograd_ms = math.max(0, backward_seconds - backward_inner) * 1e3
  local rows = {}
  for i, key in ipairs(M.CATEGORIES) do rows[i] = {key = key, count = calls[i], self_ms = ns[i] * 1e-6} end
  rows[#rows + 1] = {key = "collectives", count = 0, self_ms = comm * 1e3}
  rows[#rows + 1] = {key = "autograd", count = 0, self_ms = autograd_ms}
  rows[#rows + 1] = {key = "lua", count = 0,
                     self_ms = math.max(0, wall * 1e3 - ops_total * 1e-6 - comm * 1e3 - autograd_ms)}
  local by_key = {}
  for _, row in ipairs(rows) do
    row.percent = wall > 0 and row.self_ms / (wall * 1e3) * 100 or 0
    by_key[row.key] = row
  end
  return setmetatable({rows = rows, by_key = by_key, total_ms = wall * 1e3}, Profile), unpack(result, 2)
end

return M
