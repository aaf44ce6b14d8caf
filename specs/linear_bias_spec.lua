-- ms_linear (F.linear's product): out = x @ weight^T + bias, the bias written into each GEMM
-- piece's own block of out just before its GEMM. The same bits as copying the broadcast bias
-- into out and then ms_matmul with beta = 1, for shapes cut into pieces by rows and by columns,
-- at 1 and 2 threads, with OpenBLAS too; the f64 product within rounding; every layout the
-- pieces cannot take (a weight stored transposed, a strided bias, f64, bf16) through the copy.
local ms = require "moonshard"
local C = require "moonshard.ffi"
local global_state = require "support.global_state"

local lib = C.lib

before_each(global_state.save)
after_each(global_state.restore)

-- The composition: the broadcast bias copied into out, then the GEMM accumulating onto it.
local function composed(x, weight, bias)
  local out = ms.empty(x:size(0), weight:size(0), {dtype = x:dtype()})
  C.check(lib.ms_copy(out._c, bias._c), "copy")
  C.check(lib.ms_matmul(out._c, x._c, weight._c, 0, 1, 1, 1), "matmul")
  return out
end

local function linear(x, weight, bias)
  local out = ms.empty(x:size(0), weight:size(0), {dtype = x:dtype()})
  C.check(lib.ms_linear(out._c, x._c, weight._c, bias and bias._c or nil), "linear")
  return out
end

local function operands(rows, inputs, outputs, dtype, seed)
  ms.manual_seed(seed)
  local x, weight = ms.randn(rows, inputs), ms.randn(outputs, inputs)
  local bias = ms.arange(outputs):to("f32") * 0.5 + ms.randn(outputs) -- distinct per column
  return x:to(dtype), weight:to(dtype), bias:to(dtype)
end

local function max_diff(a, b) return (a:to("f64") - b:to("f64")):abs():max():item() end

describe("ms_linear", function()
  -- 512 x 1536 is cut into column pieces, 2048 x 64 into row pieces, 7 x 3 is one piece
  for _, case in ipairs({{512, 512, 1536}, {2048, 256, 64}, {7, 5, 3}}) do
    local rows, inputs, outputs = unpack(case)
    it(("gives the composition's bits for [%d, %d] x [%d, %d]^T + bias at 1 and 2 threads"):format(
         rows, inputs, outputs, inputs), function()
      local x, weight, bias = operands(rows, inputs, outputs, "f32", 1)
      for _, threads in ipairs({1, 2}) do
        ms.set_num_threads(threads)
        local out = linear(x, weight, bias)
        assert.is_true(ms.equal(out, composed(x, weight, bias)), "threads " .. threads)
        local exact = x:to("f64"):matmul(weight:to("f64"):t()) + bias:to("f64")
        assert.is_true(max_diff(out, exact) < 1e-3 * math.sqrt(inputs), "against f64: " .. max_diff(out, exact))
      end
    end)
  end

  it("gives the composition's bits through OpenBLAS (MOONSHARD_SGEMM=openblas)", function()
    local code = [[
      local ms = require "moonshard"
      local C = require "moonshard.ffi"
      ms.manual_seed(2)
      local x, w, b = ms.randn(300, 128), ms.randn(200, 128), ms.randn(200)
      local out, ref = ms.empty(300, 200), ms.empty(300, 200)
      C.check(C.lib.ms_linear(out._c, x._c, w._c, b._c), "linear")
      C.check(C.lib.ms_copy(ref._c, b._c), "copy")
      C.check(C.lib.ms_matmul(ref._c, x._c, w._c, 0, 1, 1, 1), "matmul")
      io.write(tostring(ms.equal(out, ref)), " ", tostring((out - (x:matmul(w:t()) + b)):abs():max():item() < 1e-3))
    ]]
    local library = os.getenv("MOONSHARD_LIB")
    local pipe = io.popen(string.format("MOONSHARD_SGEMM=openblas %sLUA_PATH='lua/?.lua;lua/?/init.lua;;' luajit -e %q 2>&1",
                                        library and ("MOONSHARD_LIB=" .. library .. " ") or "", code))
    local text = pipe:read("*a")
    pipe:close()
    assert.are.equal("true true", text)
  end)

  it("copies the bias in first for a weight stored transposed, a strided bias, f64 and bf16", function()
    local x, weight, bias = operands(40, 24, 36, "f32", 3)
    local stored_transposed = weight:t():contiguous():t()
    assert.is_true(ms.equal(linear(x, stored_transposed, bias), composed(x, stored_transposed, bias)))
    local every_other = ms.randn(72):narrow(0, 0, 72):view(36, 2):select(1, 0)
    assert.are.same({2}, every_other:stride())
    assert.is_true(ms.equal(linear(x, weight, every_other), composed(x, weight, every_other)))
    for _, dtype in ipairs({"f64", "bf16"}) do
      local xd, wd, bd = x:to(dtype), weight:to(dtype), bias:to(dtype)
      assert.is_true(ms.equal(linear(xd, wd, bd), composed(xd, wd, bd)), dtype)
    end
  end)

  it("without a bias is the plain product, and with no inputs (k = 0) the broadcast bias", function()
    local x, weight, bias = operands(33, 17, 9, "f32", 4)
    assert.is_true(ms.equal(linear(x, weight, nil), x:matmul(weight:t())))
    local out = linear(ms.empty(5, 0), ms.empty(9, 0), bias)
    assert.is_true(ms.equal(out, bias:expand(5, 9)))
  end)

  it("F.linear and F.linear_gelu with no input features give the broadcast bias and its gradient", function()
    local bias = ms.randn(4):requires_grad_()
    local x, weight = ms.randn(2, 3, 0):requires_grad_(), ms.empty(4, 0):requires_grad_()
    local y = ms.nn.F.linear(x, weight, bias)
    assert.is_true(ms.equal(y, bias:detach():expand(2, 3, 4)))
    y:sum():backward()
    assert.are.same({2, 3, 0}, x.grad:shape())
    assert.are.same({4, 0}, weight.grad:shape())
    assert.is_true(ms.equal(bias.grad, ms.full({4}, 6)))
    local gelu_bias = ms.randn(4):requires_grad_()
    local z = ms.nn.F.linear_gelu(ms.randn(3, 0), ms.empty(4, 0), gelu_bias)
    assert.is_true(ms.equal(z, ms.nn.F.gelu(gelu_bias:detach()):expand(3, 4)))
  end)

  it("names a bias of the wrong length or dtype, operands that are not 2-D and an out sharing the bias's memory", function()
    local function fails(pattern, out, x, weight, bias)
      local status = lib.ms_linear(out._c, x._c, weight._c, bias and bias._c or nil)
      assert.is_true(status < 0, pattern)
      local message = require("ffi").string(lib.ms_last_error())
      assert.is_truthy(message:find(pattern, 1, true), message)
    end
    local x, weight = ms.randn(4, 3), ms.randn(5, 3)
    fails("linear: bias is [4]; expected [5] (weight's rows)", ms.empty(4, 5), x, weight, ms.randn(4))
    fails("linear: bias is [1, 5]; expected [5]", ms.empty(4, 5), x, weight, ms.randn(1, 5))
    fails("linear: bias", ms.empty(4, 5), x, weight, ms.randn(5, {dtype = "f64"}))
    fails("linear: out [2, 4, 5], x [2, 4, 3] and weight [5, 3] must be 2-D", ms.empty(2, 4, 5), ms.randn(2, 4, 3),
          weight, nil)
    fails("linear: out is [4, 6] but op(a) @ op(b) is [4, 5]", ms.empty(4, 6), x, weight, nil)
    local shared = ms.empty(5 * 5)
    fails("linear: out shares memory with bias", shared:narrow(0, 0, 20):view(4, 5), x, weight, shared:narrow(0, 15, 5))
  end)
end)
