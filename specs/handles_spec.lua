-- Tensors nobody frees: their handles and storage go back after the collection that finds them
-- dead (lua/moonshard/handles.lua), and not while anything still holds the handle.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local lib = require("moonshard.ffi").lib

local function allocated() return ms.memory_stats("cpu").allocated end

local function collect()
  collectgarbage("collect")
  collectgarbage("collect")
end

describe("tensor handles left to the collector", function()
  before_each(function()
    collect()
    collectgarbage("stop")
  end)
  after_each(function() collectgarbage("restart") end)

  it("free a dropped tensor's storage after a collection", function()
    local before = allocated()
    do local _ = ms.empty(1000) end
    assert.equal(before + 4000, allocated())
    collect()
    assert.equal(before, allocated())
  end)

  it("free a dropped view's handle without freeing the storage its base still holds", function()
    local base = ms.full({4, 4}, 2)
    local before = allocated()
    do local _ = base:view(16) end
    collect()
    assert.equal(before, allocated())
    assert.equal(32, base:sum():item())
    base:free()
  end)

  it("keep a handle whose cdata is held after its tensor was dropped", function()
    local before = allocated()
    local handle
    do
      local t = ms.full({8}, 3)
      handle = t._c
    end
    collect()
    assert.equal(before + 32, allocated())
    assert.equal(3, ffi.cast("float*", lib.ms_tensor_data(handle))[7])
    handle = nil
    collect()
    assert.equal(before, allocated())
  end)

  it("do not free a tensor released explicitly a second time", function()
    local before = allocated()
    local t = ms.empty(100)
    local frees = ms.memory_stats("cpu").frees
    t:free()
    t = nil
    collect()
    assert.equal(before, allocated())
    assert.equal(frees + 1, ms.memory_stats("cpu").frees)
  end)

  it("reuse the slots of freed handles: temporaries do not grow the slot table", function()
    collectgarbage("restart")
    local state = debug.getregistry().moonshard_handles
    local x = ms.ones(3, 3)
    for _ = 1, 20000 do local _ = x + x end
    collect()
    local before = allocated()
    local top = state.top
    for _ = 1, 20000 do local _ = x + x end
    collect()
    assert.equal(before, allocated())
    assert.is_true(state.top <= top + 20000 / 2,
                   ("slot table grew from %d to %d"):format(top, state.top))
    x:free()
  end)

  it("free tensors made before the modules were loaded again (busted reloads them)", function()
    local before = allocated()
    local old = ms.empty(250)
    local saved = {}
    for name, module in pairs(package.loaded) do
      if name:match("^moonshard") then saved[name], package.loaded[name] = module, nil end
    end
    local reloaded = require "moonshard"
    local after_reload = reloaded.memory_stats("cpu").allocated
    old = nil
    collect()
    local left = reloaded.memory_stats("cpu").allocated
    for name, module in pairs(saved) do package.loaded[name] = module end
    assert.equal(before + 1000, after_reload)
    assert.equal(before, left)
  end)
end)
