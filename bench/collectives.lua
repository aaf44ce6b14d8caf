-- Collective bandwidth and latency, local backend against OpenMPI in the same run, each row
-- with its copy bound. Prints JSON lines; algbw and busbw follow nccl-tests
-- (doc/PERFORMANCE.md).
-- Usage (repository root): luajit bench/collectives.lua [--ranks 2,4] [--max-bytes 268435456]
--   [--ops all_reduce,all_gather,reduce_scatter,broadcast] [--rounds 1] [--no-mpi]
-- The summary lines give, over the rounds, the range of the local/mpi busbw ratio and of the
-- fraction of the copy bound at 64 MiB, and of the 1 KiB latency. When the OpenMPI rows are
-- left out, a {"mpi_rows":"missing"} line says why (--no-mpi, run under mpirun, no mpirun, a
-- build without MPI, or mpirun failing).
--
-- The copy bound. B is a row's bytes (the larger buffer: all_gather's output,
-- reduce_scatter's input, all_reduce's and broadcast's tensor), n the ranks. Counted is the
-- least each rank must read (R) and write (W) even if it could read its peers' tensors
-- directly (one copy, no staging through the segment), priced as a plain copy of
-- X = (R + W) / 2 bytes (a copy of X reads X and writes X):
--   all_gather      each rank writes its whole output (W = B) and reads every block of it
--                   once: its own input and the n - 1 others' (R = B).   X = B
--   reduce_scatter  each rank writes its block (W = B/n) and reads that block of every
--                   rank's input, the n operands it adds (R = B).        X = (n+1)/(2n) * B
--   all_reduce      each rank writes the whole result (W = B). Each of the B/n-byte pieces
--                   of the result is summed once, from n operands (n * B/n read by the rank
--                   that sums it), and copied by the other n - 1 ranks (B/n read by each).
--                   Over all ranks that is n*B + (n-1)*B reads; summing a piece twice would
--                   read n bytes where a copy reads 1. Split evenly, R = (2n-1)/n * B.
--                                                                        X = (3n-1)/(2n) * B
--   broadcast       each of the n - 1 other ranks reads B and writes B; the root need move
--                   nothing, so only n - 1 ranks copy.                   X = B
-- bound_us is the time of that copy measured in the same run by the same forked ranks, all
-- copying at once between their own buffers from the tensor allocator (the ranks share the
-- memory bus), with the faster of memcpy and a streaming-store copy (ms_local_stream_copy).
-- Each (op, size) alternates blocks of collective calls and of copies REPEATS times; every
-- call starts on all ranks after a barrier and is timed from the first rank's start to the
-- last rank's end; time_us and bound_us are the fastest call of each (the machine is
-- shared: the fastest call is the least disturbed), median_us the collective's median.
-- fraction_of_bound = bound_us / time_us. It can exceed 1 where a collective reads peers'
-- pieces from cache rather than memory (the bound prices every byte at the memory's rate).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local dist = ms.dist
local lib = require("moonshard.ffi").lib

local support = require "bench.support"
local now = support.now

local function parse_args(argv)
  local opts = {ranks = {2, 4}, max_bytes = 256 * 2 ^ 20, rounds = 1, mpi = true,
                ops = {"all_reduce", "all_gather", "reduce_scatter", "broadcast"}}
  local i = 1
  while i <= #argv do
    local a, v = argv[i], argv[i + 1]
    local function list(text, convert)
      local out = {}
      for item in text:gmatch("[^,]+") do out[#out + 1] = convert and convert(item) or item end
      return out
    end
    if a == "--ranks" then opts.ranks, i = list(v, tonumber), i + 1
    elseif a == "--max-bytes" then opts.max_bytes, i = tonumber(v), i + 1
    elseif a == "--ops" then opts.ops, i = list(v), i + 1
    elseif a == "--rounds" then opts.rounds, i = tonumber(v), i + 1
    elseif a == "--no-mpi" then opts.mpi = false
    elseif a == "--worker" then opts.worker, i = tonumber(v), i + 1
    else error("collectives.lua: unknown argument " .. a) end
    i = i + 1
  end
  return opts
end

-- nccl-tests: bytes is the larger buffer; busbw scales algbw to what each link carries.
local BUS_FACTOR = {
  all_reduce = function(n) return 2 * (n - 1) / n end,
  all_gather = function(n) return (n - 1) / n end,
  reduce_scatter = function(n) return (n - 1) / n end,
  broadcast = function() return 1 end,
}

local function sizes(max_bytes)
  local out, bytes = {}, 1024
  while bytes <= max_bytes do
    out[#out + 1] = bytes
    bytes = bytes * 4
  end
  return out
end

-- Per rank copy bytes of the bound (see the top), as a factor of B, and its formula.
local COPY_FACTOR = {
  all_gather = function() return 1 end,
  reduce_scatter = function(n) return (n + 1) / (2 * n) end,
  all_reduce = function(n) return (3 * n - 1) / (2 * n) end,
  broadcast = function() return 1 end,
}
local COPY_FORMULA = {
  all_gather = "memcpy of B per rank, n ranks at once",
  reduce_scatter = "memcpy of (n+1)/(2n)*B per rank, n ranks at once",
  all_reduce = "memcpy of (3n-1)/(2n)*B per rank, n ranks at once",
  broadcast = "memcpy of B per non-root rank, n-1 ranks at once",
}
local REPEATS = 5

-- Every byte of t written once, so no page is left unmapped (a read of the zero page would
-- be free).
local function touch(t)
  ffi.fill(t:data_ptr(), t:nbytes(), 0)
  return t
end

local function buffer(count, dtype)
  return touch(ms.empty(count, {dtype = dtype or "f32"}))
end

-- The call for op on bytes (f32 sum), with its buffers.
local function prepare(op, bytes, size)
  local count = math.floor(bytes / 4 / size) * size
  if op == "all_reduce" then
    local t = buffer(count)
    return function() dist.all_reduce(t, "sum") end
  elseif op == "broadcast" then
    local t = buffer(count)
    return function() dist.broadcast(t, 0) end
  elseif op == "all_gather" then
    local out, input = buffer(count), buffer(count / size)
    return function() dist.all_gather_into_tensor(out, input) end
  end
  local out, input = buffer(count / size), buffer(count)
  return function() dist.reduce_scatter_tensor(out, input, "sum") end
end

-- The bound's copies for op on bytes: copy_bytes between two buffers of this rank, with
-- memcpy and with streaming stores (ms_local_stream_copy), or nothing on a rank that need
-- not copy (broadcast's root).
local function prepare_copies(op, bytes, size, rank)
  local copy_bytes = math.floor(bytes * COPY_FACTOR[op](size))
  if op == "broadcast" and rank == 0 then
    local idle = function() end
    return {memcpy = idle, stream = idle}
  end
  local src, dst = buffer(copy_bytes, "u8"), buffer(copy_bytes, "u8")
  local s, d = src:data_ptr(), dst:data_ptr()
  return {memcpy = function() ffi.copy(d, s, copy_bytes) end,
          stream = function() lib.ms_local_stream_copy(d, s, copy_bytes) end,
          buffers = {src, dst}}
end

-- Seconds of the fastest and the median of a block of calls, each call timed from the first rank's start
-- to the last rank's end (the clock is the same in every process), every rank starting it
-- after a barrier: a call whose ranks did not run at the same time does not look faster.
local function measure(call, bytes)
  local iterations = math.max(5, math.min(500, math.floor(2 ^ 27 / bytes)))
  call()
  local starts = ms.empty(iterations, {dtype = "f64"})
  local ends = ms.empty(iterations, {dtype = "f64"})
  local s = ffi.cast("double *", starts:data_ptr())
  local e = ffi.cast("double *", ends:data_ptr())
  for i = 0, iterations - 1 do
    dist.barrier()
    s[i] = now()
    call()
    e[i] = now()
  end
  dist.all_reduce(starts, "min")
  dist.all_reduce(ends, "max")
  local spans = {}
  for i = 0, iterations - 1 do spans[i + 1] = e[i] - s[i] end
  table.sort(spans)
  return spans[1], spans[math.floor((#spans + 1) / 2)]
end

local function record(backend, size, op, bytes, seconds, bound_seconds, median_seconds)
  local algbw = bytes / seconds / 1e9
  return {backend = backend, ranks = size, op = op, bytes = bytes, time_us = seconds * 1e6,
          median_us = median_seconds * 1e6, algbw = algbw, busbw = algbw * BUS_FACTOR[op](size),
          bound_us = bound_seconds * 1e6, fraction = bound_seconds / seconds}
end

local function json(r)
  return string.format('{"backend":"%s","ranks":%d,"op":"%s","bytes":%d,"time_us":%.2f,' ..
                       '"median_us":%.2f,"algbw_gbps":%.3f,"busbw_gbps":%.3f,"bound_us":%.2f,' ..
                       '"fraction_of_bound":%.3f,"bound":"%s"}', r.backend, r.ranks, r.op,
                       r.bytes, r.time_us, r.median_us, r.algbw, r.busbw, r.bound_us,
                       r.fraction, COPY_FORMULA[r.op])
end

-- The collective and its bound's copies, in blocks alternating REPEATS times: the fastest
-- call of each (the machine is shared: the fastest call is the one least disturbed); the
-- bound is the faster copy; also the median of the blocks' median calls.
local function measure_with_bound(op, bytes, size, rank)
  local call = prepare(op, bytes, size)
  local copies = prepare_copies(op, bytes, size, rank)
  local best, medians, best_copy = math.huge, {}, {memcpy = math.huge, stream = math.huge}
  for _ = 1, REPEATS do
    local fastest, median = measure(call, bytes)
    best, medians[#medians + 1] = math.min(best, fastest), median
    for _, kind in ipairs({"memcpy", "stream"}) do
      best_copy[kind] = math.min(best_copy[kind], (measure(copies[kind], bytes)))
    end
  end
  table.sort(medians)
  return best, math.min(best_copy.memcpy, best_copy.stream), medians[math.floor((#medians + 1) / 2)]
end

-- Every rank measures every op and size; rank 0 returns the records.
local function worker(rank, size, opts, backend)
  local records = {}
  for _, op in ipairs(opts.ops) do
    for _, bytes in ipairs(sizes(opts.max_bytes)) do
      local r = record(backend, size, op, bytes, ms.no_grad(function()
        return measure_with_bound(op, bytes, size, rank)
      end))
      if rank == 0 then
        records[#records + 1] = r
        if backend == "mpi" then
          io.write(json(r), "\n")
          io.flush()
        end
      end
      collectgarbage()
    end
  end
  return records
end

local function run_local(opts, size)
  local results = dist.spawn(size, worker, opts, "local")
  for _, r in ipairs(results[1]) do print(json(r)) end
  return results[1]
end

local function run_mpi(opts, size)
  local command = string.format(
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n %d " ..
    "luajit bench/collectives.lua --worker %d --max-bytes %d --ops %s 2>&1", size, size,
    opts.max_bytes, table.concat(opts.ops, ","))
  local records, last, pipe = {}, nil, io.popen(command)
  for line in pipe:lines() do
    local op, bytes, time_us = line:match('"op":"([%w_]+)","bytes":(%d+),"time_us":([%d.]+)')
    local median_us, bound_us = line:match('"median_us":([%d.]+)'), line:match('"bound_us":([%d.]+)')
    if op and bound_us and median_us then
      local r = record("mpi", size, op, tonumber(bytes), tonumber(time_us) / 1e6,
                       tonumber(bound_us) / 1e6, tonumber(median_us) / 1e6)
      records[#records + 1] = r
      print(json(r))
    else
      io.stderr:write("mpirun: ", line, "\n")
      if line:match("%S") then last = line end
    end
  end
  pipe:close()
  local expected = #opts.ops * #sizes(opts.max_bytes)
  if #records < expected then
    return records, string.format("mpirun gave %d of %d rows%s", #records, expected,
                                  last and ("; its last line: " .. last) or "")
  end
  return records
end

local function memcpy_baseline(max_bytes)
  for _, bytes in ipairs(sizes(max_bytes)) do
    local src, dst = ffi.new("uint8_t[?]", bytes), ffi.new("uint8_t[?]", bytes)
    ffi.fill(src, bytes, 1)
    ffi.fill(dst, bytes, 2)
    ffi.copy(dst, src, bytes)
    local iterations = math.max(5, math.min(2000, math.floor(2 ^ 29 / bytes)))
    local start = now()
    for _ = 1, iterations do ffi.copy(dst, src, bytes) end
    local seconds = (now() - start) / iterations
    print(string.format('{"backend":"memcpy","op":"memcpy","bytes":%d,"time_us":%.2f,"gbps":%.3f}',
                        bytes, seconds * 1e6, bytes / seconds / 1e9))
  end
end

-- Each round's records by (backend, ranks, op, bytes).
local function index_round(records)
  local by_key = {}
  for _, r in ipairs(records) do by_key[r.backend .. r.ranks .. r.op .. r.bytes] = r end
  return by_key
end

-- The smallest and largest of fn(round) over the rounds where it is not nil.
local function range(rounds, fn)
  local low, high
  for _, round in ipairs(rounds) do
    local v = fn(round)
    if v then
      low, high = math.min(low or v, v), math.max(high or v, v)
    end
  end
  return low, high
end

-- Per op at 64 MiB: the local/mpi busbw ratio and the fraction of the copy bound of each
-- round; 1 KiB latencies. Ranges over
-- the rounds (the machine is shared, so single runs are noisy).
local function summary(rounds, size)
  local target = 64 * 2 ^ 20
  for _, op in ipairs({"reduce_scatter", "all_reduce", "all_gather"}) do
    local l_key, m_key = "local" .. size .. op .. target, "mpi" .. size .. op .. target
    local low, high = range(rounds, function(round)
      local l, m = round[l_key], round[m_key]
      return l and m and l.busbw / m.busbw
    end)
    if low then
      local l_low, l_high = range(rounds, function(round) return round[l_key] and round[l_key].busbw end)
      local m_low, m_high = range(rounds, function(round) return round[m_key] and round[m_key].busbw end)
      print(string.format('{"summary":"busbw local/mpi","ranks":%d,"op":"%s","bytes":%d,' ..
                          '"local_busbw_gbps":[%.3f,%.3f],"mpi_busbw_gbps":[%.3f,%.3f],' ..
                          '"ratio":[%.2f,%.2f],"rounds":%d}', size, op, target, l_low, l_high,
                          m_low, m_high, low, high, #rounds))
    end
  end
  for _, op in ipairs({"all_reduce", "all_gather", "reduce_scatter", "broadcast"}) do
    for _, backend in ipairs({"local", "mpi"}) do
      local key = backend .. size .. op .. target
      local low, high = range(rounds, function(round) return round[key] and round[key].fraction end)
      if low then
        print(string.format('{"summary":"fraction of the copy bound","backend":"%s","ranks":%d,' ..
                            '"op":"%s","bytes":%d,"fraction":[%.2f,%.2f],"rounds":%d}', backend,
                            size, op, target, low, high, #rounds))
      end
    end
  end
  for _, op in ipairs({"all_reduce", "all_gather", "reduce_scatter", "broadcast"}) do
    local l_low, l_high = range(rounds, function(round)
      return round["local" .. size .. op .. 1024] and round["local" .. size .. op .. 1024].time_us
    end)
    local m_low, m_high = range(rounds, function(round)
      return round["mpi" .. size .. op .. 1024] and round["mpi" .. size .. op .. 1024].time_us
    end)
    if l_low then
      print(string.format('{"summary":"latency 1 KiB","ranks":%d,"op":"%s","local_us":[%.2f,%.2f]%s}',
                          size, op, l_low, l_high, m_low and
                          string.format(',"mpi_us":[%.2f,%.2f]', m_low, m_high) or ""))
    end
  end
end

local opts = parse_args(arg)
if opts.worker then
  dist.spawn(opts.worker, worker, opts, "mpi")
  return
end
memcpy_baseline(opts.max_bytes)
local rounds = {}
-- Why the OpenMPI rows are left out (nil: they run).
local function mpi_missing()
  if not opts.mpi then return "--no-mpi was given" end
  if lib.ms_mpi_launched() ~= 0 then return "this process runs under mpirun (the comparison launches mpirun itself)" end
  if os.execute("command -v mpirun >/dev/null 2>&1") ~= 0 then return "mpirun is not on PATH (install openmpi-bin)" end
  if not ffi.string(lib.ms_build_config()):match("^[^;]*mpi") then
    return "this library was built without MPI (configure with -DMS_WITH_MPI=ON)"
  end
end
local missing = mpi_missing()
local with_mpi = missing == nil
if missing then support.emit({mpi_rows = "missing", why = missing}, {"mpi_rows", "why"}) end
for round = 1, opts.rounds do
  local records = {}
  for _, size in ipairs(opts.ranks) do
    for _, r in ipairs(run_local(opts, size)) do records[#records + 1] = r end
    if with_mpi then
      local mpi_records, why = run_mpi(opts, size)
      if why then support.emit({mpi_rows = "missing", ranks = size, why = why}, {"mpi_rows", "ranks", "why"}) end
      for _, r in ipairs(mpi_records) do records[#records + 1] = r end
    end
  end
  rounds[round] = index_round(records)
end
for _, size in ipairs(opts.ranks) do summary(rounds, size) end
