-- Benchmarks the op layer: f32 GEMM GFLOP/s through ms.matmul (oneDNN on the worker pool) next
-- to OpenBLAS's cblas_sgemm called directly at the same thread count, bf16 and f16 GEMM against f32 GEMM of the
-- same shapes, the fused transformer hot paths (linear_gelu, add_layer_norm) against their
-- unfused compositions, and the dispatch cost of a small op with autograd on. Prints JSON lines.
-- Usage (repository root, after a build): luajit bench/ops.lua [--quick]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local lib = require("moonshard.ffi").lib
local support = require "bench.support"

local quick = arg[1] == "--quick"

-- The direct call goes through libmoonshard's own OpenBLAS (same instance, same thread count):
-- ms.matmul must be at least as fast as the plain BLAS call it replaced (target 0.95).
ffi.cdef [[
void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
]]
local CblasRowMajor, CblasNoTrans = 101, 111
local now, cpu_now, emit = support.now, support.thread_cpu, support.emit

-- Best times of fns[i] over reps rounds after one warm-up; the calls alternate within each
-- round so that load from other processes hits both sides alike.
local function best_interleaved(reps, fns)
  local best = {}
  for i, fn in ipairs(fns) do fn(); best[i] = math.huge end
  for _ = 1, reps do
    for i, fn in ipairs(fns) do
      local start = now()
      fn()
      best[i] = math.min(best[i], now() - start)
    end
  end
  return best
end

local shapes = {{256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}, {2048, 2048, 2048}, {4096, 1024, 1024}}
if quick then shapes = {{256, 256, 256}, {512, 512, 512}} end
local threads = ms.get_num_threads()

ms.manual_seed(0)
for _, s in ipairs(shapes) do
  local m, k, n = s[1], s[2], s[3]
  local a, b = ms.randn(m, k), ms.randn(k, n)
  local c = ms.empty(m, n)
  local flops = 2 * m * n * k
  local reps = math.max(7, math.floor(6e10 / flops))
  local pa = ffi.cast("float*", a:data_ptr())
  local pb = ffi.cast("float*", b:data_ptr())
  local pc = ffi.cast("float*", c:data_ptr())
  local best = best_interleaved(reps, {
    function() ms.matmul(a, b):free() end,
    function() lib.cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1, pa, k, pb, n, 0, pc, n) end,
  })
  local ratio = best[2] / best[1]
  emit({bench = "gemm", m = m, k = k, n = n, threads = threads, reps = reps,
        moonshard_gflops = flops / best[1] / 1e9, openblas_gflops = flops / best[2] / 1e9,
        ratio = ratio, target = 0.95, met = ratio >= 0.95},
       {"bench", "m", "k", "n", "threads", "reps", "moonshard_gflops", "openblas_gflops", "ratio",
        "target", "met"})
  a:free(); b:free(); c:free()
end

-- 16-bit GEMM (f32 tiles converted from bf16/f16, sgemm on them) against f32 GEMM through
-- ms.matmul, interleaved in the same rounds; plain and with b transposed (a linear layer).
local half_shapes = {{256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}, {2048, 2048, 2048}}
if quick then half_shapes = {{256, 256, 256}, {512, 512, 512}} end
for _, s in ipairs(half_shapes) do
  local m, k, n = s[1], s[2], s[3]
  local flops = 2 * m * n * k
  local reps = math.max(5, math.floor(3e10 / flops))
  for _, trans_b in ipairs({false, true}) do
    local a32 = ms.randn(m, k)
    local b32 = trans_b and ms.randn(n, k) or ms.randn(k, n)
    local fns, halves = {}, {"bf16", "f16"}
    local function product(a, b) return trans_b and ms.nn.F.linear(a, b) or ms.matmul(a, b) end
    fns[1] = function() product(a32, b32):free() end
    for i, dtype in ipairs(halves) do
      local a, b = a32:to(dtype), b32:to(dtype)
      fns[i + 1] = function() product(a, b):free() end
    end
    local best = best_interleaved(reps, fns)
    for i, dtype in ipairs(halves) do
      emit({bench = "gemm_16bit", dtype = dtype, b = trans_b and "transposed" or "plain", m = m,
            k = k, n = n, threads = threads, reps = reps, gflops = flops / best[i + 1] / 1e9,
            f32_gflops = flops / best[1] / 1e9, ratio = best[1] / best[i + 1]},
           {"bench", "dtype", "b", "m", "k", "n", "threads", "reps", "gflops", "f32_gflops",
            "ratio"})
    end
  end
end

-- Fused against unfused, forward + backward: Linear -> GELU at bench/fsdp.lua's transformer
-- MLP shape (512 rows, 512 -> 2048) and residual add + LayerNorm at its LN shape (512 rows of
-- 512). The two run in alternating order pair after pair, on one thread, timed in thread CPU
-- time (which load from other processes does not inflate) and wall time; medians of the
-- pairs, the speedup's range.
local function median(samples)
  local sorted = {}
  for i, v in ipairs(samples) do sorted[i] = v end
  table.sort(sorted)
  local n = #sorted
  return n % 2 == 1 and sorted[(n + 1) / 2] or (sorted[n / 2] + sorted[n / 2 + 1]) / 2
