-- A full disk during a save, on a small tmpfs this spec mounts (root only; skipped with a
-- printed reason otherwise): many small tensors, one large one, an async save and two ranks
-- all fail with a clear error instead of a signal; the step is not committed, the earlier
-- step stays bit-identical, and once space is freed the next save works. Deleting a step on
-- a full disk (ckpt rm, dcp.delete) works and the next save reuses the pages it freed.
local ffi = require "ffi"
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp
local processes = require "support.processes"
local global_state = require "support.global_state"

pcall(ffi.cdef, "unsigned int geteuid(void);")

local MIB = 2 ^ 20

-- (without a sanitizer runtime the specs may run under: dd fails under it)
local function shell_ok(command)
  local ok = os.execute("env -u LD_PRELOAD " .. command .. " >/dev/null 2>&1")
  return ok == true or ok == 0
end

-- A fresh tmpfs of mib MiB; nil and the reason when this process cannot mount one.
local function mount_tmpfs(mib)
  if ffi.C.geteuid() ~= 0 then return nil, "not root" end
  local path = os.tmpname()
  os.remove(path)
  if not shell_ok("mkdir -p '" .. path .. "'") then return nil, "cannot make a mount point" end
  if not shell_ok(("mount -t tmpfs -o size=%dm tmpfs '%s'"):format(mib, path)) then
    shell_ok("rmdir '" .. path .. "'")
    return nil, "mount -t tmpfs failed"
  end
  return path
end

local function unmount(path)
  -- lazily: a child process of a case may still hold a file of the store open
  shell_ok("umount -l '" .. path .. "'")
  shell_ok("rmdir '" .. path .. "'")
end

local function avail_kib(dir)
  local p = io.popen("df -k --output=avail '" .. dir .. "' | tail -1")
  local kib = tonumber(p:read("*a"))
  p:close()
  return kib
end

-- Fill the disk but keep_mib MiB with one file (dd may stop at a full disk); returns its path.
local function fill(dir, keep_mib)
  local path = dir .. "/filler"
  local kib = math.max(0, avail_kib(dir) - keep_mib * 1024)
  shell_ok(("dd if=/dev/zero of='%s' bs=1024 count=%d"):format(path, kib))
  assert(avail_kib(dir) <= keep_mib * 1024 + 64, "the disk is not full")
  return path
end

local function small_tensors(n, seed)
  ms.manual_seed(seed)
  local sd = {}
  for i = 1, n do sd[("t%04d"):format(i)] = ms.randn(4, 256) end
  return sd
end

-- The save raises a moonshard error about space (never a signal: the process would die).
local function assert_no_space(ok, err)
  assert.is_false(ok)
  assert.matches("^moonshard: dcp%.[a-z_]+: ", tostring(err))
  assert.matches("No space left on device", tostring(err))
end

before_each(global_state.save)
after_each(global_state.restore)

