-- One way to launch: a script written around dist.spawn(n, fn) runs unchanged with plain
-- luajit (forked ranks), under bin/moonshard run -n n and under mpirun -n n (fn once per
-- process); a launcher with another number of processes is a clear error.
local ENV = "LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
local MPIRUN = "mpirun --allow-run-as-root --oversubscribe "

local function temp_path(suffix)
  local path = os.tmpname()
  os.remove(path)
  return path .. suffix
end

-- Output and exit status of a shell command.
local function run(command)
  local pipe = io.popen(command .. " 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return output:gsub("exit=(%d+)\n$", ""), tonumber(output:match("exit=(%d+)\n$"))
end

-- The dist.spawn pattern of the README: every rank all-reduces its rank + 1 and returns it
-- with its rank; the script prints what spawn returned, once per process that runs it.
local SCRIPT = [[
local ms = require "moonshard"
local n = tonumber(arg[1])
local results = ms.dist.spawn(n, function(rank, world_size)
  local t = ms.tensor({rank + 1})
  ms.dist.all_reduce(t)
  return {rank = rank, world = world_size, sum = t:item()}
end)
local parts = {}
for r, v in ipairs(results) do parts[r] = ("%d/%d:%g"):format(v.rank, v.world, v.sum) end
print("results " .. table.concat(parts, " "))
]]

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do n = n + 1 end
  return n
end

local function mpi_usable()
  if not os.execute("command -v mpirun >/dev/null 2>&1") then return false, "mpirun is not installed" end
  local output, code = run(ENV .. MPIRUN .. "-n 1 luajit -e 'require(\"moonshard\").dist.barrier()'")
  if code ~= 0 then return false, "this build or machine cannot run MPI: " .. output end
  return true
end

describe("launching a dist.spawn script", function()
  local script

  setup(function()
    script = temp_path(".lua")
    local file = assert(io.open(script, "w"))
    file:write(SCRIPT)
    file:close()
  end)

  teardown(function() os.remove(script) end)

  it("with plain luajit forks the ranks and prints the results once", function()
    local output, code = run(ENV .. "luajit " .. script .. " 3")
    assert.are.equal(0, code, output)
    assert.are.equal(1, count(output, "results 0/3:6 1/3:6 2/3:6\n"), output)
  end)

  it("under moonshard run -n N runs fn once in each of the N ranks", function()
    local output, code = run("bin/moonshard run -n 3 " .. script .. " 3")
    assert.are.equal(0, code, output)
    -- every rank ran the script, so every rank printed the full results
    assert.are.equal(3, count(output, "results 0/3:6 1/3:6 2/3:6\n"), output)
  end)

  it("under moonshard run with another N is a clear error", function()
    local output, code = run("bin/moonshard run -n 2 " .. script .. " 3")
    assert.are.equal(1, code, output)
    assert.truthy(output:find("dist.spawn: 3 ranks requested but moonshard run started 2; " ..
                              "call dist.spawn(2, fn) or launch 3", 1, true), output)
    assert.is_nil(output:find("results", 1, true), output)
  end)

  it("under mpirun -n N runs fn once in each MPI process", function()
    local usable, why = mpi_usable()
    if not usable then return pending(why) end
    local output, code = run(ENV .. MPIRUN .. "-n 2 luajit " .. script .. " 2")
    assert.are.equal(0, code, output)
    assert.are.equal(2, count(output, "results 0/2:3 1/2:3\n"), output)
  end)

  it("under mpirun with another N is a clear error", function()
    local usable, why = mpi_usable()
    if not usable then return pending(why) end
    local output = run(ENV .. MPIRUN .. "-n 2 luajit " .. script .. " 3")
    assert.truthy(output:find("dist.spawn: 3 ranks requested but mpirun started 2; " ..
                              "call dist.spawn(2, fn) or launch 3", 1, true), output)
    assert.is_nil(output:find("results", 1, true), output)
  end)

  it("moonshard run --help gives the mpirun line for several hosts", function()
    local output, code = run("bin/moonshard run --help")
    assert.are.equal(0, code, output)
    assert.truthy(output:find("mpirun -n 8 --host a:4,b:4 luajit script.lua", 1, true), output)
  end)
end)
