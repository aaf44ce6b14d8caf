-- Results do not depend on the thread count: each op family, at sizes large enough to split
-- across the CPU worker pool (at least twice runtime/cpu's grain of element operations), gives bitwise the same values with 1 and 2 threads; a forked
-- rank makes its own workers; split element-wise results match an independent computation.
local ms = require "moonshard"
local F, optim, dist = ms.nn.F, ms.optim, ms.dist
local global_state = require "support.global_state"

-- fn() -> an array of `expected` tensors, run with 1 thread and with 2; every pair must be bitwise equal.
local function same_with_threads(expected, fn)
  local saved = ms.get_num_threads()
  local results = {}
  for i, threads in ipairs({1, 2}) do
    ms.set_num_threads(threads)
    ms.manual_seed(7)
    results[i] = fn()
  end
  ms.set_num_threads(saved)
  assert.are.equal(expected, #results[1])
  assert.are.equal(expected, #results[2])
  for k = 1, expected do
    local a, b = results[1][k], results[2][k]
    assert.are.same(a:shape(), b:shape())
    assert.is_true(ms.equal(a, b), "result " .. k .. " differs between 1 and 2 threads")
  end
end

-- A value with long, inexact float sums; a leaf that requires grad when the last argument
-- is {requires_grad = true}.
local function data(...)
  local args = {...}
  local grad = type(args[#args]) == "table" and table.remove(args).requires_grad
  local t = ms.randn(unpack(args)) * 1.37 + 0.1
  if grad then t:requires_grad_(true) end
  return t
end

before_each(global_state.save)
after_each(global_state.restore)

describe("threads", function()
  after_each(function() collectgarbage() end)

  it("can be set, read back and refused when below 1", function()
    local saved = ms.get_num_threads()
    assert.is_true(saved >= 1)
    ms.set_num_threads(2)
    assert.are.equal(2, ms.get_num_threads())
    assert.has_error(function() ms.set_num_threads(0) end)
    ms.set_num_threads(saved)
  end)

  -- What a fresh process (luajit with luajit_options) writes under an environment.
  local function count_in_fresh_process(env, code, luajit_options)
    local lib = os.getenv("MOONSHARD_LIB")
    local command = string.format("%s %sLUA_PATH='lua/?.lua;lua/?/init.lua;;' luajit %s -e %q 2>&1",
                                  env, lib and ("MOONSHARD_LIB=" .. lib .. " ") or "", luajit_options or "",
                                  "local ms = require 'moonshard' " .. code)
    local pipe = io.popen(command)
    local text = pipe:read("*a")
    pipe:close()
    return text
  end

  local function cores()
    local pipe = io.popen("nproc")
    local n = tonumber(pipe:read("*l"))
    pipe:close()
    return n
  end

  it("defaults to the usable cores, shared by local ranks; MOONSHARD_NUM_THREADS overrides", function()
    local n = cores()
    assert.are.equal(tostring(n), count_in_fresh_process("env -u MOONSHARD_NUM_THREADS",
                                                         "io.write(ms.get_num_threads())"))
    assert.are.equal("3", count_in_fresh_process("MOONSHARD_NUM_THREADS=3", "io.write(ms.get_num_threads())"))
    local per_rank = "local r = ms.dist.spawn(2, function() return ms.get_num_threads() end) " ..
                     "io.write(r[1], ',', r[2])"
    local share = math.max(1, math.floor(n / 2))
    assert.are.equal(share .. "," .. share, count_in_fresh_process("env -u MOONSHARD_NUM_THREADS", per_rank))
    assert.are.equal("5,5", count_in_fresh_process("MOONSHARD_NUM_THREADS=5", per_rank))
    -- not a whole number >= 1: ignored, and said once on stderr (also by ranks' parents only)
    assert.are.equal("moonshard: ignoring MOONSHARD_NUM_THREADS=zero (not a whole number from 1 to 4096)\n" .. n,
                     count_in_fresh_process("MOONSHARD_NUM_THREADS=zero", "io.write(ms.get_num_threads())"))
    assert.are.equal("moonshard: ignoring MOONSHARD_NUM_THREADS=0 (not a whole number from 1 to 4096)\n" ..
                     share .. "," .. share, count_in_fresh_process("MOONSHARD_NUM_THREADS=0", per_rank))
  end)

  it("refuses an f32 GEMM when MOONSHARD_SGEMM names no path, saying what it holds", function()
    local code = "local ok, err = pcall(ms.matmul, ms.randn(300, 300), ms.randn(300, 300)) " ..
                 "io.write(tostring(ok), ' ', tostring(err))"
    assert.are.equal("false moonshard: matmul: MOONSHARD_SGEMM is 'blas'; expected onednn or openblas " ..
                     "(or unset, to choose by the CPU)", count_in_fresh_process("MOONSHARD_SGEMM=blas", code))
    assert.are.equal("true nil", count_in_fresh_process("MOONSHARD_SGEMM=openblas",
                                                        "local ok = pcall(ms.matmul, ms.randn(300, 300), " ..
                                                        "ms.randn(300, 300)) io.write(tostring(ok), ' nil')"))
  end)

  it("BLAS's idle threads sleep at once (OPENBLAS_THREAD_TIMEOUT 4 when OpenBLAS loads) unless the user set it",
     function()
    local read = "io.write(os.getenv('OPENBLAS_THREAD_TIMEOUT'))"
    assert.are.equal("4", count_in_fresh_process("env -u OPENBLAS_THREAD_TIMEOUT", read))
    assert.are.equal("20", count_in_fresh_process("OPENBLAS_THREAD_TIMEOUT=20", read))
  end)

  it("split element-wise results match the element-by-element values", function()
    ms.set_num_threads(2)
    local a, b = ms.randn(1024, 1100), ms.randn(1100)
    local out = (a + b):table()
    local ta, tb = a:table(), b:table()
    ms.set_num_threads(1)
    for i = 1, 1024, 37 do
      for j = 1, 1100, 13 do
        -- f32 sum of two f32 values, rounded once: the same as rounding the double sum
        local expect = ms.tensor({ta[i][j] + tb[j]}):item()
        assert.are.equal(expect, out[i][j])
      end
    end
  end)

  it("element-wise ops, broadcasts and transposed reads", function()
    same_with_threads(7, function()
      local a, b, c = data(1024, 1024), data(1024), data(1024, 1024)
      return {a + b, a * c:transpose(0, 1), F.gelu(a), a:exp(), (a - 2):relu(), a / 3,
              c:transpose(0, 1):contiguous()}
    end)
  end)

  it("activation backward", function()
    same_with_threads(2, function()
      local x = data(512, 512, {requires_grad = true})
      F.gelu(x):sum():backward()
      local y = data(512, 512, {requires_grad = true})
      y:tanh():sum():backward()
      return {x.grad, y.grad}
    end)
  end)

  it("reductions over each dim, all dims, max along a dim", function()
    same_with_threads(8, function()
      local a = data(1024, 1024)
      local values, indices = a:max(1)
      return {a:sum(0), a:sum(1), a:mean(0), a:sum(), ms.tensor({a:sum():item()}), values, indices,
              a:transpose(0, 1):sum(1)}
    end)
  end)

  it("softmax and log_softmax, forward and backward", function()
    same_with_threads(3, function()
      local x = data(64, 16, 128, {requires_grad = true})
      local w = data(64, 16, 128)
      local y = F.softmax(x, -1)
      local z = F.log_softmax(x, 1)
      local loss = (y * w):sum() + (z * w):sum()
      loss:backward()
      return {y, z, x.grad}
    end)
  end)

  -- oneDNN's path (AVX-512 CPUs; MOONSHARD_SGEMM=onednn forces it on any CPU) cuts a GEMM by
  -- its shape alone; OpenBLAS's (the other CPUs) splits by its thread count.
  it("f32 and bf16 matmul and linear on oneDNN's path, forward and backward (GEMMs cut into pieces)", function()
    local code = [[
      local F = ms.nn.F
      local function data(...) return ms.randn(...) * 1.37 + 0.1 end
      local function run(threads)
        ms.set_num_threads(threads)
        ms.manual_seed(7)
        local x, w, bias = data(300, 520):requires_grad_(true), data(700, 520):requires_grad_(true),
                           data(700):requires_grad_(true)
        local q, k = data(4, 200, 96), data(4, 200, 96)
        local y = F.linear(x, w, bias)
        local scores = ms.matmul(q, k:transpose(1, 2))
        local loss = (y * data(300, 700)):sum()
        loss:backward()
        local xh, wh = x:detach():to("bf16"), w:detach():to("bf16")
        return {y, scores, x.grad, w.grad, bias.grad, F.linear(xh, wh), ms.matmul(wh, xh:t()),
                ms.matmul(x:detach():t(), data(300, 900)), ms.matmul(data(1000, 64), data(64, 333))}
      end
      local one, two = run(1), run(2)
      local same = 0
      for i = 1, #one do if ms.equal(one[i], two[i]) then same = same + 1 end end
      io.write(same, " of ", #one, " alike")
    ]]
    assert.are.equal("9 of 9 alike", count_in_fresh_process("MOONSHARD_SGEMM=onednn", code))
  end)

  -- oneDNN's AVX-512 sgemm keeps data below the stack pointer, where a signal handler's frame
  -- goes: without its signals held, this run aborted on a corrupt heap within 0.1 s here.
  it("GEMMs and attention on oneDNN's path survive a 1 ms profiling signal (LuaJIT's -jp)", function()
    local code = [[
      local F = ms.nn.F
      local a, b = ms.randn(512, 512), ms.randn(512, 2048)
      local q = ms.randn(8, 8, 64, 64):requires_grad_(true)
      for _ = 1, 60 do
        ms.matmul(a, b):free()
        ms.matmul(b:t(), a):free()
        F.scaled_dot_product_attention(q, q, q, {is_causal = true}):sum():backward()
        q.grad = nil
      end
      io.write("done")
    ]]
    assert.are.equal("done", count_in_fresh_process("MOONSHARD_SGEMM=onednn", code, "-jp=f,/dev/null"))
  end)

  it("layer norm with weight and bias gradients", function()
    same_with_threads(4, function()
      local x = data(2048, 512, {requires_grad = true})
      local w = data(512, {requires_grad = true})
      local b = data(512, {requires_grad = true})
      local y = F.layer_norm(x, {512}, w, b)
      local loss = (y * data(2048, 512)):sum()
      loss:backward()
      return {y, x.grad, w.grad, b.grad}
    end)
  end)

  it("embedding with repeated indices, forward and backward", function()
    same_with_threads(2, function()
      local weight = data(50, 512, {requires_grad = true})
      local indices = ms.randint(0, 50, {16, 128}, {dtype = "i64"})
      local out = F.embedding(indices, weight)
      local loss = (out * data(16, 128, 512)):sum()
      loss:backward()
      return {out, weight.grad}
    end)
  end)

  it("optimizer steps", function()
    same_with_threads(2, function()
      local p1, p2 = data(400, 400, {requires_grad = true}), data(800, 800, {requires_grad = true})
      local adam = optim.AdamW({p1}, {lr = 0.01, weight_decay = 0.1})
      local sgd = optim.SGD({p2}, {lr = 0.01, momentum = 0.9})
      for _ = 1, 2 do
        adam:zero_grad(); sgd:zero_grad()
        local loss = (p1 * p1):sum() + (p2 * p2 * p2):sum()
        loss:backward()
        adam:step(); sgd:step()
      end
      return {p1, p2}
    end)
  end)

  it("copies, dtype conversions and fills", function()
    same_with_threads(5, function()
      local a = data(1024, 1024)
      return {a:clone(), a:to("f64"), ms.full({1024, 1024}, 2.5),
              a:to("bf16"), a:narrow(1, 3, 1000):contiguous()}
    end)
  end)

  it("a forked rank makes its own workers after the parent used them", function()
    ms.set_num_threads(2)
    local a = data(1024, 1024)
    local expect = (a:exp() + 1):sum(1) -- the parent's workers run this
    local results = dist.spawn(1, function()
      ms.set_num_threads(2)
      local got = (a:exp() + 1):sum(1)
      return {equal = ms.equal(got, expect), threads = ms.get_num_threads()}
    end)
    assert.is_true(results[1].equal)
    assert.are.equal(2, results[1].threads)
  end)
end)
