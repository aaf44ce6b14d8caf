-- What the benchmarks share: the clocks (wall time on the runtime's monotonic clock, CPU time
-- of the calling thread and of the process) and JSON-line output.
local ffi = require "ffi"
local ms = require "moonshard"

local M = {}

if not pcall(ffi.typeof, "struct ms_bench_timespec") then
  ffi.cdef [[
    struct ms_bench_timespec { long seconds; long nanoseconds; };
    int clock_gettime(int clock, struct ms_bench_timespec *now);
  ]]
end
local CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID = 2, 3
local now_buf = ffi.new("struct ms_bench_timespec")
local function read(clock)
  ffi.C.clock_gettime(clock, now_buf)
  return tonumber(now_buf.seconds) + tonumber(now_buf.nanoseconds) * 1e-9
end

-- Wall seconds (monotonic).
M.now = ms.clock
-- CPU seconds of the calling thread: leaves out waiting for a core other processes hold.
function M.thread_cpu() return read(CLOCK_THREAD_CPUTIME_ID) end
-- CPU seconds (user + system) of every thread of this process.
function M.process_cpu() return read(CLOCK_PROCESS_CPUTIME_ID) end

-- Print one JSON line: fields[key] for each key of order that is set, in that order (strings
-- quoted, booleans as they are, numbers with 6 significant digits), and flush it.
function M.emit(fields, order)
  local parts = {}
  for _, key in ipairs(order) do
    local v = fields[key]
    if v ~= nil then
      local text
      if type(v) == "string" then text = string.format("%q", v)
      elseif type(v) == "boolean" then text = tostring(v)
      else text = string.format("%.6g", v) end
      parts[#parts + 1] = string.format("%q:%s", key, text)
    end
  end
  print("{" .. table.concat(parts, ",") .. "}")
  io.stdout:flush()
end

return M