describe("dcp on a full disk", function()
  local mount, reason = nil, nil
  local first

  before_each(function()
    mount, reason = mount_tmpfs(16)
    if not mount then
      print("dcp_full_disk_spec: skipped: " .. reason)
      return
    end
    first = {w = ms.randn(64, 64), note = "first"}
    dcp.save(first, mount .. "/ckpt", {step = 1})
  end)

  after_each(function()
    if mount then unmount(mount) end
    collectgarbage()
  end)

  local function assert_first_intact(dir)
    local store = dcp.open(dir)
    assert.same({1}, store:steps())
    assert.same({}, (store:verify()))
    assert.is_true(ms.equal(first.w, store:read("w", 1)))
    assert.equal("first", store:read("note", 1))
    store:close()
  end

  local cases = {
    ["many small tensors"] = function(dir) return pcall(dcp.save, small_tensors(2000, 2), dir, {step = 2}) end,
    ["one large tensor"] = function(dir) return pcall(dcp.save, {big = ms.randn(2048, 1024)}, dir, {step = 2}) end,
    ["an async save"] = function(dir)
      local h = dcp.async_save({big = ms.randn(2048, 1024), small = small_tensors(300, 3)}, dir, {step = 2})
      return pcall(h.wait, h)
    end,
  }
  for name, save in pairs(cases) do
    it("raises for " .. name .. ", keeps the earlier step and saves once space is freed", function()
      if not mount then return end
      local dir = mount .. "/ckpt"
      local filler = fill(mount, 1)
      assert_no_space(save(dir))
      assert_first_intact(dir)
      os.remove(filler)
      local again = small_tensors(1000, 4)
      assert.equal(2, dcp.save(again, dir))
      local store = dcp.open(dir)
      assert.same({1, 2}, store:steps())
      assert.same({}, (store:verify()))
      assert.is_true(ms.equal(again.t0500, store:read("t0500", 2)))
      assert.is_true(ms.equal(first.w, store:read("w", 1)))
      store:close()
    end)
  end

  it("fails every rank with an error, not a signal", function()
    if not mount then return end
    local dir = mount .. "/ckpt"
    local filler = fill(mount, 1)
    local ok, err = pcall(dist.spawn, 2, function()
      local mesh = dist.init_device_mesh({2})
      local sd = {}
      for i = 1, 1500 do sd[("t%04d"):format(i)] = ms.distribute_tensor(ms.randn(8, 256), mesh, {ms.Shard(0)}) end
      dcp.save(sd, dir, {step = 2})
    end)
    assert.is_false(ok)
    assert.matches("No space left on device", tostring(err))
    assert.is_nil(tostring(err):find("signal", 1, true), tostring(err))
    assert_first_intact(dir)
    os.remove(filler)
  end)

  it("reports a full disk in a process that dies of nothing", function()
    if not mount then return end
    local dir = mount .. "/ckpt"
    fill(mount, 0)
    local child = processes.start(function()
      local ok, err = pcall(dcp.save, small_tensors(3000, 5), dir, {step = 2})
      return ok and "saved" or err
    end)
    local ok, report, raw = processes.wait(child)
    assert.equal(0, processes.signal_of(raw))
    assert.is_true(ok, report)
    assert.matches("No space left on device", report)
    assert_first_intact(dir)
  end)
end)

-- Deleting steps is how a user recovers from a full disk: it needs no new file space, and a
-- later save reuses the pages it freed.
describe("deleting steps on a full disk", function()
  local mount, reason = nil, nil
  local dir

  local function one_mib(v) return {w = ms.full({256, 1024}, v)} end

  local function steps_of()
    local store = dcp.open(dir)
    local steps = store:steps()
    store:close()
    return steps
  end

  before_each(function()
    mount, reason = mount_tmpfs(4)
    if not mount then
      print("dcp_full_disk_spec: skipped: " .. reason)
      return
    end
    dir = mount .. "/ckpt"
    dcp.save(one_mib(0), dir, {step = 0})
    dcp.save(one_mib(1), dir, {step = 1})
  end)

  after_each(function()
    if mount then unmount(mount) end
    collectgarbage()
  end)

  local function assert_saves_into_freed_pages()
    assert.equal(2, dcp.save(one_mib(2), dir, {step = 2}))
    local store = dcp.open(dir)
    assert.same({1, 2}, store:steps())
    assert.same({}, (store:verify()))
    assert.is_true(ms.equal(ms.full({256, 1024}, 1), store:read("w", 1)))
    assert.is_true(ms.equal(ms.full({256, 1024}, 2), store:read("w", 2)))
    store:close()
  end

  it("ckpt rm with 200 KiB left deletes the step and the next save reuses its pages", function()
    if not mount then return end
    local filler = dir .. "/../filler"
    shell_ok(("dd if=/dev/zero of='%s' bs=1024 count=%d"):format(filler, math.max(0, avail_kib(mount) - 200)))
    assert_no_space(pcall(dcp.save, one_mib(2), dir, {step = 2}))
    local pipe = io.popen("bin/moonshard ckpt rm " .. dir .. " 0 2>&1; echo \"exit=$?\"")
    local output = pipe:read("*a")
    pipe:close()
    assert.truthy(output:find("deleted step 0", 1, true), output)
    assert.truthy(output:find("exit=0", 1, true), output)
    assert.same({1}, steps_of())
    assert_saves_into_freed_pages()
  end)

  it("dcp.delete on a disk with no byte left deletes the step and the next save reuses its pages", function()
    if not mount then return end
    fill(mount, 0)
    assert_no_space(pcall(dcp.save, one_mib(2), dir, {step = 2}))
    dcp.delete(dir, 0)
    assert.same({1}, steps_of())
    assert_saves_into_freed_pages()
  end)
end)
