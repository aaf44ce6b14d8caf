-- Several jobs writing one store at once, writers killed while they hold the store's lock,
-- and loads and verifies while another job commits and deletes: one writer at a time (the
-- other is told which process writes), every acknowledged step verifies and holds its own
-- writer's values, a dead writer's lock is taken over, every rank of a load reads the same
-- step, and a step deleted under a verify or a load is "deleted while reading", not damage.
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp
local processes = require "support.processes"
local store_dirs = require "support.store_dirs"

-- The values saved under tag (a number that names the writer and its save).
local function values_of(tag)
  ms.manual_seed(tag)
  return {w = ms.randn(64, 64), tag = tag}
end

local BUSY = "is being written by another job %(pid %d+ on host "
local RACES = {BUSY, "is already committed", "was committed by another save meanwhile"}

local function expected_race(message)
  for _, pattern in ipairs(RACES) do
    if tostring(message):find(pattern) then return true end
  end
  return false
end

-- Save values_of(tag) at step (nil: the latest + 1) until no other job holds the store;
-- returns the acknowledged step, or nil when the step was taken by another job.
local function save_when_free(dir, tag, step)
  for _ = 1, 400 do
    local ok, result = pcall(dcp.save, values_of(tag), dir, {step = step})
    if ok then return result end
    if not expected_race(result) then error(result, 0) end
    if not tostring(result):find(BUSY) then return nil end
    processes.sleep(0.002)
  end
  error("the store stayed locked")
end

local function touch(path) io.open(path, "w"):close() end

