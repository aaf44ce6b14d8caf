-- Damaged stores: index.mdb and a shard file truncated (to 0 bytes, 8 KiB, half, and behind
-- an open store's map) and every page of each overwritten with random bytes. Each case runs
-- in a child process that opens the store, lists its steps and entries, reads every value
-- and verifies: it must end with the right values or a "moonshard:" error naming the file,
-- and never die of a signal.
local ms = require "moonshard"
local dcp = ms.dcp
local processes = require "support.processes"
local store_dirs = require "support.store_dirs"

local PAGE = 4096

local function state()
  ms.manual_seed(11)
  local sd = {big = ms.randn(256, 256), note = "kept"}
  for i = 1, 120 do sd[("m.t%03d"):format(i)] = ms.randn(8, 16) end
  return sd
end

local function file_size(path)
  local f = assert(io.open(path, "rb"))
  local n = f:seek("end")
  f:close()
  return n
end

local function copy_store(from, to)
  assert(os.execute(("rm -rf '%s' && cp -r '%s' '%s'"):format(to, from, to)))
end

-- Everything a user does with a store, in order; raises at the first problem.
local function use_store(dir, expected)
  local store = dcp.open(dir)
  for _, step in ipairs(store:steps()) do
    for _, e in ipairs(store:entries(step)) do
      local v = store:read(e.fqn, step)
      local want = expected[e.fqn]
      local same = type(want) == "string" and v == want or (type(want) ~= "string" and ms.equal(v, want))
      if not same then error("WRONG VALUE of " .. e.fqn .. " at step " .. step, 0) end
    end
    local problems = store:verify(step)
    if #problems > 0 then error(problems[1].message, 0) end
  end
  store:close()
  return "ok"
end

-- Run use_store in a child: returns the signal it died of (0 when none) and its report.
local function outcome(dir, expected)
  local child = processes.start(function() return use_store(dir, expected) end)
  local _, report, raw = processes.wait(child)
  return processes.signal_of(raw), report
end

local function assert_handled(label, dir, signal, report)
  assert.equal(0, signal, label .. ": died of signal " .. signal)
  if report ~= "ok" then
    assert.matches("^moonshard: ", report, label)
    assert.truthy(report:find(dir, 1, true), label .. ": the error does not name the store: " .. report)
    assert.is_nil(report:find("WRONG VALUE", 1, true), label .. ": " .. report)
  end
end

local function overwrite(path, offset, bytes)
  local f = assert(io.open(path, "r+b"))
  f:seek("set", offset)
  f:write(bytes)
  f:close()
end

local function random_page()
  local bytes = {}
  for i = 1, PAGE do bytes[i] = string.char(math.random(0, 255)) end
  return table.concat(bytes)
end

describe("a damaged store", function()
  local base, case
  local expected = state()
  before_each(function()
    base, case = store_dirs.fresh(), store_dirs.fresh()
    dcp.save(expected, base, {step = 1})
    dcp.save(expected, base, {step = 2})
  end)
  after_each(function()
    os.execute(("rm -rf '%s' '%s'"):format(base, case))
    collectgarbage()
  end)

  for _, name in ipairs({"index.mdb", "shard-0.mdb"}) do
    it(name .. " truncated gives an error naming it", function()
      local size = file_size(base .. "/" .. name)
      for _, cut in ipairs({0, 8192, math.floor(size / 2)}) do
        copy_store(base, case)
        assert(os.execute(("truncate -s %d '%s/%s'"):format(cut, case, name)))
        local signal, report = outcome(case, expected)
        local label = ("%s truncated to %d"):format(name, cut)
        assert_handled(label, case, signal, report)
        assert.are_not.equal("ok", report, label)
        assert.truthy(report:find(name, 1, true), label .. ": " .. report)
      end
    end)

    it(name .. " with any page overwritten by random bytes gives the values or an error", function()
      math.randomseed(17)
      local pages = math.floor(file_size(base .. "/" .. name) / PAGE)
      local errors = 0
      for page = 0, pages - 1 do
        copy_store(base, case)
        overwrite(case .. "/" .. name, page * PAGE, random_page())
        local signal, report = outcome(case, expected)
        assert_handled(("%s page %d of %d"):format(name, page, pages), case, signal, report)
        if report ~= "ok" then errors = errors + 1 end
      end
      assert.is_true(errors > 0, "no damaged page was noticed")
    end)
  end

  it("truncated behind an open store's map gives an error naming the file", function()
    copy_store(base, case)
    local signal, report = outcome(case, expected)
    assert.equal(0, signal)
    assert.equal("ok", report)
    local child = processes.start(function()
      local store = dcp.open(case)
      store:entries(2)
      local shard = case .. "/shard-0.mdb"
      assert(os.execute(("truncate -s %d '%s'"):format(8192, shard)))
      local ok, err = pcall(store.read, store, "big", 2)
      store:close()
      return ok and "read" or err
    end)
    local _, child_report, raw = processes.wait(child)
    assert.equal(0, processes.signal_of(raw))
    assert.matches("^moonshard: store:read: .*shard%-0%.mdb is damaged", child_report)
  end)

  it("the CLI reports a damaged index instead of dying", function()
    copy_store(base, case)
    overwrite(case .. "/index.mdb", 2 * PAGE, random_page())
    assert(os.execute(("truncate -s %d '%s/index.mdb'"):format(3 * PAGE, case)))
    local p = io.popen(("bin/moonshard ckpt ls '%s' 2>&1; echo \"exit $?\""):format(case))
    local out = p:read("*a")
    p:close()
    local code = tonumber(out:match("exit (%d+)\n$"))
    assert.is_true(code == 1, out)
    assert.matches("index%.mdb", out)
  end)
end)
