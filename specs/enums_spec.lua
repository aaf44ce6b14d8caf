-- The names and codes Lua knows match the runtime's: every dtype (name, id, size), every pool
-- name, the op codes of ops/raw.lua and dist's reduce ops, and the store modes of dcp.
local ffi = require "ffi"
local ms = require "moonshard"
local lib = require("moonshard.ffi").lib
local Tensor = require "moonshard.tensor"
local raw = require "moonshard.ops.raw"
local handle = require "moonshard.dcp.handle"

-- What PyTorch users write and what each element takes, independent of the runtime.
local expected_dtypes = {
  {name = "f32", size = 4, c = "MS_F32"}, {name = "f64", size = 8, c = "MS_F64"},
  {name = "bf16", size = 2, c = "MS_BF16"}, {name = "f16", size = 2, c = "MS_F16"},
  {name = "i32", size = 4, c = "MS_I32"}, {name = "i64", size = 8, c = "MS_I64"},
  {name = "u8", size = 1, c = "MS_U8"},
}

describe("enums shared with the runtime", function()
  it("Lua knows exactly the runtime's dtypes, by name, id and size", function()
    assert.are.equal(#expected_dtypes, lib.MS_DTYPE_COUNT)
    local known = 0
    for _ in pairs(Tensor.dtype_ids) do known = known + 1 end
    assert.are.equal(lib.MS_DTYPE_COUNT, known)
    for _, d in ipairs(expected_dtypes) do
      local id = lib[d.c]
      assert.are.equal(id, Tensor.dtype_ids[d.name])
      assert.are.equal(d.name, Tensor.dtype_names[id])
      assert.are.equal(d.name, ffi.string(lib.ms_dtype_name(id)))
      assert.are.equal(d.size, tonumber(lib.ms_dtype_size(id)))
      local t = ms.zeros(2, {dtype = d.name})
      assert.are.equal(id, t._c.dtype)
      assert.are.equal(d.name, t:dtype())
      assert.are.equal(2 * d.size, t:nbytes())
    end
  end)

  it("every dtype alias names a runtime dtype", function()
    for alias, name in pairs({float32 = "f32", double = "f64", bfloat16 = "bf16", half = "f16",
                              int = "i32", long = "i64", bool = "u8"}) do
      assert.are.equal(lib["MS_" .. name:upper()], Tensor.dtype_id(alias, "spec"))
    end
  end)

  it("every pool name Lua resolves is the runtime's, and back (cuda:N by name only here)",
     function()
    local out = ffi.new("int[1]")
    for _, id in ipairs({lib.MS_POOL_CPU, lib.MS_POOL_HOST}) do
      local name = ffi.string(lib.ms_pool_name(id))
      assert.are.equal(0, lib.ms_pool_find(name, out))
      assert.are.equal(id, out[0])
      assert.are.equal(id, Tensor.pool_id(name, "spec"))
    end
    for id = lib.MS_POOL_CUDA0, lib.MS_MAX_POOLS - 1 do
      assert.are.equal("cuda:" .. (id - lib.MS_POOL_CUDA0), ffi.string(lib.ms_pool_name(id)))
    end
    assert.are.equal("cpu", ffi.string(lib.ms_pool_name(lib.MS_POOL_CPU)))
    assert.are.equal("host", ffi.string(lib.ms_pool_name(lib.MS_POOL_HOST)))
    assert.are.equal("cuda:0", ffi.string(lib.ms_pool_name(lib.MS_POOL_CUDA0)))
    assert.are.equal("host", ms.zeros(1, {device = "host"}):device())
  end)

  it("the op codes of ops/raw.lua are ops.h's", function()
    local names = {"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "POW", "EQ", "NE", "LT", "LE",
                   "GT", "GE", "NEG", "EXP", "LOG", "SQRT", "RSQRT", "ABS", "TANH", "SIGMOID",
                   "RELU", "GELU", "GELU_TANH", "SIN", "COS", "SIGN", "RECIPROCAL", "SQUARE",
                   "SUM", "MEAN", "MAX", "MIN", "SUMSQ"}
    for _, name in ipairs(names) do
      assert.is_number(raw[name], name)
      assert.are.equal(lib["MS_" .. name], raw[name], name)
    end
    -- the code reaches the right kernel: 7 - 2 through SUB, 7 > 2 through GT
    local a, b = ms.tensor{7}, ms.tensor{2}
    assert.are.same({5}, raw.binary(a, b, raw.SUB, "spec"):table())
    assert.are.same({1}, raw.binary(a, b, raw.GT, "spec"):table())
  end)

  it("the store modes of dcp are the runtime's", function()
    assert.are.equal(lib.MS_STORE_READ_ONLY, handle.READ_ONLY)
    assert.are.equal(lib.MS_STORE_READ_WRITE, handle.READ_WRITE)
  end)
end)
