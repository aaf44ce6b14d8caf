-- Rank 0's view of training: a progress bar redrawn in place on a terminal (a line every
-- log_every steps otherwise) and a metrics file with one JSON object per step.
local ffi = require "ffi"
local json = require "dkjson"
local ms = require "moonshard"

pcall(ffi.cdef, "int isatty(int fd);")
-- Wall-clock seconds with sub-second resolution (CLOCK_MONOTONIC).
pcall(ffi.cdef, [[
  typedef struct { long tv_sec; long tv_nsec; } moonshard_example_timespec;
  int clock_gettime(int clock, moonshard_example_timespec *ts);
]])

local M = {}

local Progress = {}
Progress.__index = Progress

local function mib(bytes) return bytes / (1024 * 1024) end

-- M.new{total_steps, first_step, tokens_per_step, metrics_path, log_every, append}
function M.new(opts)
  local mode = opts.append and "a" or "w"
  local metrics, err = io.open(opts.metrics_path, mode)
  if not metrics then error("train: cannot write the metrics file: " .. tostring(err), 0) end
  return setmetatable({
    total = opts.total_steps, tokens_per_step = opts.tokens_per_step, metrics = metrics,
    log_every = opts.log_every or 10, tty = ffi.C.isatty(1) == 1, last_time = M.now(),
    first_step = opts.first_step,
  }, Progress)
end

local ts = ffi.new("moonshard_example_timespec")
function M.now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local function bar(done, total, width)
  local filled = math.floor(width * done / total + 0.5)
  return string.rep("#", filled) .. string.rep("-", width - filled)
end

-- Record one finished step: its loss, and the learning rate used.
function Progress:step(step, loss, lr)
  local now = M.now()
  local seconds = now - self.last_time
  self.last_time = now
  self.seconds = self.seconds or {}
  self.seconds[#self.seconds + 1] = seconds
  local tokens_per_s = self.tokens_per_step / math.max(seconds, 1e-9)
  local mem = ms.memory_stats("cpu")
  self:record{step = step, loss = loss, lr = lr, tokens_per_s = tokens_per_s, step_seconds = seconds,
              memory_bytes = mem.allocated, peak_memory_bytes = mem.peak}
  local line = string.format("step %5d/%d [%s] loss %.4f  %.2f s/step %7.0f tok/s  mem %.1f MiB (peak %.1f)",
                             step, self.total, bar(step, self.total, 24), loss, seconds, tokens_per_s,
                             mib(mem.allocated), mib(mem.peak))
  local keep = step == self.first_step or step % self.log_every == 0 or step == self.total
  if self.tty then
    io.stdout:write("\r\27[K", line, keep and "\n" or "")
  elseif keep then
    io.stdout:write(line, "\n")
  end
  io.stdout:flush()
end

local FIELDS = {"step", "loss", "lr", "tokens_per_s", "step_seconds", "memory_bytes",
                "peak_memory_bytes", "nonfinite"}

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

-- One line of metrics.jsonl. JSON has no nan or inf: such a value is written as null and
-- named in "nonfinite" ({"loss": "nan"}); the first one also prints a warning.
function Progress:record(values)
  local nonfinite
  for _, key in ipairs(FIELDS) do
    local v = values[key]
    if type(v) == "number" and not finite(v) then
      nonfinite = nonfinite or {}
      nonfinite[key] = v ~= v and "nan" or (v > 0 and "inf" or "-inf")
      if not self.warned then
        self.warned = true
        io.stderr:write(("train: warning: %s is %s at step %d (written as null in the metrics file; " ..
                         "this warning is not repeated)\n"):format(key, nonfinite[key], values.step))
      end
    end
  end
  values.nonfinite = nonfinite
  self.metrics:write(json.encode(values, {keyorder = FIELDS}), "\n")
  self.metrics:flush()
end

function Progress:close() self.metrics:close() end

-- Every rank calls it: rank 0 (the one with a meter) prints the mean s/step (the first
-- step excluded when there are more) and each rank's peak compute memory.
function M.report_peaks(meter)
  local world = ms.dist.get_world_size()
  local mine = ms.tensor({ms.memory_stats("cpu").peak}, {dtype = "f64"})
  local all = ms.zeros(world, {dtype = "f64"})
  ms.dist.all_gather_into_tensor(all, mine)
  if meter and meter.seconds then
    local times = meter.seconds
    local first = #times > 1 and 2 or 1
    local total = 0
    for i = first, #times do total = total + times[i] end
    local peaks = {}
    for rank, bytes in ipairs(all:table()) do peaks[rank] = ("%.1f"):format(mib(bytes)) end
    print(("%.3f s/step over %d step(s); peak memory per rank (MiB): %s"):format(
      total / (#times - first + 1), #times - first + 1, table.concat(peaks, " ")))
  end
  mine:free()
  all:free()
end

return M
