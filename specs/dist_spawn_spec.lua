-- dist.spawn: what comes back from the ranks and how their errors are reported (forked
-- ranks and under mpirun -n 4), and the faults forked ranks survive: crashes, exits, errors,
-- missing and stuck ranks, with no process or /dev/shm entry left behind (local only:
-- under mpirun, mpirun owns faults).
local ffi = require "ffi"
local ms = require "moonshard"
local dist = ms.dist
local lib = require("moonshard.ffi").lib

-- Each declaration once per LuaJIT state, whichever spec file made it first.
local function declare(name, declaration)
  if not pcall(function() return ffi.C[name] end) then ffi.cdef(declaration) end
end
declare("getpid", "int getpid(void);")
declare("kill", "int kill(int pid, int sig);")
declare("poll", "int poll(void *fds, unsigned long nfds, int timeout);")
declare("setrlimit", "struct rlimit { unsigned long rlim_cur, rlim_max; };" ..
                     "int setrlimit(int resource, const struct rlimit *limit);")

local RLIMIT_CORE, ESRCH = 4, 3
local under_mpi = lib.ms_mpi_launched() == 1
local function sleep_ms(ms_) ffi.C.poll(nil, 0, ms_) end
local function pid_alive(pid) return ffi.C.kill(pid, 0) == 0 or ffi.errno() ~= ESRCH end