describe("dcp with several writers", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("acknowledges only steps that verify and hold their writer's values", function()
    local children = {}
    for writer = 1, 4 do
      children[writer] = processes.start(function()
        local acked = {}
        for k = 1, 12 do
          local tag = 1000 * writer + k
          local mode = k % 3
          local step = mode == 0 and tag or mode == 1 and 100 + k or nil -- distinct, equal, default
          local saved = save_when_free(dir, tag, step)
          if saved then acked[#acked + 1] = saved .. " " .. tag end
        end
        return table.concat(acked, "\n")
      end)
    end
    local acked, steps_seen = {}, {}
    for writer, child in ipairs(children) do
      local ok, report = processes.wait(child)
      assert.is_true(ok, "writer " .. writer .. ": " .. report)
      for step, tag in report:gmatch("(%d+) (%d+)") do
        step, tag = tonumber(step), tonumber(tag)
        assert.is_nil(steps_seen[step], "step " .. step .. " acknowledged twice")
        steps_seen[step] = tag
        acked[#acked + 1] = {step = step, tag = tag}
      end
    end
    assert.is_true(#acked >= 4, "acknowledged saves: " .. #acked)
    local store = dcp.open(dir)
    assert.same({}, (store:verify()))
    for _, a in ipairs(acked) do
      assert.equal(a.tag, store:read("tag", a.step))
      assert.is_true(ms.equal(values_of(a.tag).w, store:read("w", a.step)), "w of step " .. a.step)
    end
    store:close()
  end)

  it("tells a second job which process writes the store", function()
    dcp.save(values_of(1), dir, {step = 1})
    local ready, go = dir .. ".ready", dir .. ".go"
    local child = processes.start(function()
      local h = dcp.async_save(values_of(2), dir, {step = 2})
      touch(ready)
      assert(processes.wait_for_file(go, 60))
      h:wait()
    end)
    assert.is_true(processes.wait_for_file(ready, 60))
    local ok, err = pcall(dcp.save, values_of(3), dir, {step = 3})
    assert.is_false(ok)
    assert.matches("dcp.save: .* is being written by another job %(pid " .. child.pid .. " on host ", err)
    local deleted, delete_err = pcall(dcp.delete, dir, 1)
    assert.is_false(deleted)
    assert.matches("pid " .. child.pid, delete_err)
    touch(go)
    local child_ok, report = processes.wait(child)
    assert.is_true(child_ok, report)
    os.remove(ready)
    os.remove(go)
    assert.equal(3, dcp.save(values_of(3), dir))
    local store = dcp.open(dir)
    assert.same({1, 2, 3}, store:steps())
    assert.same({}, (store:verify()))
    store:close()
  end)

  for _, how in ipairs({"async save", "save"}) do
    it("takes over the lock of a writer killed during an " .. how, function()
      dcp.save(values_of(1), dir, {step = 1})
      local ready = dir .. ".ready"
      local child = processes.start(function()
        if how == "save" then
          -- killed inside the save, between its data commit and its manifest
          local exchange = require "moonshard.dcp.exchange"
          local gather, calls = exchange.all_gather, 0
          exchange.all_gather = function(...)
            calls = calls + 1
            if calls == 2 then
              touch(ready)
              processes.sleep(60)
            end
            return gather(...)
          end
          dcp.save({w = ms.randn(512, 512), tag = 2}, dir, {step = 2})
        else
          dcp.async_save({w = ms.randn(512, 512), tag = 2}, dir, {step = 2})
          touch(ready)
          processes.sleep(60)
        end
      end)
      assert.is_true(processes.wait_for_file(ready, 60))
      local f = io.open(dir .. "/writer.lock")
      local holder = f:read("*a")
      f:close()
      assert.matches("^pid " .. child.pid .. " on host ", holder)
      processes.kill(child, processes.SIGKILL)
      local _, _, raw = processes.wait(child)
      assert.equal(processes.SIGKILL, processes.signal_of(raw))
      os.remove(ready)
      assert.equal(2, dcp.save(values_of(2), dir))
      local store = dcp.open(dir)
      assert.same({1, 2}, store:steps())
      assert.same({}, (store:verify()))
      assert.is_true(ms.equal(values_of(1).w, store:read("w", 1)))
      assert.is_true(ms.equal(values_of(2).w, store:read("w", 2)))
      store:close()
    end)
  end
end)

describe("dcp reads while another job commits", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  -- A job committing steps first .. last of values_of(step), keeping the newest keep.
  local function committer(first, last, keep)
    return processes.start(function()
      for step = first, last do
        save_when_free(dir, step, step)
        if keep then
          local ok, err
          repeat
            ok, err = pcall(function()
              local store = dcp.open(dir)
              local steps = store:steps()
              store:close()
              if #steps > keep then dcp.delete(dir, steps[1]) end
            end)
          until ok or not tostring(err):find(BUSY)
          if not ok then error(err, 0) end
        end
      end
    end)
  end

  it("loads one step on every rank, with that step's values", function()
    dcp.save(values_of(0), dir, {step = 0})
    local child = committer(1, 60, 3)
    local results = dist.spawn(2, function()
      local out = {}
      for i = 1, 30 do
        local sd = {w = ms.zeros(64, 64), tag = -1}
        local ok, report = pcall(dcp.load, sd, dir)
        if ok then
          assert(sd.tag == report.step, "tag " .. sd.tag .. " in step " .. report.step)
          assert(ms.equal(values_of(report.step).w, sd.w), "w of step " .. report.step)
          out[i] = report.step
        else
          assert(tostring(report):find("was deleted while reading", 1, true), report)
          out[i] = "deleted"
        end
      end
      return out
    end)
    local ok, report = processes.wait(child)
    assert.is_true(ok, report)
    for i = 1, 30 do
      local a, b = results[1][i], results[2][i]
      if a ~= "deleted" and b ~= "deleted" then
        assert.equal(a, b, "load " .. i .. ": rank 0 read step " .. a .. ", rank 1 step " .. b)
      end
    end
  end)

  it("does not call a step deleted during a verify damage", function()
    dcp.save(values_of(0), dir, {step = 0})
    local child = committer(1, 40, 1)
    local verified = 0
    while true do
      local store = dcp.open(dir)
      local problems, deleted = store:verify()
      store:close()
      assert.same({}, problems)
      assert.is_table(deleted)
      verified = verified + 1
      if processes.wait_for_file("/nonexistent", 0) then break end
      local status = require("ffi").new("int[1]")
      if require("ffi").C.waitpid(child.pid, status, 1) == child.pid then
        assert.equal(0, status[0])
        os.remove(child.path)
        break
      end
    end
    assert.is_true(verified > 1)
  end)
end)
