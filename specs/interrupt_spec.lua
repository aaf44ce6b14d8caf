-- Interrupts with real signals and real processes: SIGINT and SIGTERM to the parent of
-- dist.spawn (and to moonshard run) stop every rank and raise in the parent; a signal to a
-- rank reaches JIT-compiled loops of collectives and of module calls; Ctrl-C typed at a
-- terminal reaches the whole job; a second signal ends a loop that polls nothing.
local ffi = require "ffi"
local pty = require "support.pty"

local SIGINT, SIGTERM, ESRCH = 2, 15, 3
local ENV = {LUA_PATH = "lua/?.lua;lua/?/init.lua;;"}

local function temp_path(suffix)
  local path = os.tmpname()
  os.remove(path)
  return path .. suffix
end

local function pid_alive(pid) return ffi.C.kill(pid, 0) == 0 or ffi.errno() ~= ESRCH end

-- A script whose ranks print "rank R pid P ready" and then run body (Lua source, with
-- ms, rank and t = ms.ones(4) in scope); the parent prints what dist.spawn raised.
local function job_script(ranks, body)
  local path = temp_path(".lua")
  local file = assert(io.open(path, "w"))
  file:write(([[
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local ms = require "moonshard"
local ok, err = pcall(ms.dist.spawn, %d, function(rank)
  local t = ms.ones(4)
  ms.dist.barrier()
  io.stdout:write(("rank %%d pid %%d ready\n"):format(rank, ffi.C.getpid()))
  io.stdout:flush()
  %s
end)
print("parent caught: " .. tostring(err))
]]):format(ranks, body))
  file:close()
  return path
end

