-- FSDP's communication counters (cumulative per process): collectives issued, bytes moved
-- (in all and per kind) and seconds spent inside them, so benchmarks can split a step into
-- communication and compute. fsdp.stats() returns a copy; fsdp.reset_stats() zeroes them.
local C = require "moonshard.ffi"

local lib = C.lib

local M = {}

local counters = {all_gathers = 0, reduce_scatters = 0, all_reduces = 0, bytes = 0, comm_seconds = 0,
                  all_gather_bytes = 0, reduce_scatter_bytes = 0, all_reduce_bytes = 0}
local BYTES = {all_gathers = "all_gather_bytes", reduce_scatters = "reduce_scatter_bytes", all_reduces = "all_reduce_bytes"}

-- Run the collective fn(...) and count it under kind, moving bytes.
function M.timed(kind, bytes, fn, ...)
  local start = lib.ms_clock_seconds()
  fn(...)
  counters.comm_seconds = counters.comm_seconds + (lib.ms_clock_seconds() - start)
  counters[kind] = counters[kind] + 1
  counters.bytes = counters.bytes + bytes
  counters[BYTES[kind]] = counters[BYTES[kind]] + bytes
end

function M.snapshot()
  local out = {}
  for k, v in pairs(counters) do out[k] = v end
  return out
end

function M.reset()
  for k in pairs(counters) do counters[k] = 0 end
end

return M
