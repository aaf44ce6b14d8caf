-- dist.spawn: run a function on n ranks and collect what each returned. Locally the ranks
-- are forked processes; under a launcher (mpirun, moonshard run) fn runs once per process.
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local pack = require "moonshard.pack"
local dist = require "moonshard.dist"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local traceback = require("moonshard.traceback").traceback

-- Run fn as rank and return (ok, bytes): the packed result, or the error and traceback.
local function run(fn, rank, size, args)
  local ok, result = xpcall(function() return fn(rank, size, unpack(args, 1, args.n)) end,
                            traceback)
  if not ok then return false, result end
  local packed, bytes = pcall(pack.encode, result, "the result")
  if not packed then return false, traceback(bytes) end
  return true, bytes
end

-- "[rank 1] message" for each entry.
local function rank_lines(entries)
  local lines = {}
  for _, e in ipairs(entries) do
    lines[#lines + 1] = string.format("[rank %d] %s", e.rank, e.message)
  end
  return table.concat(lines, "\n")
end

-- "dist.spawn: ranks 1, 2 of 4 failed" followed by each failed rank's error.
local function raise_failures(failures, size)
  local ranks = {}
  for _, f in ipairs(failures) do ranks[#ranks + 1] = tostring(f.rank) end
  fail("dist.spawn", "rank%s %s of %d failed:\n%s", #ranks > 1 and "s" or "",
       table.concat(ranks, ", "), size, rank_lines(failures))
end

local function parse_options(n, what)
  local opts = type(n) == "table" and n or {nprocs = n}
  local size = opts.nprocs
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then
    fail(what, "the number of ranks must be a positive integer, got %s", tostring(size))
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    fail(what, "timeout must be a positive number of seconds")
  end
  return size, opts.timeout and math.ceil(opts.timeout * 1000) or 0
end

-- ---- local ranks ----

local function spawn_local(size, timeout_ms, fn, args)
  local what = "dist.spawn"
  local job_out, rank_out = ffi.new("ms_spawn*[1]"), ffi.new("int[1]")
  check(lib.ms_spawn_new(job_out, size, timeout_ms, rank_out), what)
  local rank = rank_out[0]
  if rank >= 0 then
    local ok, bytes = run(fn, rank, size, args)
    lib.ms_local_finish(ok and 0 or 1, bytes, #bytes)
    os.exit(1) -- ms_local_finish does not return in a rank
  end
  local job = job_out[0]
  local collected, outcome, interruption = {}, ffi.new("ms_rank_outcome"), nil
  local ok, err = pcall(function()
    local waited = lib.ms_spawn_wait(job)
    if waited == lib.MS_ERR_INTERRUPTED then
      interruption = ffi.string(lib.ms_last_error())
    else
      check(waited, what)
    end
    for r = 0, size - 1 do
      check(lib.ms_spawn_outcome(job, r, outcome), what)
      local entry = {rank = r, state = outcome.state, reason = ffi.string(outcome.reason)}
      if outcome.state == lib.MS_RANK_RETURNED then
        entry.value = pack.decode(outcome.bytes, tonumber(outcome.nbytes))
      elseif outcome.state == lib.MS_RANK_FAILED then
        entry.message = ffi.string(outcome.bytes, outcome.nbytes)
      else
        entry.message = entry.reason
      end
      collected[r + 1] = entry
    end
  end)
  lib.ms_spawn_free(job)
  if not ok then error(err, 0) end
  if interruption then
    for _, entry in ipairs(collected) do entry.message = entry.message or entry.reason end
    fail(what, "%s:\n%s", interruption, rank_lines(collected))
  end
  local results, failures = {}, {}
  for r = 1, size do
    if collected[r].message then
      failures[#failures + 1] = {rank = r - 1, message = collected[r].message}
    else
      results[r] = collected[r].value
    end
  end
  if #failures > 0 then raise_failures(failures, size) end
  return results
end

-- ---- processes a launcher started (mpirun, moonshard run) ----

-- Every process gets every process's (ok, bytes); returns an array indexed by rank + 1.
local function exchange(world, ok, bytes)
  local what = "dist.spawn"
  local size = world:size()
  local mine = Tensor.empty_raw({2}, Tensor.dtype_ids.i64, lib.MS_POOL_CPU)
  local header = ffi.cast("int64_t *", lib.ms_tensor_data(mine._c))
  header[0], header[1] = ok == nil and -1 or (ok and 1 or 0), #bytes
  local headers = Tensor.empty_raw({2 * size}, Tensor.dtype_ids.i64, lib.MS_POOL_CPU)
  check(lib.ms_dist_all_gather_into_tensor(world._c, headers._c, mine._c), what)
  local all = ffi.cast("int64_t *", lib.ms_tensor_data(headers._c))
  local longest = 1
  for r = 0, size - 1 do longest = math.max(longest, tonumber(all[2 * r + 1])) end
  local send = Tensor.empty_raw({longest}, Tensor.dtype_ids.u8, lib.MS_POOL_CPU)
  ffi.copy(lib.ms_tensor_data(send._c), bytes, #bytes)
  local received = Tensor.empty_raw({longest * size}, Tensor.dtype_ids.u8, lib.MS_POOL_CPU)
  check(lib.ms_dist_all_gather_into_tensor(world._c, received._c, send._c), what)
  local data = ffi.cast("const char *", lib.ms_tensor_data(received._c))
  local entries = {}
  for r = 0, size - 1 do
    local state, length = tonumber(all[2 * r]), tonumber(all[2 * r + 1])
    entries[r + 1] = {state = state, bytes = ffi.string(data + r * longest, length)}
  end
  for _, t in ipairs({mine, headers, send, received}) do t:_release() end
  return entries
end

-- Members that raised early stop at the next collective with a mismatch; the barrier is
-- repeated until every member has left the function.
local function resynchronise(group)
  for _ = 1, 1000 do
    local status = lib.ms_dist_barrier(group._c)
    if status ~= lib.MS_ERR_MISMATCH then return check(status, "dist.spawn") end
  end
  fail("dist.spawn", "the ranks could not agree to finish")
end

-- Specs written for several world sizes run under one mpirun -n 4 (tools/test_mpi.sh):
-- there dist.spawn(n < 4) runs on the first n processes.
local function subgroups_allowed() return os.getenv("MOONSHARD_SPAWN_SUBGROUPS") == "1" end

local function spawn_launched(launcher, size, timeout_ms, fn, args)
  local what = "dist.spawn"
  local world = dist._world(what)
  if size ~= world:size() and not (size < world:size() and subgroups_allowed()) then
    fail(what, "%d ranks requested but %s started %d; call dist.spawn(%d, fn) or launch %d",
         size, launcher, world:size(), world:size(), size)
  end
  local members = {}
  for r = 0, size - 1 do members[r + 1] = r end
  local group = size == world:size() and world or dist.new_group(members)
  if timeout_ms > 0 then check(lib.ms_group_set_timeout(group._c, timeout_ms), what) end
  local ok, bytes = nil, ""
  if group:rank() >= 0 then
    ok, bytes = dist._with_world(group, run, fn, group:rank(), size, args)
    resynchronise(group)
  end
  local entries = exchange(world, ok, bytes)
  local results, failures = {}, {}
  for r = 1, size do
    local e = entries[r]
    if e.state == 1 then
      results[r] = pack.decode(e.bytes)
    else
      failures[#failures + 1] = {rank = r - 1, message = e.bytes}
    end
  end
  if #failures > 0 then raise_failures(failures, size) end
  return results
end

-- dist.spawn(n, fn, ...) or dist.spawn({nprocs = n, timeout = seconds}, fn, ...): fn(rank,
-- n, ...) runs on every rank; returns {rank 0's value, rank 1's value, ...}.
function M.spawn(n, fn, ...)
  local what = "dist.spawn"
  local size, timeout_ms = parse_options(n, what)
  if not C.is_callable(fn) then fail(what, "fn must be callable, got %s", type(fn)) end
  local args = {n = select("#", ...), ...}
  if lib.ms_mpi_launched() == 1 then
    return spawn_launched("mpirun", size, timeout_ms, fn, args)
  elseif M._launcher then
    return spawn_launched(M._launcher, size, timeout_ms, fn, args)
  end
  return spawn_local(size, timeout_ms, fn, args)
end

-- Set in each rank by a launcher that runs a whole script per rank ("moonshard run"):
-- dist.spawn inside the script then runs fn in this process, as under mpirun.
M._launcher = nil

return M
