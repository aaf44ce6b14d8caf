-- moonshard ckpt on stores: rm deletes one step (and refuses while another job writes the
-- store), import into a store with training steps needs --step, import of a directory
-- says so, and verify does not count a step deleted while it ran as damage.
local ms = require "moonshard"
local dcp = ms.dcp
local processes = require "support.processes"
local store_dirs = require "support.store_dirs"

local function moonshard(args)
  local pipe = io.popen("bin/moonshard " .. args .. " 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output
end

local function touch(path) io.open(path, "w"):close() end

describe("moonshard ckpt on a store", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  local function save_steps(n)
    for step = 1, n do dcp.save({model = {w = ms.full({3}, step)}}, dir, {step = step}) end
  end

  it("rm deletes one step and keeps the others", function()
    save_steps(3)
    local status, output = moonshard("ckpt rm " .. dir .. " 2")
    assert.equal(0, status, output)
    assert.truthy(output:find("deleted step 2", 1, true), output)
    local store = dcp.open(dir)
    assert.same({1, 3}, store:steps())
    assert.is_true(ms.equal(ms.full({3}, 3), store:read("model.w", 3)))
    store:close()
    status, output = moonshard("ckpt rm " .. dir .. " 2")
    assert.equal(1, status)
    assert.truthy(output:find("has no step 2 (steps: 1, 3)", 1, true), output)
    status, output = moonshard("ckpt rm " .. dir .. " two")
    assert.equal(2, status, output)
  end)

  it("rm refuses while another job writes the store", function()
    save_steps(1)
    local ready, go = dir .. ".ready", dir .. ".go"
    local child = processes.start(function()
      local h = dcp.async_save({model = {w = ms.full({3}, 2)}}, dir, {step = 2})
      touch(ready)
      assert(processes.wait_for_file(go, 60))
      h:wait()
    end)
    assert.is_true(processes.wait_for_file(ready, 60))
    local status, output = moonshard("ckpt rm " .. dir .. " 1")
    touch(go)
    local ok, report = processes.wait(child)
    os.remove(ready)
    os.remove(go)
    assert.is_true(ok, report)
    assert.equal(1, status, output)
    assert.truthy(output:find("is being written by another job (pid " .. child.pid, 1, true), output)
    local store = dcp.open(dir)
    assert.same({1, 2}, store:steps())
    store:close()
  end)

  it("import into a store with training steps needs --step", function()
    save_steps(2)
    local path = os.tmpname() .. ".safetensors"
    assert.equal(0, (moonshard("ckpt export " .. dir .. " " .. path)))
    local status, output = moonshard("ckpt import " .. path .. " " .. dir)
    assert.equal(1, status)
    assert.truthy(output:find("holds steps up to 2; the import would become the newest step", 1, true), output)
    local store = dcp.open(dir)
    assert.same({1, 2}, store:steps())
    store:close()
    status, output = moonshard("ckpt import " .. path .. " " .. dir .. " --step 7")
    assert.equal(0, status, output)
    store = dcp.open(dir)
    assert.same({1, 2, 7}, store:steps())
    assert.is_true(ms.equal(ms.full({3}, 2), store:read("model.w", 7)))
    store:close()
    os.remove(path)
  end)

  it("import of a directory says it is one", function()
    local status, output = moonshard("ckpt import " .. os.getenv("PWD") .. "/specs " .. dir)
    assert.equal(1, status)
    assert.truthy(output:find("specs is a directory, not a safetensors file", 1, true), output)
  end)

  it("verify reports a step deleted while it runs as deleted, not damaged", function()
    save_steps(1)
    local child = processes.start(function()
      for step = 2, 40 do
        dcp.save({model = {w = ms.full({256, 256}, step)}}, dir, {step = step, keep_last = 1})
      end
    end)
    for _ = 1, 6 do
      local status, output = moonshard("ckpt verify " .. dir)
      assert.equal(0, status, output)
      assert.is_nil(output:find("checksum", 1, true), output)
      assert.is_nil(output:find("missing", 1, true), output)
    end
    local ok, report = processes.wait(child)
    assert.is_true(ok, report)
  end)
end)
