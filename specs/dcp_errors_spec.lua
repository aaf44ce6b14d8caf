-- dcp errors name what was wrong: missing and unexpected keys, shape, dtype and kind
-- mismatches, a corrupted chunk (also listed by store:verify()), directories that are not
-- stores, stores from a newer format, bad arguments, and a failure on one rank of a save.
local ffi = require "ffi"
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp

local function f32_bytes(value) return ffi.string(ffi.new("float[1]", value), 4) end

local store_dirs = require "support.store_dirs"
local fresh_dir = store_dirs.fresh

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local bytes = f:read("*a")
  f:close()
  return bytes
end

local function write_file(path, bytes)
  local f = assert(io.open(path, "wb"))
  f:write(bytes)
  f:close()
end

-- Replace every occurrence of needle in the file by replacement; returns how many.
local function patch_file(path, needle, replacement)
  local bytes = read_file(path)
  local count = 0
  local start = 1
  local parts = {}
  while true do
    local i = bytes:find(needle, start, true)
    if not i then break end
    parts[#parts + 1] = bytes:sub(start, i - 1) .. replacement
    start = i + #needle
    count = count + 1
  end
  parts[#parts + 1] = bytes:sub(start)
  write_file(path, table.concat(parts))
  return count
end

local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

-- A state dict whose tensor bytes are easy to find in the files: model.w holds 16 KiB of a
-- byte pattern no other value contains.
local function sample()
  return {model = {w = ms.full({64, 64}, 1234.5), b = ms.arange(5, {dtype = "f64"})},
          epoch = 3, tag = "run-a", done = false}
end

local function shaped_like(sd)
  return {model = {w = ms.zeros(64, 64), b = ms.zeros(5, {dtype = "f64"})}, epoch = 0, tag = "", done = true}
end

describe("dcp errors", function()
  local dir
  before_each(function()
    dir = fresh_dir()
    dcp.save(sample(), dir, {step = 1})
  end)
  after_each(function()
    os.execute("rm -rf '" .. dir .. "'")
    -- Free this spec's tensors now: ranks forked later inherit what this process holds.
    collectgarbage()
    collectgarbage()
  end)

  it("names the missing keys", function()
    local sd = shaped_like()
    sd.model.extra = ms.zeros(2)
    sd.optim = {lr = 0.1}
    local err = error_of(dcp.load, sd, dir)
    assert.matches("^moonshard: dcp.load: ", err)
    assert.matches("missing keys %(in the state dict, not in the checkpoint%): model.extra, optim.lr", err)
  end)

  it("names unexpected keys in strict mode and ignores them with strict = false", function()
    local sd = shaped_like()
    sd.model.b, sd.tag = nil, nil
    local err = error_of(dcp.load, sd, dir)
    assert.matches("unexpected keys %(in the checkpoint, not in the state dict; pass strict = false to ignore them%): model.b, tag", err)
    local report = dcp.load(sd, dir, {strict = false})
    assert.same({"model.b", "tag"}, report.unexpected_keys)
    assert.is_true(ms.equal(ms.full({64, 64}, 1234.5), sd.model.w))
    assert.equal(3, sd.epoch)
  end)

  it("names the key and both shapes on a shape mismatch, and changes nothing", function()
    local sd = shaped_like()
    sd.model.w = ms.zeros(64, 32)
    local err = error_of(dcp.load, sd, dir)
    assert.matches("shape mismatch for 'model.w': the checkpoint has %[64, 64%], the state dict has %[64, 32%]", err)
    assert.is_true(ms.equal(ms.zeros(5, {dtype = "f64"}), sd.model.b))
    assert.equal(0, sd.epoch)
  end)

  it("names the key and both dtypes when a float would load into an integer tensor", function()
    local sd = shaped_like()
    sd.model.b = ms.zeros(5, {dtype = "i64"})
    local err = error_of(dcp.load, sd, dir)
    assert.matches("dtype mismatch for 'model.b': the checkpoint has f64, the state dict has i64", err)
  end)

  it("names the key when a tensor meets a non-tensor value", function()
    local sd = shaped_like()
    sd.epoch = ms.zeros(1)
    assert.matches("'epoch' is a number in the checkpoint but a tensor in the state dict", error_of(dcp.load, sd, dir))
    sd = shaped_like()
    sd.model.w = 7
    assert.matches("'model.w' is a tensor in the checkpoint but a number in the state dict", error_of(dcp.load, sd, dir))
  end)

  it("names the key of a meta tensor, on save and on load, and writes nothing", function()
    local meta = ms.device("meta", function() return ms.nn.Linear(64, 5) end)
    local sd = shaped_like()
    sd.model.b = meta.bias
    local err = error_of(dcp.load, sd, dir)
    local dtype = meta.bias:dtype()
    assert.are.equal("moonshard: dcp.load: 'model.b' is a meta tensor ([5] " .. dtype .. ", no data); materialise it " ..
                     "first (fsdp.FSDP with param_init_fn, or module:to_empty() and an initialiser)", err)
    assert.is_true(ms.equal(ms.zeros(64, 64), sd.model.w))
    local other = fresh_dir()
    err = error_of(dcp.save, {model = meta:state_dict()}, other)
    assert.are.equal("moonshard: dcp.save: 'model.bias' is a meta tensor ([5] " .. dtype .. ", no data); materialise it " ..
                     "first (fsdp.FSDP with param_init_fn, or module:to_empty() and an initialiser)", err)
    assert.is_nil(io.open(other .. "/data.mdb"))
    os.execute("rm -rf '" .. other .. "'")
  end)

  it("fails a load naming the key of a corrupted chunk, and store:verify() lists it", function()
    dcp.save(sample(), dir, {step = 2})
    local pattern = string.rep(f32_bytes(1234.5), 16)
    local bytes = read_file(dir .. "/shard-0.mdb")
    local at = bytes:find(pattern, 1, true)
    assert.is_not_nil(at, "the chunk bytes are in shard-0.mdb")
    local flipped = string.char(bit.bxor(bytes:byte(at + 100), 0x01))
    write_file(dir .. "/shard-0.mdb", bytes:sub(1, at + 99) .. flipped .. bytes:sub(at + 101))

    local err = error_of(dcp.load, shaped_like(), dir, {step = 1})
    assert.matches("'model.w'", err)
    assert.matches("checksum", err)
    local store = dcp.open(dir)
    local problems = store:verify()
    assert.equal(1, #problems)
    assert.equal("model.w", problems[1].fqn)
    assert.equal(1, problems[1].step)
    assert.matches("model.w", problems[1].message)
    -- one entry alone: the damaged one, a sound one, one that is not there
    assert.equal("model.w", store:verify(1, "model.w")[1].fqn)
    assert.same({}, store:verify(1, "model.b"))
    assert.same({}, store:verify(2, "model.w"))
    assert.matches("step 1 has no entry 'model.nope'", error_of(function() return store:verify(1, "model.nope") end))
    store:close()
    local sd = shaped_like()
    dcp.load(sd, dir, {step = 2})
    assert.is_true(ms.equal(ms.full({64, 64}, 1234.5), sd.model.w))
  end)

  it("says when a directory is not a moonshard store", function()
    local plain = fresh_dir()
    os.execute("mkdir -p '" .. plain .. "'")
    assert.matches("is not a moonshard store %(it has no index.mdb%)", error_of(dcp.load, shaped_like(), plain))
    assert.matches("is not a moonshard store", error_of(dcp.open, plain))
    write_file(plain .. "/index.mdb", string.rep("not lmdb ", 2000))
    assert.matches("not a moonshard store", error_of(dcp.open, plain))
    os.execute("rm -rf '" .. plain .. "'")
    assert.matches("no such checkpoint directory", error_of(dcp.load, shaped_like(), plain))
    assert.matches("is not a moonshard store %(not a directory%)", error_of(dcp.open, dir .. "/index.mdb"))
  end)

  it("refuses a store written by a newer format version", function()
    local record = "MSHDSTOR\2\0\0\0"
    assert.is_true(patch_file(dir .. "/index.mdb", record, "MSHDSTOR\3\0\0\0") >= 1)
    local err = error_of(dcp.open, dir)
    assert.matches("written by store format version 3; this build reads up to 2", err)
    assert.matches("format version 3", error_of(dcp.load, shaped_like(), dir))
    assert.matches("format version 3", error_of(dcp.save, sample(), dir, {step = 5}))
  end)

  it("names a step that is not committed", function()
    assert.matches("step 7 is not committed", error_of(dcp.load, shaped_like(), dir, {step = 7}))
    local store = dcp.open(dir)
    assert.matches("step 7 is not committed", error_of(store.read, store, "model.w", 7))
    assert.matches("step 1 has no entry 'model.nope'", error_of(store.read, store, "model.nope"))
    store:close()
  end)

  it("refuses to overwrite a committed step", function()
    assert.matches("step 1 is already committed", error_of(dcp.save, sample(), dir, {step = 1}))
    local store = dcp.open(dir)
    assert.same({1}, store:steps())
    store:close()
  end)

  it("rejects values and options a checkpoint cannot hold", function()
    assert.matches("'model.f' is a function", error_of(dcp.save, {model = {f = print}}, dir))
    local t = ms.zeros(2)
    t:free()
    assert.matches("'x' is a tensor that was released", error_of(dcp.save, {x = t}, dir))
    local loop = {}
    loop.self = loop
    assert.matches("'self' refers back to a table that contains it", error_of(dcp.save, loop, dir))
    assert.matches("two values flatten to the same key 'a.b'", error_of(dcp.save, {a = {b = 1}, ["a.b"] = 2}, dir))
    assert.matches("key 0.5 under '' is a number", error_of(dcp.save, {[0.5] = 1}, dir))
    assert.matches("step must be an integer in %[0, 2%^53%), got %-1", error_of(dcp.save, sample(), dir, {step = -1}))
    assert.matches("step must be an integer in %[0, 2%^53%), got x", error_of(dcp.load, shaped_like(), dir, {step = "x"}))
    assert.matches("the state dict must be a table", error_of(dcp.save, 5, dir))
    assert.matches("checkpoint directory must be a non%-empty string", error_of(dcp.save, sample(), ""))
  end)

  it("raises a failure of one rank on every rank, naming that rank", function()
    local other = fresh_dir()
    local results = dist.spawn(2, function(rank)
      local mesh = dist.init_device_mesh({2})
      local w = ms.distribute_tensor(ms.zeros(6, 3), mesh, {ms.Shard(0)})
      if rank == 1 then w = ms.DTensor.new(ms.zeros(2, 3), mesh, {ms.Shard(0)}, {6, 3}) end
      local ok, err = pcall(dcp.save, {w = w}, other, {step = 1})
      return {ok = ok, err = tostring(err)}
    end)
    for _, res in ipairs(results) do
      assert.is_false(res.ok)
      assert.matches("rank 1: 'w': the local tensor has shape %[2, 3%], but rank 1's part of %[6, 3%] is %[3, 3%]", res.err)
    end
    local store = dcp.open(other)
    assert.same({}, store:steps())
    store:close()
    assert.matches("has no committed step", error_of(dcp.load, {w = ms.zeros(6, 3)}, other))
    os.execute("rm -rf '" .. other .. "'")
  end)

  it("raises on every rank when the store cannot be opened on one of them", function()
    local results = dist.spawn(2, function(rank)
      local target = rank == 1 and dir .. "/index.mdb/inside" or dir
      local ok, err = pcall(dcp.save, {x = ms.zeros(2)}, target, {step = 2})
      return {ok = ok, err = tostring(err)}
    end)
    for _, res in ipairs(results) do
      assert.is_false(res.ok)
      assert.matches("^moonshard: dcp.save: rank 1: .*index.mdb", res.err)
    end
    local store = dcp.open(dir)
    assert.same({1}, store:steps())
    store:close()
  end)
end)
