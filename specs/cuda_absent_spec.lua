-- Without a GPU (or in a build without CUDA), asking for a cuda:N device raises a Lua error
-- that names the device and why it is missing, and the cpu and host pools keep working.
local ms = require "moonshard"
local ffi = require "ffi"
local lib = require("moonshard.ffi").lib

local count = ffi.new("int[1]")
assert(lib.ms_cuda_device_count(count) == 0)
local has_device = count[0] > 0

local function raises(name, needles, fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected moonshard: " .. name .. ": ... but nothing was raised")
  assert.are.equal("string", type(err))
  local prefix = "moonshard: " .. name .. ":"
  assert.are.equal(prefix, err:sub(1, #prefix), err)
  for _, needle in ipairs(needles) do
    assert.is_truthy(err:find(needle, 1, true), "'" .. needle .. "' is not in: " .. err)
  end
end

describe("cuda devices on a machine without a GPU", function()
  if has_device then
    pending("this machine has a CUDA device; specs/gpu/ covers it")
    return
  end

  it("reports no device count and a reason", function()
    assert.are.equal(0, count[0])
    assert.is_truthy(#ffi.string(lib.ms_cuda_unavailable_reason()) > 0)
  end)

  it("raises a clear error when a tensor moves to cuda:0", function()
    local reason = ffi.string(lib.ms_cuda_unavailable_reason())
    raises("to", {"cuda:0 is not available", reason}, function() ms.ones(2, 3):to("cuda:0") end)
  end)

  it("raises a clear error when a tensor is made on a device", function()
    raises("zeros", {"cuda:1 is not available"}, function() ms.zeros(2, {device = "cuda:1"}) end)
  end)

  it("raises for a module moved to a device", function()
    local ok, err = pcall(function() ms.nn.Linear(2, 2):to("cuda:0") end)
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("cuda:0 is not available", 1, true), tostring(err))
  end)

  it("raises a clear error when a rank asks for the nccl backend", function()
    local results = ms.dist.spawn(2, function()
      local backend = ms.dist.get_backend()
      ms.dist.init_process_group(backend) -- the world's own backend: nothing changes
      local ok, err = pcall(ms.dist.init_process_group, "nccl")
      local unknown_ok, unknown = pcall(ms.dist.init_process_group, "gloo")
      return {ok = ok, err = tostring(err), unknown_ok = unknown_ok, unknown = tostring(unknown),
              still = ms.dist.get_backend(), backend = backend}
    end)
    for _, res in ipairs(results) do
      assert.is_false(res.ok)
      assert.is_truthy(res.err:find("moonshard: dist.init_process_group: ", 1, true), res.err)
      assert.is_truthy(res.err:find("nccl", 1, true) or res.err:find("cuda", 1, true), res.err)
      assert.is_false(res.unknown_ok)
      assert.is_truthy(res.unknown:find("unknown backend 'gloo'", 1, true), res.unknown)
      assert.are.equal(res.backend, res.still)
    end
  end)

  it("keeps the host pool working with exact statistics", function()
    local before = ms.memory_stats("host").allocated
    local x = ms.keep(ms.ones(4, 4):to("host"))
    assert.are.equal("host", x:device())
    assert.are.equal(before + 4 * 4 * 4, ms.memory_stats("host").allocated)
    assert.are.same({4, 4}, x:to("cpu"):shape())
  end)
end)

describe("a CPU run", function()
  it("loads no CUDA library until it asks for a device", function()
    -- a fresh process (this one may have asked for a device already)
    local script = [[
      local ms = require "moonshard"
      local y = (ms.ones(64, 64) + 1):sum()
      local function mapped(name)
        local f = assert(io.open("/proc/self/maps"))
        local maps = f:read("*a")
        f:close()
        return maps:find(name, 1, true) ~= nil
      end
      local before = {mapped("libcudart"), mapped("libcublas"), mapped("libmoonshard_cuda")}
      pcall(ms.zeros, 2, {device = "cuda:0"})
      io.write(string.format("%g %s %s %s %s\n", y:item(), tostring(before[1]),
                             tostring(before[2]), tostring(before[3]),
                             tostring(mapped("libmoonshard_cuda"))))
    ]]
    local pipe = assert(io.popen("LUA_PATH='lua/?.lua;lua/?/init.lua;;' luajit -e '" ..
                                 script:gsub("'", "'\\''") .. "' 2>&1"))
    local out = pipe:read("*a")
    pipe:close()
    local cuda_build = ffi.string(lib.ms_build_config()):find("cuda", 1, true) ~= nil
    assert.are.equal(string.format("8192 false false false %s\n", tostring(cuda_build)), out)
  end)
end)
