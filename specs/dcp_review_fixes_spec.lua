-- dcp and ckpt behaviours a review found wrong: retention never deletes the step a save
-- just wrote, error paths of a save release the writer lock, safetensors files with empty
-- tensors import, load checks the kinds of non-tensor values, delete does not create a
-- store, damaged manifests are reported per step, a Stateful can be the state dict, cycles
-- and bad state dicts are named, ckpt escapes control bytes, steps stay below 2^53, and a
-- safetensors header nested too deep is refused.
local ms = require "moonshard"
local dcp = ms.dcp
local store_dirs = require "support.store_dirs"

-- bin/moonshard with args: its exit status and everything it printed.
local function moonshard(args)
  local pipe = io.popen("bin/moonshard " .. args .. " 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output
end

local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function steps_of(dir)
  local store = dcp.open(dir)
  local steps = store:steps()
  store:close()
  return steps
end

describe("dcp.save with keep_last", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("refuses a step its own retention would delete, before writing anything", function()
    dcp.save({a = 10}, dir, {step = 10})
    dcp.save({a = 11}, dir, {step = 11})
    local err = error_of(dcp.save, {a = 5}, dir, {step = 5, keep_last = 2})
    assert.truthy(err:find("step 5 with keep_last = 2 would be deleted by its own save: the store holds 2 " ..
                           "newer steps (10, 11)", 1, true), err)
    assert.same({10, 11}, steps_of(dir))
    local h
    err = error_of(function() h = dcp.async_save({a = 5}, dir, {step = 5, keep_last = 1}) end)
    assert.truthy(err:find("step 5 with keep_last = 1 would be deleted by its own save: the store holds 2 " ..
                           "newer steps (10, 11)", 1, true), err)
    assert.is_nil(h)
    assert.same({10, 11}, steps_of(dir))
  end)

  it("keeps the step it saved with the newest others, and the store stays writable", function()
    dcp.save({a = 10}, dir, {step = 10})
    dcp.save({a = 11}, dir, {step = 11})
    assert.equal(5, dcp.save({a = 5}, dir, {step = 5, keep_last = 3}))
    assert.same({5, 10, 11}, steps_of(dir))
    assert.equal(12, dcp.save({a = 12}, dir, {keep_last = 2}))
    assert.same({11, 12}, steps_of(dir))
    local h = dcp.async_save({a = 13}, dir, {keep_last = 1})
    assert.equal(13, h:wait())
    assert.same({13}, steps_of(dir))
  end)
end)

describe("a save whose collective raises", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("releases the writer lock at once (a REPL line run on rank 0 alone, then with %all)", function()
    local script = os.tmpname() .. ".lua"
    local file = assert(io.open(script, "w"))
    file:write([[
local ms = require "moonshard"
ms.dist.spawn(2, function()
  local model = ms.fsdp.FSDP(ms.nn.Linear(2, 4))
  ms.repl{model = model, history = false}
end)
]])
    file:close()
    local input = os.tmpname()
    file = assert(io.open(input, "w"))
    local save = ("ms.dcp.save({model = model:state_dict()}, %q, {step = 1})"):format(dir)
    local async = ("ms.dcp.async_save({model = model:state_dict()}, %q, {step = 2})"):format(dir)
    file:write(save, "\n%all =", save, "\n", async, "\n%all =", async, ":wait()\n")
    file:close()
    local pipe = io.popen("LUA_PATH='lua/?.lua;lua/?/init.lua;;' timeout -s KILL 60 luajit " .. script .. " < " .. input .. " 2>&1; echo \"exit=$?\"")
    local output = pipe:read("*a")
    pipe:close()
    os.remove(script)
    os.remove(input)
    assert.truthy(output:find("exit=0", 1, true), output)
    local _, alone = output:gsub("the other ranks are waiting at the REPL prompt", "")
    assert.equal(2, alone, output)
    assert.is_nil(output:find("being written by another job", 1, true), output)
    assert.truthy(output:find("[rank 0] 1\n[rank 1] 1\n", 1, true), output)
    assert.truthy(output:find("[rank 0] 2\n[rank 1] 2\n", 1, true), output)
    assert.same({1, 2}, steps_of(dir))
  end)
end)

describe("safetensors files with empty tensors", function()
  local safetensors = require "moonshard.cli.safetensors"
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("read whatever order the header's table gives, empty tensors between full ones", function()
    local path = dir .. ".safetensors"
    local tensors = {{name = "a", tensor = ms.tensor({1, 2})}}
    for i = 1, 40 do tensors[#tensors + 1] = {name = ("empty%02d"):format(i), tensor = ms.zeros(0, 3)} end
    tensors[#tensors + 1] = {name = "b", tensor = ms.tensor({3, 4, 5})}
    tensors[#tensors + 1] = {name = "z", tensor = ms.zeros(0)}
    safetensors.write(path, tensors)
    local read = safetensors.read(path)
    os.remove(path)
    assert.equal(43, #read)
    local by_name = {}
    for _, entry in ipairs(read) do by_name[entry.name] = entry.tensor end
    assert.is_true(ms.equal(ms.tensor({1, 2}), by_name.a))
    assert.is_true(ms.equal(ms.tensor({3, 4, 5}), by_name.b))
    assert.same({0, 3}, {unpack(by_name.empty17:shape())})
    assert.same({0}, {unpack(by_name.z:shape())})
  end)

  it("ckpt export then import round-trips a step with empty tensors", function()
    local sd = {model = {w = ms.arange(6):view(2, 3), empty = ms.zeros(0), bias = ms.zeros(0, 4), v = ms.ones(2)}}
    dcp.save(sd, dir, {step = 1})
    local path = dir .. ".safetensors"
    local status, output = moonshard(("ckpt export %s %s"):format(dir, path))
    assert.equal(0, status, output)
    for round = 1, 5 do
      local other = ("%s.import%d"):format(dir, round)
      status, output = moonshard(("ckpt import %s %s"):format(path, other))
      assert.equal(0, status, output)
      local store = dcp.open(other)
      assert.is_true(ms.equal(sd.model.w, store:read("model.w", 0)))
      assert.same({0, 4}, {unpack(store:read("model.bias", 0):shape())})
      store:close()
      os.execute("rm -rf '" .. other .. "'")
    end
    os.remove(path)
  end)
end)

describe("dcp.load of non-tensor values", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("checks each value's kind before copying anything", function()
    dcp.save({lr = "0.1", flag = 1, epoch = true, w = ms.ones(3)}, dir, {step = 1})
    local sd = {lr = 0.5, flag = false, epoch = 0, w = ms.zeros(3)}
    local err = error_of(dcp.load, sd, dir)
    assert.truthy(err:find("'epoch' is a boolean in the checkpoint but a number in the state dict", 1, true), err)
    assert.is_true(ms.equal(ms.zeros(3), sd.w))
    assert.same({0.5, false, 0}, {sd.lr, sd.flag, sd.epoch})
    sd.epoch = false
    err = error_of(dcp.load, sd, dir)
    assert.truthy(err:find("'flag' is a number in the checkpoint but a boolean in the state dict", 1, true), err)
    sd.flag = 7
    err = error_of(dcp.load, sd, dir)
    assert.truthy(err:find("'lr' is a string in the checkpoint but a number in the state dict", 1, true), err)
    assert.is_true(ms.equal(ms.zeros(3), sd.w))
    sd.lr = "x"
    dcp.load(sd, dir)
    assert.same({"0.1", 1, true}, {sd.lr, sd.flag, sd.epoch})
    assert.is_true(ms.equal(ms.ones(3), sd.w))
  end)
end)

describe("dcp.delete of a directory that holds no store", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  local function listing(path)
    local pipe = io.popen("find '" .. path .. "' 2>/dev/null | sort")
    local text = pipe:read("*a")
    pipe:close()
    return text
  end

  it("says so and creates nothing", function()
    local missing = dir .. "/no/such/store"
    local err = error_of(dcp.delete, missing, 0)
    assert.truthy(err:find("dcp.delete: " .. missing .. ": no such checkpoint directory", 1, true), err)
    assert.equal("", listing(dir))
    os.execute("mkdir -p '" .. dir .. "'")
    err = error_of(dcp.delete, dir, 0)
    assert.truthy(err:find(dir .. " is not a moonshard store (it has no index.mdb)", 1, true), err)
    assert.equal(dir .. "\n", listing(dir))
  end)
end)

describe("a store with one damaged manifest", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  -- Steps 1 to 3; the manifest of step 2 (every copy index.mdb holds) has one bit flipped.
  local function damaged_store()
    for step = 1, 3 do
      local sd = {model = {w = ms.full({3}, step)}}
      if step == 2 then sd.marker_of_step_two = ms.ones(2) end
      dcp.save(sd, dir, {step = step})
    end
    local path = dir .. "/index.mdb"
    local file = assert(io.open(path, "rb"))
    local bytes = file:read("*a")
    file:close()
    local flipped = bytes:gsub("marker_of_step_two", "iarker_of_step_two")
    assert.are_not.equal(bytes, flipped)
    file = assert(io.open(path, "wb"))
    file:write(flipped)
    file:close()
  end

  it("ls lists the other steps and the damaged one as damaged, and exits 1", function()
    damaged_store()
    local status, output = moonshard("ckpt ls " .. dir)
    assert.equal(1, status, output)
    assert.truthy(output:find("\n         1        1        1         12 B      1\n", 1, true), output)
    assert.truthy(output:find("\n         2  DAMAGED: " .. dir .. ": step 2: manifest failed its checksum\n", 1, true), output)
    assert.truthy(output:find("\n         3        1        1         12 B      1\n", 1, true), output)
    assert.truthy(output:find("moonshard ckpt ls: 1 damaged step", 1, true), output)
  end)

  it("verify checks every other step and reports the damaged one, and exits 1", function()
    damaged_store()
    local status, output = moonshard("ckpt verify " .. dir)
    assert.equal(1, status, output)
    assert.truthy(output:find("step 1: ok (1 chunks)\nstep 2: DAMAGED: " .. dir ..
                              ": step 2: manifest failed its checksum\nstep 3: ok (1 chunks)\n", 1, true), output)
    assert.truthy(output:find("moonshard ckpt verify: 1 step whose manifest cannot be read", 1, true), output)
    local store = dcp.open(dir)
    local problems, deleted = store:verify()
    assert.same({}, deleted)
    assert.same({{step = 2, message = dir .. ": step 2: manifest failed its checksum"}}, problems)
    assert.same({{step = 2, message = dir .. ": step 2: manifest failed its checksum"}}, (store:verify(2)))
    assert.matches("step 7 is not committed", error_of(store.verify, store, 7))
    store:close()
  end)
end)

describe("state dicts that are Stateful objects", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("save and load a model or a scheduler passed as the state dict itself", function()
    ms.manual_seed(3)
    local model = ms.nn.Linear(2, 3)
    assert.equal(0, dcp.save(model, dir))
    local store = dcp.open(dir)
    local names = {}
    for i, e in ipairs(store:entries()) do names[i] = e.fqn end
    store:close()
    assert.same({"bias", "weight"}, names)
    local other = ms.nn.Linear(2, 3)
    assert.equal(0, dcp.load(other, dir).step)
    assert.is_true(ms.equal(model.weight, other.weight))
    assert.is_true(ms.equal(model.bias, other.bias))

    local opt = ms.optim.SGD(model:parameters(), {lr = 1})
    local scheduler = ms.optim.lr_scheduler.StepLR(opt, {step_size = 1, gamma = 0.5})
    opt:step()
    scheduler:step()
    assert.equal(1, dcp.save(scheduler, dir))
    local fresh = ms.optim.lr_scheduler.StepLR(ms.optim.SGD(other:parameters(), {lr = 1}), {step_size = 1, gamma = 0.5})
    dcp.load(fresh, dir)
    assert.same(scheduler:state_dict(), fresh:state_dict())
  end)

  it("say what a state dict must be", function()
    local err = error_of(dcp.save, ms.ones(2), dir)
    assert.truthy(err:find("the state dict must be a table of tensors, values and tables (for a model: " ..
                           "{model = model} or model:state_dict()) or a Stateful (state_dict and " ..
                           "load_state_dict), got a tensor", 1, true), err)
    err = error_of(dcp.save, setmetatable({}, {}), dir)
    assert.truthy(err:find("got an object without state_dict and load_state_dict methods", 1, true), err)
  end)

  it("name a Stateful whose state dict holds itself", function()
    local loop = {load_state_dict = function() end}
    function loop:state_dict() return {n = 1, me = self} end
    local err = error_of(dcp.save, {x = loop}, dir)
    assert.truthy(err:find("a cycle of Stateful objects: 'x.me' is 'x' again (a state_dict() holds the " ..
                           "object it came from)", 1, true), err)
    err = error_of(dcp.save, loop, dir)
    assert.truthy(err:find("a cycle of Stateful objects: 'me' is the state dict itself again", 1, true), err)
    local a, b = {load_state_dict = function() end}, {load_state_dict = function() end}
    function a.state_dict() return {peer = b} end
    function b.state_dict() return {peer = a} end
    err = error_of(dcp.load, {a = a}, dir)
    assert.truthy(err:find("a cycle of Stateful objects: 'a.peer.peer' is 'a' again", 1, true), err)
  end)
end)

describe("ckpt output of keys and values with control bytes", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("escapes them as string values are, so the terminal shows them and obeys none", function()
    local key = "evil\27[31mred"
    dcp.save({[key] = ms.ones(1), note = "a\27[2Jb\nc", plain = ms.ones(1)}, dir, {step = 1})
    dcp.save({[key] = ms.full({1}, 2), note = "x", plain = ms.ones(1)}, dir, {step = 2})
    local outputs = {}
    for _, args in ipairs({"show " .. dir .. " --step 1", "show " .. dir .. " evil", "show " .. dir .. " 'evil\27[31mred'",
                           "show " .. dir .. " 'zz\27[1m'", "diff " .. dir .. " 1 2", "ls " .. dir, "verify " .. dir}) do
      local _, output = moonshard("ckpt " .. args)
      assert.is_nil(output:find("\27", 1, true), args .. ": " .. output)
      outputs[#outputs + 1] = output
    end
    assert.truthy(outputs[1]:find('^"evil\\27%[31mred"%s+f32  %[1%]'), outputs[1])
    assert.truthy(outputs[1]:find('\nnote%s+string  "a\\27%[2Jb\\nc"\nplain%s+f32'), outputs[1])
    assert.truthy(outputs[2]:find('^"evil\\27%[31mred"%s+f32'), outputs[2])
    assert.truthy(outputs[3]:find('^"evil\\27%[31mred"  %(step 2%)\n'), outputs[3])
    assert.truthy(outputs[4]:find('step 2 has no entry named or starting with "zz\\27[1m"', 1, true), outputs[4])
    assert.truthy(outputs[5]:find('values   "evil\\27%[31mred"%s+max |b%-a| 1'), outputs[5])
    assert.truthy(outputs[5]:find('values   note%s+"a\\27%[2Jb\\nc" %-> x\n'), outputs[5])
  end)
end)

describe("steps a Lua number cannot hold exactly", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("are refused wherever a step is given, and never chosen as the next one", function()
    local last = 2 ^ 53 - 1
    local err = error_of(dcp.save, {a = 1}, dir, {step = 2 ^ 53})
    assert.truthy(err:find("dcp.save: step must be an integer in [0, 2^53), got 9007199254740992", 1, true), err)
    assert.equal(last, dcp.save({a = 1}, dir, {step = last}))
    err = error_of(dcp.save, {a = 2}, dir)
    assert.truthy(err:find("the step after 9007199254740991 would be 2^53, past the steps a Lua number " ..
                           "holds exactly; pass a smaller step", 1, true), err)
    assert.truthy(error_of(dcp.delete, dir, 2 ^ 53):find("step must be an integer in [0, 2^53)", 1, true))
    assert.truthy(error_of(dcp.delete, dir, 1e300):find("step must be an integer in [0, 2^53), got 1e+300", 1, true))
    assert.truthy(error_of(dcp.load, {a = 0}, dir, {step = 2 ^ 53 + 2}):find("step must be an integer", 1, true))
    local store = dcp.open(dir)
    assert.truthy(error_of(store.read, store, "a", 2 ^ 53):find("step must be an integer in [0, 2^53)", 1, true))
    assert.same({last}, store:steps())
    store:close()
    for _, args in ipairs({"rm " .. dir .. " 9007199254740993", "rm " .. dir .. " 9007199254740992",
                           "show " .. dir .. " --step 9007199254740993", "diff " .. dir .. " 9007199254740991 9e15000"}) do
      local status, output = moonshard("ckpt " .. args)
      assert.equal(2, status, args .. ": " .. output)
      assert.truthy(output:find("2^53", 1, true), output)
    end
    assert.same({last}, steps_of(dir))
  end)

  it("in a store written through the C API are named, not rounded", function()
    local ffi = require "ffi"
    local lib = require("moonshard.ffi").lib
    local out = ffi.new("ms_store*[1]")
    assert.equal(0, lib.ms_store_open(out, dir, lib.MS_STORE_READ_WRITE))
    local s = out[0]
    assert.equal(0, lib.ms_store_begin(s, 9007199254740993LL, 0, lib.MS_STORE_FOREGROUND))
    assert.equal(0, lib.ms_store_put_bytes(s, "a", "b1", 2))
    assert.equal(0, lib.ms_store_commit_data(s))
    assert.equal(0, lib.ms_store_commit_manifest(s, 1))
    lib.ms_store_close(s)
    local store = dcp.open(dir)
    local err = error_of(store.steps, store)
    assert.truthy(err:find("the store holds step 9007199254740993, past 2^53 - 1", 1, true), err)
    store:close()
  end)
end)

describe("a safetensors header nested deeper than any real one", function()
  it("is refused with a message, not a stack overflow", function()
    local safetensors = require "moonshard.cli.safetensors"
    local path = os.tmpname()
    for _, header in ipairs({string.rep("[", 100000) .. string.rep("]", 100000),
                             '{"a":' .. string.rep('{"b":', 70) .. "1" .. string.rep("}", 71),
                             '{"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "note": "' ..
                             string.rep("[", 100) .. '\\""}, "y": ' .. string.rep("[", 80) .. string.rep("]", 80) .. "}"}) do
      header = header .. string.rep(" ", (8 - #header % 8) % 8)
      local n, length = #header, {}
      for i = 1, 8 do length[i], n = string.char(n % 256), math.floor(n / 256) end
      local file = assert(io.open(path, "wb"))
      file:write(table.concat(length), header, "\0\0\0\0")
      file:close()
      local err = error_of(safetensors.read, path)
      assert.truthy(err:find("safetensors: " .. path .. ": the header nests objects and arrays more than 64 " ..
                             "deep; a safetensors header has 3 levels", 1, true), err)
    end
    os.remove(path)
  end)
end)
