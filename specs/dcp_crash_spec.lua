-- Crash safety of dcp.save on forked ranks: a rank killed with SIGKILL before writing
-- anything, in the middle of a chunk, between its data commit and the manifest, or while its
-- async save is written leaves the previous step loadable and bit-identical and the partial
-- step invisible; the next save succeeds and reuses the abandoned space.
local ffi = require "ffi"
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp

pcall(ffi.cdef, [[
int getpid(void);
int kill(int pid, int sig);
int mprotect(void *addr, size_t len, int prot);
typedef void (*dcp_spec_signal_handler)(int);
dcp_spec_signal_handler signal(int signum, dcp_spec_signal_handler handler);
]])

local SIGKILL, SIGSEGV, PAGE = 9, 11, 4096
local WORLD = 2
local ROWS, COLS = 1024, 1024 -- 4 MiB of f32: one 2 MiB chunk per rank

local store_dirs = require "support.store_dirs"

local function die() ffi.C.kill(ffi.C.getpid(), SIGKILL) end

-- The values of step `seed` as full tensors (what every check compares with).
local function full_values(seed)
  ms.manual_seed(seed)
  return {w = ms.randn(ROWS, COLS), b = ms.randn(7)}
end

-- This rank's sharded state dict of step `seed`; "a_first" is put before anything else.
local function sharded_state(seed)
  local mesh = dist.init_device_mesh({WORLD})
  local full = full_values(seed)
  local shard = function(t) return ms.distribute_tensor(t, mesh, {ms.Shard(0)}) end
  return {a_first = shard(ms.arange(4)), model = {w = shard(full.w), b = shard(full.b)}, step = seed}
end

-- The ways a rank dies during the save of its state dict sd (async: while the writer
-- thread of an async save is writing).
local CRASHES = {
  ["before any write"] = function(sd)
    sd.a_first.to_local = die
  end,
  ["while its async save is being written"] = "async",
  ["in the middle of a chunk"] = function(sd)
    -- The page in the middle of the local w is made unreadable: the save faults there, after
    -- writing the chunk's first half, and the fault handler kills the rank.
    jit.off()
    local w = sd.model.w:to_local()
    local middle = ffi.cast("uintptr_t", w:data_ptr()) + w:nbytes() / 2
    local page = middle - middle % PAGE
    ffi.C.signal(SIGSEGV, ffi.cast("dcp_spec_signal_handler", die))
    assert(ffi.C.mprotect(ffi.cast("void *", page), PAGE, 0) == 0)
  end,
  ["between the data commit and the manifest"] = function()
    -- A save's agreement on the step takes two collectives (lengths, then bytes); the third
    -- follows the rank's data commit.
    local gather, calls = dist.all_gather_into_tensor, 0
    dist.all_gather_into_tensor = function(...)
      calls = calls + 1
      if calls == 3 then die() end
      return gather(...)
    end
  end,
}

local function disk_kib(dir)
  local p = io.popen("du -sk '" .. dir .. "'")
  local kib = tonumber(p:read("*a"):match("^(%d+)"))
  p:close()
  return kib
end

local function assert_only_step_one(dir)
  local store = dcp.open(dir)
  assert.same({1}, store:steps())
  assert.has_error(function() store:entries(2) end)
  assert.same({}, store:verify())
  local expected = full_values(1)
  assert.is_true(ms.equal(expected.w, store:read("model.w")), "model.w of step 1")
  assert.is_true(ms.equal(expected.b, store:read("model.b")), "model.b of step 1")
  assert.equal(1, store:read("step"))
  store:close()
end

-- Every rank loads the latest step into a fresh state dict and compares it with step seed.
local function load_latest(dir, seed)
  return dist.spawn(WORLD, function()
    local sd = sharded_state(99)
    local report = dcp.load(sd, dir)
    local expected = full_values(seed)
    return {step = report.step, saved_step = sd.step, w = ms.equal(expected.w, sd.model.w:full_tensor()),
            b = ms.equal(expected.b, sd.model.b:full_tensor())}
  end)
end

describe("dcp crash safety", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  for point, crash in pairs(CRASHES) do
    for _, victim in ipairs({0, 1}) do
      it(("keeps step 1 when rank %d is killed %s"):format(victim, point), function()
        dist.spawn(WORLD, function() dcp.save(sharded_state(1), dir, {step = 1}) end)
        local before_crash = disk_kib(dir)
        local ok, err = pcall(dist.spawn, WORLD, function(rank)
          local sd = sharded_state(2)
          if crash == "async" then
            local h = dcp.async_save(sd, dir, {step = 2})
            if rank == victim then die() end
            h:wait()
          else
            if rank == victim then crash(sd) end
            dcp.save(sd, dir, {step = 2})
          end
        end)
        assert.is_false(ok)
        assert.matches("rank " .. victim, tostring(err))
        assert.matches("signal 9", tostring(err))
        assert_only_step_one(dir)
        local after_crash = disk_kib(dir)

        for _, res in ipairs(load_latest(dir, 1)) do
          assert.same({step = 1, saved_step = 1, w = true, b = true}, res)
        end

        dist.spawn(WORLD, function() dcp.save(sharded_state(3), dir, {step = 3}) end)
        local store = dcp.open(dir)
        assert.same({1, 3}, store:steps())
        assert.is_true(ms.equal(full_values(3).w, store:read("model.w")))
        store:close()
        if point == "between the data commit and the manifest" then
          -- The abandoned step held a whole copy of the state: step 3 goes into its space.
          local state_kib = ROWS * COLS * 4 / 1024
          assert.is_true(after_crash - before_crash > state_kib / 4, "the abandoned data took space")
          assert.is_true(disk_kib(dir) - after_crash < state_kib / 4,
                         ("step 3 grew the store from %d to %d KiB"):format(after_crash, disk_kib(dir)))
        end
      end)
    end
  end
end)