-- Start the job on a terminal and wait until every rank is ready; returns the terminal and
-- the ranks' pids (index rank + 1).
local function start(argv, ranks)
  local term = pty.spawn(argv, ENV)
  for r = 0, ranks - 1 do term:expect(("rank %d pid "):format(r)) end
  local pids = {}
  for _ = 1, 100 do
    for r, pid in term.text:gmatch("rank (%d+) pid (%d+) ready") do pids[tonumber(r) + 1] = tonumber(pid) end
    if #pids == ranks then break end
    term:pump(100)
  end
  assert.are.equal(ranks, #pids, term.text)
  return term, pids
end

-- What the parent raised, once it has ended.
local function finish(term)
  local how, code = term:wait(30)
  assert.are.equal("exit", how, "the parent did not end:\n" .. term.text)
  assert.are.equal(0, code, term.text)
  local caught = term.text:match("parent caught: (.*)$")
  assert.truthy(caught, term.text)
  return caught
end

local COLLECTIVE_LOOP = "for i = 1, 1e12 do ms.dist.all_reduce(t) end"
local MODULE_LOOP = "local m = ms.nn.Linear(4, 4); for i = 1, 1e12 do m(t:view(1, 4)):free() end"
local PURE_LOOP = "local x = 0; for i = 1, 1e15 do x = (x + i) * 0.5 end; return x"

describe("interrupts", function()
  local scripts = {}
  local term

  after_each(function()
    if term then term:close() end
    term = nil
    for _, path in ipairs(scripts) do os.remove(path) end
    scripts = {}
  end)

  local function script(ranks, body)
    local path = job_script(ranks, body)
    scripts[#scripts + 1] = path
    return path
  end

  for _, case in ipairs({{SIGINT, "SIGINT"}, {SIGTERM, "SIGTERM"}}) do
    local sig, name = case[1], case[2]
    it(name .. " to the dist.spawn parent alone stops every rank and raises in the parent", function()
      local pids
      term, pids = start({"luajit", script(2, COLLECTIVE_LOOP)}, 2)
      term:signal(sig)
      local caught = finish(term)
      assert.truthy(caught:find("moonshard: dist.spawn: interrupted by " .. name .. ": every rank was stopped", 1, true), caught)
      -- the parent asked the ranks to stop with SIGTERM; their compiled loops noticed it
      assert.matches("%[rank 0%] moonshard: dist.all_reduce: [^\n]*interrupted by SIGTERM", caught)
      assert.matches("%[rank 1%] moonshard: dist.all_reduce: [^\n]*", caught)
      for _, pid in ipairs(pids) do assert.is_false(pid_alive(pid), "rank pid " .. pid .. " still runs") end
    end)
  end

  it("a rank in a loop that polls nothing is killed shortly after the interrupt", function()
    local pids
    term, pids = start({"luajit", script(2, "if rank == 1 then " .. PURE_LOOP .. " end; " .. COLLECTIVE_LOOP)}, 2)
    term:signal(SIGINT)
    local caught = finish(term)
    assert.truthy(caught:find("[rank 1] was stopped (signal 9): still running 500 ms after SIGINT", 1, true), caught)
    assert.matches("%[rank 0%] moonshard: dist.all_reduce: ", caught)
    for _, pid in ipairs(pids) do assert.is_false(pid_alive(pid)) end
  end)

  it("Ctrl-C typed at the terminal reaches every process of the job", function()
    term = start({"luajit", script(2, COLLECTIVE_LOOP)}, 2)
    term:send("\3")
    local caught = finish(term)
    -- The parent gets it too: it reports the interrupt, or, when the ranks failed first,
    -- their failures.
    assert.truthy(caught:find("dist.spawn: interrupted by SIGINT", 1, true) or
                  caught:find("dist.spawn: ranks 0, 1 of 2 failed", 1, true), caught)
    -- Both ranks get the signal; whichever notices it first fails the collective, so the
    -- other may report that failure instead of its own interrupt.
    for rank = 0, 1 do
      local line = caught:match("%[rank " .. rank .. "%] moonshard: dist.all_reduce: [^\n]*")
      assert.truthy(line and (line:find("interrupted by SIG", 1, true) or
                              line:find("raised an error", 1, true)), caught)
    end
    assert.truthy(caught:find("dist.all_reduce: interrupted by SIGINT", 1, true), caught)
  end)

  it("SIGINT to one rank reaches its JIT-compiled loop of collectives", function()
    local pids
    term, pids = start({"luajit", script(2, COLLECTIVE_LOOP)}, 2)
    ffi.C.kill(pids[2], SIGINT)
    local caught = finish(term)
    assert.truthy(caught:find("dist.spawn: ranks 0, 1 of 2 failed", 1, true), caught)
    assert.matches("%[rank 1%] moonshard: dist.all_reduce: [^\n]*interrupted by SIGINT\nstack traceback:", caught)
    assert.matches("%[rank 0%] moonshard: dist.all_reduce: [^\n]*rank 1 raised an error", caught)
  end)

  it("SIGINT to one rank reaches its JIT-compiled loop of module calls", function()
    local pids
    term, pids = start({"luajit", script(1, MODULE_LOOP)}, 1)
    ffi.C.kill(pids[1], SIGINT)
    local caught = finish(term)
    assert.matches("%[rank 0%] moonshard: Linear: interrupted by SIGINT\nstack traceback:", caught)
  end)

  it("a second SIGINT ends a rank whose loop polls nothing", function()
    local pids
    term, pids = start({"luajit", script(1, PURE_LOOP)}, 1)
    ffi.C.kill(pids[1], SIGINT)
    pty.sleep_ms(200)
    assert.is_true(pid_alive(pids[1]), "one SIGINT is only a request")
    ffi.C.kill(pids[1], SIGINT)
    local caught = finish(term)
    assert.truthy(caught:find("[rank 0] died (signal 2)", 1, true), caught)
  end)

  it("SIGINT to moonshard run stops its ranks and exits with status 1", function()
    local path = temp_path(".lua")
    scripts[#scripts + 1] = path
    local file = assert(io.open(path, "w"))
    file:write([[
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local ms = require "moonshard"
local t = ms.ones(4)
ms.dist.barrier()
io.stdout:write(("rank %d pid %d ready\n"):format(ms.dist.get_rank(), ffi.C.getpid()))
io.stdout:flush()
]] .. COLLECTIVE_LOOP .. "\n")
    file:close()
    local pids
    term, pids = start({"bin/moonshard", "run", "-n", "2", path}, 2)
    term:signal(SIGINT)
    local how, code = term:wait(30)
    assert.are.same({"exit", 1}, {how, code}, term.text)
    assert.truthy(term.text:find("dist.spawn: interrupted by SIGINT: every rank was stopped", 1, true), term.text)
    for _, pid in ipairs(pids) do assert.is_false(pid_alive(pid)) end
  end)
end)
