-- Distributed checkpoint throughput through ms.dcp on forked ranks: durable save against
-- write()+fsync and load against read() of the same bytes in the same run, a resharded load,
-- and how long an async save blocks the caller, also counting how much slower the work right
-- after it runs (an immediate write of every tensor, and a step's reads and writes), where
-- writes wait for copy-on-write copies and the writer thread competes for memory bandwidth.
-- Prints JSON lines (medians and ranges).
-- Usage (repository root): luajit bench/dcp.lua [--mib 1024] [--ranks 1,2,4] [--rounds 3]
--   [--warmup 2] [--dir /tmp] [--cold] [--export-only]
--   (--cold evicts the files from the page cache before each read). MS_ASYNC_STAGING=copy in
--   the environment measures async saves that copy every tensor at the call instead of
--   staging it copy-on-write. The export lines read every entry of a step of 1000 and of
--   16000 small tensors, as `moonshard ckpt export` does: linear when the time per entry holds.
-- Timed rounds follow warm-up rounds (a raw write, a save and an async save keeping the two
-- newest steps), after which both the raw file and the store rewrite space they hold already
-- (the store holds four steps' worth at most: two kept, one committed before retention runs,
-- one being written). The first warm-up round, where both write new files, is reported as
-- save_fresh.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp
local lib = require("moonshard.ffi").lib
local placement = require "moonshard.placement"

pcall(ffi.cdef, [[
int open(const char *path, int flags, int mode);
long write(int fd, const void *buf, size_t count);
long read(int fd, void *buf, size_t count);
int fsync(int fd);
int close(int fd);
int posix_fadvise(int fd, long offset, long len, int advice);
struct dcp_bench_rusage { long utime_s, utime_us, stime_s, stime_us; long other[14]; };
int getrusage(int who, struct dcp_bench_rusage *usage);
]])

local O_RDONLY, O_WRITE_CREATE, POSIX_FADV_DONTNEED = 0, 1 + 64, 4
local TENSORS, COLUMNS = 32, 4096

local function parse_args(argv)
  local opts = {mib = 1024, ranks = {1, 2, 4}, rounds = 3, warmup = 2, dir = "/tmp", cold = false,
                export_only = false}
  local i = 1
  while i <= #argv do
    local a, v = argv[i], argv[i + 1]
    if a == "--mib" then opts.mib, i = tonumber(v), i + 1
    elseif a == "--ranks" then
      opts.ranks = {}
      for r in v:gmatch("[^,]+") do opts.ranks[#opts.ranks + 1] = tonumber(r) end
      i = i + 1
    elseif a == "--rounds" then opts.rounds, i = tonumber(v), i + 1
    elseif a == "--warmup" then opts.warmup, i = tonumber(v), i + 1
    elseif a == "--dir" then opts.dir, i = v, i + 1
    elseif a == "--cold" then opts.cold = true
    elseif a == "--export-only" then opts.export_only = true
    else error("dcp.lua: unknown argument " .. a) end
    i = i + 1
  end
  return opts
end

local function io_loop(call, fd, ptr, n, what)
  local bytes = ffi.cast("uint8_t *", ptr)
  local done = 0
  while done < n do
    local got = tonumber(call(fd, bytes + done, n - done))
    if got <= 0 then error("dcp.lua: " .. what .. " failed") end
    done = done + got
  end
end

-- The raw baseline: this rank's tensor bytes written in order with write(), then fsync. The
-- file is not truncated, so after the first round the writes land in space it holds already,
-- as the store's do (the first warm-up round removes it first: a write into new space).
local function raw_write(path, tensors)
  local fd = ffi.C.open(path, O_WRITE_CREATE, 420)
  for _, t in ipairs(tensors) do io_loop(ffi.C.write, fd, t:data_ptr(), t:nbytes(), "write") end
  assert(ffi.C.fsync(fd) == 0)
  ffi.C.close(fd)
end

local function raw_read(path, tensors)
  local fd = ffi.C.open(path, O_RDONLY, 0)
  for _, t in ipairs(tensors) do io_loop(ffi.C.read, fd, t:data_ptr(), t:nbytes(), "read") end
  ffi.C.close(fd)
end

local function evict(path)
  local fd = ffi.C.open(path, O_RDONLY, 0)
  if fd >= 0 then
    ffi.C.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    ffi.C.close(fd)
  end
end

local function evict_store(dir, ranks)
  evict(dir .. "/index.mdb")
  for r = 0, ranks - 1 do evict(dir .. "/shard-" .. r .. ".mdb") end
end

-- TENSORS row-sharded DTensors of [rows, COLUMNS] f32, mib MiB in all.
local function sharded_state(mib, rank)
  local mesh = dist.init_device_mesh({dist.get_world_size()})
  local rows = mib * 2 ^ 20 / (TENSORS * COLUMNS * 4)
  local sd, locals = {}, {}
  for i = 1, TENSORS do
    local _, length = placement.shard_range(rows, mesh:size(0), rank)
    local local_rows = ms.empty(length, COLUMNS)
    local_rows:fill_(rank + i)
    sd[string.format("layers.%02d.weight", i)] = ms.DTensor.new(local_rows, mesh, {ms.Shard(0)}, {rows, COLUMNS})
    locals[#locals + 1] = local_rows
  end
  return {model = sd}, locals
end

local usage = ffi.new("struct dcp_bench_rusage")
-- CPU seconds (user + system) of this process's threads so far.
local function cpu_seconds()
  ffi.C.getrusage(0, usage)
  return tonumber(usage.utime_s + usage.stime_s) + tonumber(usage.utime_us + usage.stime_us) * 1e-6
end

local function reduced(seconds, op)
  local t = ms.tensor({seconds}, {dtype = "f64"})
  dist.all_reduce(t, op)
  return t:item()
end

-- Wall seconds op takes on the slowest rank (barriers on both sides) and the CPU seconds all
-- ranks spent in it: on a shared machine the CPU time is the steadier comparison.
local function timed(op)
  dist.barrier()
  local start, cpu = lib.ms_clock_seconds(), cpu_seconds()
  op()
  cpu = cpu_seconds() - cpu
  dist.barrier()
  return lib.ms_clock_seconds() - start, reduced(cpu, "sum")
end

-- What an optimizer step does to each tensor's memory: read and write every element.
local function write_pass(locals)
  for _, t in ipairs(locals) do t:mul_(1) end
end

-- The memory traffic of a training step on its parameters: forward and backward read every
-- one, then the optimizer writes every one.
local function step_pass(locals)
  for _ = 1, 2 do
    for _, t in ipairs(locals) do t:sum() end
  end
  write_pass(locals)
end

local function run_world(opts, ranks, store_dir, reshard_from)
  return dist.spawn(ranks, function(rank)
    ms.set_num_threads(1)
    local sd, locals = sharded_state(opts.mib, rank)
    local raw_path = string.format("%s/raw-%d.bin", store_dir, rank)
    local times = {raw_write = {}, save = {}, raw_read = {}, load = {}, async_block = {}, async_total = {},
                   reshard_load = {}, fresh_raw_write = {}, fresh_save = {}, cpu = {},
                   write_pass = {}, async_write_pass = {}, step_pass = {}, async_step_pass = {}}
    local function add(name, seconds, cpu)
      times[name][#times[name] + 1] = seconds
      if cpu then
        times.cpu[name] = times.cpu[name] or {}
        table.insert(times.cpu[name], cpu)
      end
    end
    for round = 1, opts.warmup do
      local step = 2 * round - 1
      if round == 1 then os.remove(raw_path) end
      local raw_seconds, raw_cpu = timed(function() raw_write(raw_path, locals) end)
      local save_seconds, save_cpu = timed(function() dcp.save(sd, store_dir, {step = step}) end)
      if round == 1 then
        add("fresh_raw_write", raw_seconds, raw_cpu)
        add("fresh_save", save_seconds, save_cpu)
      end
      dcp.async_save(sd, store_dir, {step = step + 1, keep_last = 2}):wait()
    end
    for round = opts.warmup + 1, opts.warmup + opts.rounds do
      add("raw_write", timed(function() raw_write(raw_path, locals) end))
      local step = 2 * round - 1
      add("save", timed(function() dcp.save(sd, store_dir, {step = step}) end))
      if opts.cold then evict(raw_path) end
      add("raw_read", timed(function() raw_read(raw_path, locals) end))
      if opts.cold then evict_store(store_dir, ranks) end
      add("load", timed(function() dcp.load(sd, store_dir, {step = step}) end))
      if reshard_from then
        if opts.cold then evict_store(reshard_from.dir, reshard_from.ranks) end
        add("reshard_load", timed(function() dcp.load(sd, reshard_from.dir) end))
      end
      -- Writes to a tensor the async save has not copied yet wait for its copy: time what
      -- follows the call with no save pending and right after async_save returns, both as
      -- an immediate write of every tensor (the worst case) and as a step's traffic.
      local passes = {write = write_pass, step = step_pass}
      local after = {}
      for _, name in ipairs({"write", "step"}) do
        local plain = timed(function() passes[name](locals) end)
        add(name .. "_pass", reduced(plain, "max"))
        dist.barrier()
        local start = lib.ms_clock_seconds()
        -- Retention (the two newest steps stay) runs in the async saves, outside the timed ones.
        local h = dcp.async_save(sd, store_dir, {step = step + 1, keep_last = 2})
        local blocked = lib.ms_clock_seconds() - start
        after[name] = timed(function() passes[name](locals) end)
        h:wait()
        dist.barrier()
        if name == "write" then
          add("async_total", lib.ms_clock_seconds() - start)
          add("async_block", reduced(blocked, "max"))
        end
        add("async_" .. name .. "_pass", reduced(after[name], "max"))
        if name == "write" then -- the step measurement saves this step again
          if rank == 0 then dcp.delete(store_dir, step + 1) end
          dist.barrier()
        end
      end
    end
    os.remove(raw_path)
    return times
  end)[1]
end

local function sorted(values)
  local copy = {unpack(values)}
  table.sort(copy)
  return copy
end

local function median(values)
  local s = sorted(values)
  local n = #s
  return n % 2 == 1 and s[(n + 1) / 2] or (s[n / 2] + s[n / 2 + 1]) / 2
end

local function gbps(bytes, seconds) return bytes / seconds / 1e9 end

local function json_line(fields, order)
  local parts = {}
  for _, key in ipairs(order) do
    local v = fields[key]
    if v ~= nil then
      local text
      if type(v) == "string" then text = string.format("%q", v)
      elseif type(v) == "table" then
        local items = {}
        for i, x in ipairs(v) do items[i] = string.format("%.4g", x) end
        text = "[" .. table.concat(items, ", ") .. "]"
      elseif type(v) == "boolean" then text = tostring(v)
      else text = string.format("%.4g", v) end
      parts[#parts + 1] = string.format("%q: %s", key, text)
    end
  end
  print("{" .. table.concat(parts, ", ") .. "}")
end

local ORDER = {"bench", "op", "ranks", "from_ranks", "bytes", "gbps", "gbps_range", "baseline",
               "baseline_gbps", "ratio", "first_ratio", "target", "meets_target", "cpu_ratio", "seconds",
               "cpu_seconds", "baseline_cpu_seconds", "cold", "pass_seconds",
               "after_save_pass_seconds", "staging", "entries", "us_per_entry"}

-- ratio: median throughput against the baseline's; cpu_ratio: baseline CPU time over the op's.
local function report(op, ranks, bytes, times, name, baseline, baseline_name, target, extra)
  local seconds, baseline_seconds = times[name], times[baseline]
  local value, base = gbps(bytes, median(seconds)), gbps(bytes, median(baseline_seconds))
  local s = sorted(seconds)
  local cpu, baseline_cpu = times.cpu[name], times.cpu[baseline]
  local fields = {bench = "dcp", op = op, ranks = ranks, bytes = bytes, gbps = value,
                  gbps_range = {gbps(bytes, s[#s]), gbps(bytes, s[1])}, baseline = baseline_name,
                  baseline_gbps = base, ratio = value / base, target = target,
                  meets_target = value / base >= target, seconds = seconds, cold = extra.cold,
                  from_ranks = extra.from_ranks, cpu_seconds = cpu, baseline_cpu_seconds = baseline_cpu,
                  cpu_ratio = median(baseline_cpu) / median(cpu)}
  json_line(fields, ORDER)
end

-- Every entry of a step of n small tensors read once through store:read (ckpt export's loop).
local function export_reads(opts)
  for _, n in ipairs({1000, 16000}) do
    local dir = string.format("%s/ms-bench-dcp-export-%d-%d.ckpt", opts.dir, n, os.time())
    local sd = {}
    for i = 1, n do sd[string.format("model.t%05d", i)] = ms.full({4, 4}, i) end
    dcp.save(sd, dir, {step = 1})
    local store = dcp.open(dir)
    local start = lib.ms_clock_seconds()
    for _, e in ipairs(store:entries(1)) do store:read(e.fqn, 1):free() end
    local seconds = lib.ms_clock_seconds() - start
    store:close()
    os.execute("rm -rf '" .. dir .. "'")
    json_line({bench = "dcp", op = "export_reads", entries = n, seconds = seconds,
               us_per_entry = seconds / n * 1e6}, ORDER)
  end
end

local function main()
  local opts = parse_args(arg)
  if opts.export_only then return export_reads(opts) end
  local bytes = opts.mib * 2 ^ 20
  local stores = {}
  local runs = {}
  for _, ranks in ipairs(opts.ranks) do
    local dir = string.format("%s/ms-bench-dcp-%d-%d.ckpt", opts.dir, ranks, os.time())
    os.execute("mkdir -p '" .. dir .. "'")
    local previous = stores[#stores]
    local times = run_world(opts, ranks, dir, previous)
    stores[#stores + 1] = {dir = dir, ranks = ranks}
    runs[#runs + 1] = {ranks = ranks, times = times, from = previous and previous.ranks}
  end
  for _, run in ipairs(runs) do
    local t, extra = run.times, {cold = opts.cold}
    report("save", run.ranks, bytes, t, "save", "raw_write", "write+fsync", 0.7, extra)
    if #t.fresh_save > 0 then
      report("save_fresh", run.ranks, bytes, t, "fresh_save", "fresh_raw_write", "write+fsync", 0.7, extra)
    end
    report("load", run.ranks, bytes, t, "load", "raw_read", "read", 0.9, extra)
    if run.from then
      report("reshard_load", run.ranks, bytes, t, "reshard_load", "raw_read", "read", 0.9,
             {cold = opts.cold, from_ranks = run.from})
    end
    -- The first async save allocates its staging buffers (in a warm-up round when there is
    -- one); later ones reuse them.
    local steady = {}
    for i = opts.warmup > 0 and 1 or 2, #t.async_block do steady[#steady + 1] = t.async_block[i] / median(t.save) end
    local ratio = #steady > 0 and median(steady) or t.async_block[1] / median(t.save)
    json_line({bench = "dcp", op = "async_save_block", ranks = run.ranks, bytes = bytes,
               staging = os.getenv("MS_ASYNC_STAGING") or "cow",
               seconds = t.async_block, first_ratio = t.async_block[1] / median(t.save), ratio = ratio,
               target = 0.1, meets_target = ratio < 0.1, baseline = "sync save"}, ORDER)
    -- Blocking that includes how much slower the work after the call ran.
    for _, name in ipairs({"write", "step"}) do
      local with_work = {}
      for i = 1, #t.async_block do
        local extra = math.max(0, t["async_" .. name .. "_pass"][i] - median(t[name .. "_pass"]))
        with_work[i] = (t.async_block[i] + extra) / median(t.save)
      end
      json_line({bench = "dcp", op = "async_save_block_then_" .. name, ranks = run.ranks, bytes = bytes,
                 staging = os.getenv("MS_ASYNC_STAGING") or "cow",
                 pass_seconds = t[name .. "_pass"], after_save_pass_seconds = t["async_" .. name .. "_pass"],
                 ratio = median(with_work), baseline = "sync save"}, ORDER)
    end
    json_line({bench = "dcp", op = "async_save_total", ranks = run.ranks, bytes = bytes,
               gbps = gbps(bytes, median(t.async_total)), seconds = t.async_total}, ORDER)
  end
  for _, s in ipairs(stores) do os.execute("rm -rf '" .. s.dir .. "'") end
  export_reads(opts)
end

main()