end

local function timed_pairs(pairs, fused, unfused)
  fused(); unfused()
  local cpu = {fused = {}, unfused = {}}
  local wall = {fused = {}, unfused = {}}
  local ratios = {}
  for i = 1, pairs do
    local order = i % 2 == 1 and {"fused", "unfused"} or {"unfused", "fused"}
    for _, side in ipairs(order) do
      local fn = side == "fused" and fused or unfused
      local w, c = now(), cpu_now()
      fn()
      cpu[side][i], wall[side][i] = cpu_now() - c, now() - w
    end
    ratios[i] = cpu.unfused[i] / cpu.fused[i]
  end
  return {fused_cpu_ms = median(cpu.fused) * 1e3, unfused_cpu_ms = median(cpu.unfused) * 1e3,
          speedup = median(ratios), speedup_min = math.min(unpack(ratios)), speedup_max = math.max(unpack(ratios)),
          fused_wall_ms = median(wall.fused) * 1e3, unfused_wall_ms = median(wall.unfused) * 1e3}
end

local function release(list) for _, t in ipairs(list) do t:free() end end
local fused_order = {"bench", "rows", "cols", "pairs", "threads", "fused_cpu_ms", "unfused_cpu_ms", "speedup",
                     "speedup_min", "speedup_max", "fused_wall_ms", "unfused_wall_ms"}
local fused_pairs = quick and 5 or 15
ms.set_num_threads(1)
do
  local rows, d_in, d_out = 512, 512, 2048
  local x = ms.randn(rows, d_in, {requires_grad = true})
  local w = (ms.randn(d_out, d_in) * 0.04):requires_grad_()
  local b = (ms.randn(d_out) * 0.1):requires_grad_()
  local gy = ms.randn(rows, d_out)
  local F = ms.nn.F
  local function run(forward)
    local y = forward()
    local grads = ms.autograd.grad({y}, {x, w, b}, {gy})
    y:free()
    release(grads)
  end
  local result = timed_pairs(fused_pairs, function() run(function() return F.linear_gelu(x, w, b) end) end,
                             function() run(function() return F.gelu(F.linear(x, w, b)) end) end)
  result.bench, result.rows, result.cols, result.pairs, result.threads = "linear_gelu_fwd_bwd", rows, d_out, fused_pairs, 1
  emit(result, fused_order)
end
do
  local rows, dim = 512, 512
  local x, r = ms.randn(rows, dim, {requires_grad = true}), ms.randn(rows, dim, {requires_grad = true})
  local w, b = ms.ones(dim, {requires_grad = true}), ms.zeros(dim, {requires_grad = true})
  local gs, gy = ms.randn(rows, dim), ms.randn(rows, dim)
  local F = ms.nn.F
  local function run(forward)
    local s, y = forward()
    local grads = ms.autograd.grad({s, y}, {x, r, w, b}, {gs, gy})
    s:free(); y:free()
    release(grads)
  end
  local result = timed_pairs(fused_pairs * 4, function()
    run(function() return F.add_layer_norm(x, r, dim, w, b) end)
  end, function()
    run(function()
      local s = x + r
      return s, F.layer_norm(s, dim, w, b)
    end)
  end)
  result.bench, result.rows, result.cols, result.pairs, result.threads = "add_layer_norm_fwd_bwd", rows, dim,
                                                                          fused_pairs * 4, 1
  emit(result, fused_order)
end
ms.set_num_threads(threads)

-- Dispatch: a 3x3 add with autograd on (both inputs require grad, so a node is recorded).
-- Each round ends with a full collection, so finalizing the temporaries is part of the cost;
-- a collection alone is measured and subtracted. Wall time is what a user waits; thread CPU
-- time leaves out waiting for a core that other processes hold. Rounds are short (a few
-- scheduler slices) so that the best one on a shared machine is an undisturbed one.
local x = ms.randn(3, 3, {requires_grad = true})
local y = ms.randn(3, 3, {requires_grad = true})
local iterations, rounds = 20000, quick and 5 or 40
local function adds()
  for _ = 1, iterations do local _ = x + y end
  collectgarbage()
end
local function collect_only() collectgarbage() end
adds()
local best_wall, best_cpu, base_wall, base_cpu = math.huge, math.huge, math.huge, math.huge
for _ = 1, rounds do
  local wall, cpu = now(), cpu_now()
  adds()
  best_wall, best_cpu = math.min(best_wall, now() - wall), math.min(best_cpu, cpu_now() - cpu)
  wall, cpu = now(), cpu_now()
  collect_only()
  base_wall, base_cpu = math.min(base_wall, now() - wall), math.min(base_cpu, cpu_now() - cpu)
end
local ns = (best_wall - base_wall) / iterations * 1e9
local cpu_ns = (best_cpu - base_cpu) / iterations * 1e9
emit({bench = "dispatch_add_3x3_autograd", iterations = iterations, rounds = rounds, ns_per_op = ns,
      cpu_ns_per_op = cpu_ns, target_ns = 500, met = ns < 500},
     {"bench", "iterations", "rounds", "ns_per_op", "cpu_ns_per_op", "target_ns", "met"})
