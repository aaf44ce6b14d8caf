-- Errors raised inside a module's forward, at any depth, keep the traceback down to the
-- line that raised them (plain Lua errors and moonshard errors): through ms.traceback as an
-- xpcall handler, in dist.spawn's report from a rank and in moonshard run's; the error
-- message itself stays what was raised.
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn = ms.nn

local SPEC = "specs/module_errors_spec.lua"
local lines = {}

-- Three levels: Outer calls Middle calls Inner; Inner raises as its input asks.
local Inner = nn.Module:extend("Inner")
function Inner:__init() self.proj = nn.Linear(3, 3) end
function Inner:forward(x, how)
  local y = self.proj(x)
  if how == "plain" then
    lines.plain = debug.getinfo(1, "l").currentline + 1
    error("inner gave up")
  elseif how == "moonshard" then
    lines.moonshard = debug.getinfo(1, "l").currentline + 1
    local z = ms.matmul(y, ms.ones(4, 4)) -- [n, 3] x [4, 4]: a moonshard error
    return z
  end
  return y
end

local Middle = nn.Module:extend("Middle")
function Middle:__init() self.inner = Inner() end
function Middle:forward(x, how)
  lines.middle = debug.getinfo(1, "l").currentline + 1
  local y = self.inner(x, how)
  return y
end

local Outer = nn.Module:extend("Outer")
function Outer:__init() self.middle = Middle() end
function Outer:forward(x, how)
  lines.outer = debug.getinfo(1, "l").currentline + 1
  local y = self.middle(x, how)
  return y
end

local function at(line) return ("%s:%d:"):format(SPEC, line) end

-- The traceback part of an error text, where each frame is a line.
local function frames(err)
  local traceback = err:match("\nstack traceback:\n(.*)$")
  assert.truthy(traceback, "no traceback in: " .. err)
  return traceback
end

local function assert_down_to(err, raising_line)
  local traceback = frames(err)
  local raise = traceback:find(at(raising_line), 1, true)
  local middle = traceback:find(at(lines.middle), 1, true)
  local outer = traceback:find(at(lines.outer), 1, true)
  assert.truthy(raise, "the raising line is missing:\n" .. err)
  assert.truthy(middle and outer, "a calling level is missing:\n" .. err)
  assert.is_true(raise < middle and middle < outer, "frames out of order:\n" .. err)
end

before_each(global_state.save)
after_each(global_state.restore)

describe("an error inside a module's forward", function()
  local model, x

  before_each(function()
    ms.manual_seed(0)
    model = Outer()
    x = ms.ones(2, 3)
  end)

  it("works when nothing raises", function()
    assert.are.same({2, 3}, model(x):shape())
  end)

  it("keeps the traceback down to the line of a plain Lua error, three levels deep", function()
    local ok, err = xpcall(model, ms.traceback, x, "plain")
    assert.is_false(ok)
    assert.truthy(err:find("^" .. at(lines.plain) .. " inner gave up\nstack traceback:\n"), err)
    assert_down_to(err, lines.plain)
  end)

  it("keeps the traceback down to the line of a moonshard error, three levels deep", function()
    local ok, err = xpcall(model, ms.traceback, x, "moonshard")
    assert.is_false(ok)
    assert.truthy(err:find("^moonshard: matmul: shapes %[2, 3%] and %[4, 4%]"), err)
    assert_down_to(err, lines.moonshard)
  end)

  it("leaves the message as it was raised for pcall", function()
    local ok, err = pcall(model, x, "moonshard")
    assert.is_false(ok)
    assert.are.equal("moonshard: matmul: shapes [2, 3] and [4, 4] cannot be multiplied", err)
  end)

  it("gives a later error its own traceback, not an earlier one's", function()
    pcall(model, x, "moonshard")
    local _, err = xpcall(function()
      lines.direct = debug.getinfo(1, "l").currentline + 1
      ms.matmul(ms.ones(2, 3), ms.ones(4, 4))
    end, ms.traceback)
    assert.truthy(frames(err):find(at(lines.direct), 1, true), err)
    assert.is_nil(frames(err):find(at(lines.moonshard), 1, true), err)
  end)

  it("keeps the traceback when it travels from a rank to dist.spawn's caller", function()
    local ok, err = pcall(ms.dist.spawn, 2, function(rank)
      return Outer()(ms.ones(2, 3), rank == 1 and "moonshard" or nil):shape()
    end)
    assert.is_false(ok)
    assert.truthy(err:find("[rank 1] moonshard: matmul: shapes [2, 3] and [4, 4]", 1, true), err)
    assert_down_to(err, lines.moonshard)
  end)

  it("keeps the traceback in moonshard run's report", function()
    local script = os.tmpname() .. ".lua"
    local file = assert(io.open(script, "w"))
    file:write([[
local ms = require "moonshard"
local Inner = ms.nn.Module:extend("Inner")
function Inner:forward(x) local y = ms.matmul(x, ms.ones(4, 4)); return y end
local Middle = ms.nn.Module:extend("Middle")
function Middle:__init() self.inner = Inner() end
function Middle:forward(x) local y = self.inner(x); return y end
local Outer = ms.nn.Module:extend("Outer")
function Outer:__init() self.middle = Middle() end
function Outer:forward(x) local y = self.middle(x); return y end
local out = Outer()(ms.ones(2, 3))
]])
    file:close()
    local pipe = io.popen("bin/moonshard run -n 1 " .. script .. " 2>&1")
    local output = pipe:read("*a")
    pipe:close()
    os.remove(script)
    local short = script:match("[^/]*$")
    local inner = output:find(short .. ":3: in function 'forward'", 1, true)
    local middle = output:find(short .. ":6: in function 'forward'", 1, true)
    local outer = output:find(short .. ":9: in function 'forward'", 1, true)
    assert.truthy(inner and middle and outer, output)
    assert.is_true(inner < middle and middle < outer, output)
  end)

  it("releases the call's temporaries when it raises (without the collector)", function()
    collectgarbage()
    collectgarbage()
    collectgarbage("stop")
    local before = ms.memory_stats("cpu").allocated
    for _ = 1, 3 do pcall(model, x, "moonshard") end
    local after = ms.memory_stats("cpu").allocated
    collectgarbage("restart")
    assert.are.equal(before, after)
  end)
end)