-- The entries of /dev/shm, except those programs running beside the specs make: OpenMPI's
-- segments and POSIX named semaphores.
local function dev_shm()
  local names, listing = {}, io.popen("ls -A /dev/shm 2>/dev/null")
  for name in listing:lines() do
    if not name:match("^vader_segment%.") and not name:match("^sem%.") then
      names[#names + 1] = name
    end
  end
  listing:close()
  table.sort(names)
  return table.concat(names, "\n")
end

-- The pids of this process's children, zombies included.
local function child_processes()
  local me, children = ffi.C.getpid(), {}
  local listing = io.popen("ls /proc")
  local pids = {}
  for name in listing:lines() do
    if name:match("^%d+$") then pids[#pids + 1] = tonumber(name) end
  end
  listing:close()
  for _, pid in ipairs(pids) do
    local f = io.open("/proc/" .. pid .. "/stat")
    local stat = f and f:read("*a")
    if f then f:close() end
    local parent = stat and stat:match("%) %a (%d+)")
    if tonumber(parent) == me then children[#children + 1] = pid end
  end
  return children
end

-- Locally, every test also checks that nothing is left behind.
local function expect_nothing_left_behind()
  if under_mpi then return end
  local shm_before
  before_each(function() shm_before = dev_shm() end)
  after_each(function()
    assert.are.same({}, child_processes(), "child processes left behind")
    assert.are.equal(shm_before, dev_shm())
  end)
end

local function spawn_error(...)
  local ok, err = pcall(dist.spawn, ...)
  assert.is_false(ok, "dist.spawn should have raised")
  return err
end

local describe_local = under_mpi and pending or describe

describe("dist.spawn", function()
  expect_nothing_left_behind()

  describe("results", function()
    it("come back per rank: numbers, strings, booleans, nil and nested tables", function()
      local results = dist.spawn(3, function(rank, size, extra)
        return {rank = rank, size = size, extra = extra, half = rank / 2, big = 2 ^ 60,
                negative = -rank - 0.25, text = "rank\0" .. rank, yes = rank == 1,
                nested = {list = {1, 2, {deep = "x"}}, [7] = "seven", [true] = false},
                nothing = nil}
      end, "extra")
      assert.are.equal(3, #results)
      for r = 0, 2 do
        local got = results[r + 1]
        assert.are.same({rank = r, size = 3, extra = "extra", half = r / 2, big = 2 ^ 60,
                         negative = -r - 0.25, text = "rank\0" .. r, yes = r == 1,
                         nested = {list = {1, 2, {deep = "x"}}, [7] = "seven", [true] = false}},
                        got)
      end
    end)

    it("rebuild tensors of every dtype and shape in the parent", function()
      local results = dist.spawn(2, function(rank)
        local out = {}
        for _, dtype in ipairs({"f32", "f64", "bf16", "f16", "i32", "i64", "u8"}) do
          out[dtype] = (ms.arange(6) + rank):to(dtype):view(2, 3)
        end
        out.scalar = ms.tensor(rank + 0.5, {dtype = "f64"})
        out.empty = ms.zeros(0, 4)
        out.transposed = ms.arange(6):view(2, 3):t()
        return out
      end)
      for r = 0, 1 do
        local got = results[r + 1]
        for _, dtype in ipairs({"f32", "f64", "bf16", "f16", "i32", "i64", "u8"}) do
          assert.are.equal(dtype, got[dtype]:dtype())
          assert.are.same({2, 3}, got[dtype]:shape())
          assert.are.same({{r, r + 1, r + 2}, {r + 3, r + 4, r + 5}}, got[dtype]:table())
        end
        assert.are.equal(r + 0.5, got.scalar:item())
        assert.are.same({0, 4}, got.empty:shape())
        assert.are.same({{0, 3}, {1, 4}, {2, 5}}, got.transposed:table())
      end
    end)

    it("are nil for ranks that return nothing", function()
      local results = dist.spawn(2, function(rank) if rank == 1 then return "one" end end)
      assert.is_nil(results[1])
      assert.are.equal("one", results[2])
    end)

    it("refuse values that cannot travel, naming the rank and the place", function()
      local err = spawn_error(2, function(rank)
        if rank == 1 then return {inner = {fn = print}} end
      end)
      assert.matches("rank 1 of 2 failed", err)
      assert.matches("the result.inner.fn is a function", err)
    end)
  end)

  describe("errors", function()
    it("name every failed rank with its message and traceback", function()
      local err = spawn_error(4, function(rank)
        if rank == 1 or rank == 3 then error("boom on " .. rank) end
        return rank
      end)
      assert.matches("ranks 1, 3 of 4 failed", err)
      assert.matches("%[rank 1%] [^\n]*boom on 1\nstack traceback:", err)
      assert.matches("%[rank 3%] [^\n]*boom on 3", err)
      assert.is_nil(err:find("[rank 0]", 1, true))
    end)

  end)
end)

describe_local("dist.spawn on forked ranks", function()
  expect_nothing_left_behind()

  describe("errors", function()
    it("stop the peers' collectives with the failed rank's name", function()
      local err = spawn_error(3, function(rank)
        if rank == 2 then error("gave up") end
        dist.all_reduce(ms.zeros(10), "sum")
      end)
      assert.matches("ranks 0, 1, 2 of 3 failed", err)
      assert.matches("%[rank 0%] moonshard: dist.all_reduce: rank 2 raised an error", err)
      assert.matches("%[rank 2%] [^\n]*gave up", err)
    end)

    it("are raised for bad arguments", function()
      assert.matches("positive integer", spawn_error(0, function() end))
      assert.matches("fn must be a function", spawn_error(2, "nope"))
      assert.matches("timeout must be", spawn_error({nprocs = 2, timeout = -1}, function() end))
      local err = spawn_error(1, function() dist.spawn(2, function() end) end)
      assert.matches("rank 0 cannot spawn ranks of its own", err)
    end)

    it("leave no process behind", function()
      local pids = dist.spawn(3, function() return ffi.C.getpid() end)
      for _, pid in ipairs(pids) do assert.is_false(pid_alive(pid)) end
    end)

    it("outside spawn say where collectives can run", function()
      assert.has_error(function() dist.get_rank() end,
                       "moonshard: dist.get_rank: no process group: call it inside dist.spawn(n, fn) or run the script under mpirun")
    end)
  end)

  describe("faults", function()
    -- Rank 1 misbehaves while ranks 0 and 2 wait in an all_reduce.
    local function fault_error(misbehave)
      return spawn_error(3, function(rank)
        if rank == 1 then
          sleep_ms(50)
          misbehave()
        end
        dist.all_reduce(ms.zeros(100), "sum")
        return rank
      end)
    end

    it("a rank killed by SIGKILL fails the others, naming it", function()
      local err = fault_error(function() ffi.C.kill(ffi.C.getpid(), 9) end)
      assert.matches("ranks 0, 1, 2 of 3 failed", err)
      assert.matches("%[rank 0%] [^\n]*rank 1 died %(signal 9%)", err)
      assert.matches("%[rank 1%] died %(signal 9%)", err)
    end)

    it("a rank that segfaults fails the others #noasan", function()
      local err = fault_error(function()
        ffi.C.setrlimit(RLIMIT_CORE, ffi.new("struct rlimit", {0, 0}))
        ffi.cast("volatile int *", 0)[0] = 1
      end)
      assert.matches("%[rank 1%] died %(signal 11%)", err)
      assert.matches("%[rank 2%] [^\n]*rank 1 died %(signal 11%)", err)
    end)

    it("a rank that calls os.exit fails the others", function()
      local err = fault_error(function() os.exit(3) end)
      assert.matches("%[rank 1%] exited with status 3 without returning", err)
      assert.matches("%[rank 0%] [^\n]*rank 1 exited with status 3", err)
    end)

    it("a rank that returns early fails the collectives it skips", function()
      local err = spawn_error(2, function(rank)
        if rank == 0 then dist.all_reduce(ms.zeros(4), "sum") end
        return rank
      end)
      assert.matches("rank 0 of 2 failed", err)
      assert.matches("rank 1 returned without joining", err)
    end)

    it("a rank that never arrives times the others out", function()
      local err = spawn_error({nprocs = 2, timeout = 0.3}, function(rank)
        if rank == 1 then
          sleep_ms(5000)
          return "late"
        end
        dist.broadcast(ms.zeros(4), 1)
      end)
      assert.matches("ranks 0, 1 of 2 failed", err)
      assert.matches("%[rank 0%] [^\n]*broadcast: rank 1 did not arrive within 300 ms", err)
      assert.matches("%[rank 1%] was stopped", err)
    end)

    it("a rank still running a timeout after a peer failed is stopped", function()
      local err = spawn_error({nprocs = 3, timeout = 0.3}, function(rank)
        if rank == 0 then error("early") end
        if rank == 1 then sleep_ms(30000) end
        return rank
      end)
      assert.matches("ranks 0, 1 of 3 failed", err)
      assert.matches("%[rank 1%] was stopped %(signal 9%): still running 300 ms after rank 0 failed", err)
      assert.is_nil(err:find("[rank 2]", 1, true))
    end)

    it("a group stays failed after a peer died", function()
      local err = spawn_error(2, function(rank)
        if rank == 1 then ffi.C.kill(ffi.C.getpid(), 9) end
        local first = pcall(dist.all_reduce, ms.zeros(4), "sum")
        local ok, again = pcall(dist.barrier)
        error(tostring(first) .. " then " .. again)
      end)
      assert.matches("false then [^\n]*barrier: the group is unusable after an earlier failure: " ..
                     "all_reduce: rank 1 died %(signal 9%)", err)
    end)

    it("mismatched collectives raise on every rank and the group stays usable", function()
      local results = dist.spawn(3, function(rank)
        local n = rank == 2 and 5 or 4
        local ok, err = pcall(dist.all_reduce, ms.zeros(n), "sum")
        local ok2, err2 = pcall(function()
          if rank == 0 then dist.barrier() else dist.all_reduce(ms.zeros(4), "max") end
        end)
        local t = ms.full({4}, rank + 1)
        dist.all_reduce(t, "sum")
        return {ok = ok, err = err, ok2 = ok2, err2 = err2, sum = t:table()[1]}
      end)
      for r = 1, 3 do
        assert.is_false(results[r].ok)
        assert.matches("ranks disagree", results[r].err)
        assert.matches("all_reduce%(f32, 5 elements, sum%)", results[r].err)
        assert.is_false(results[r].ok2)
        assert.matches("barrier%(%)", results[r].err2)
        assert.are.equal(6, results[r].sum)
      end
    end)

    it("mismatched dtypes, ops, roots, kinds and sizes across the direct threshold raise", function()
      local results = dist.spawn(2, function(rank)
        local odd = rank == 1
        local errors = {}
        local function try(fn)
          local ok, err = pcall(fn)
          errors[#errors + 1] = ok and "no error" or err
        end
        try(function() dist.all_reduce(ms.zeros(8, {dtype = odd and "f64" or "f32"}), "sum") end)
        try(function() dist.all_reduce(ms.zeros(8), odd and "max" or "min") end)
        try(function() dist.broadcast(ms.zeros(8), odd and 1 or 0) end)
        try(function() dist.all_reduce(ms.zeros(odd and 200000 or 10), "sum") end)
        try(function()
          if odd then dist.all_gather_into_tensor(ms.zeros(16), ms.zeros(8))
          else dist.reduce_scatter_tensor(ms.zeros(8), ms.zeros(16), "sum") end
        end)
        local t = ms.full({200000}, rank + 1)
        dist.all_reduce(t, "sum")
        errors[#errors + 1] = t:max():item() == 3 and t:min():item() == 3
        return errors
      end)
      for r = 1, 2 do
        local e = results[r]
        assert.matches("all_reduce%(f32, 8 elements, sum%)", e[1])
        assert.matches("all_reduce%(f64, 8 elements, sum%)", e[1])
        assert.matches("all_reduce%(f32, 8 elements, min%)", e[2])
        assert.matches("all_reduce%(f32, 8 elements, max%)", e[2])
        assert.matches("broadcast%(f32, 8 elements, root 0%)", e[3])
        assert.matches("broadcast%(f32, 8 elements, root 1%)", e[3])
        assert.matches("all_reduce%(f32, 200000 elements, sum%)", e[4])
        assert.matches("all_reduce%(f32, 10 elements, sum%)", e[4])
        assert.matches("all_gather_into_tensor%(f32, 8 elements%)", e[5])
        assert.matches("reduce_scatter_tensor%(f32, 8 elements, sum%)", e[5])
        assert.is_true(e[6])
      end
    end)
  end)
end)
