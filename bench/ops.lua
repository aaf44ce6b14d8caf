-- Benchmarks the op layer: GEMM GFLOP/s through ms.matmul next to the same OpenBLAS call
-- made directly, and the dispatch overhead of a small op with autograd on. JSON lines.
-- Usage (repository root, after a build): luajit bench/ops.lua [--quick]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"

local quick = arg[1] == "--quick"

ffi.cdef [[
void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
]]
local blas = ffi.load("openblas")
local CblasRowMajor, CblasNoTrans = 101, 111

local function now()
  local t = ffi.new("struct { long sec; long nsec; }")
  ffi.C.clock_gettime(1, ffi.cast("void*", t))
  return tonumber(t.sec) + tonumber(t.nsec) * 1e-9
end
ffi.cdef "int clock_gettime(int clock, void *ts);"

-- Best time of reps runs of fn after one warm-up.
local function best_of(reps, fn)
  fn()
  local best = math.huge
  for _ = 1, reps do
    local start = now()
    fn()
    best = math.min(best, now() - start)
  end
  return best
end

local function emit(fields)
  local parts = {}
  for _, key in ipairs(fields.__order) do
    local v = fields[key]
    parts[#parts + 1] = string.format("%q:%s", key, type(v) == "string" and string.format("%q", v) or
                                      string.format("%.6g", v))
  end
  print("{" .. table.concat(parts, ",") .. "}")
end

local shapes = {{256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}, {2048, 2048, 2048}, {4096, 1024, 1024}}
if quick then shapes = {{256, 256, 256}, {512, 512, 512}} end

ms.manual_seed(0)
for _, s in ipairs(shapes) do
  local m, k, n = s[1], s[2], s[3]
  local a, b = ms.randn(m, k), ms.randn(k, n)
  local c = ms.empty(m, n)
  local flops = 2 * m * n * k
  local reps = math.max(3, math.floor(2e10 / flops))
  local t_ms = best_of(reps, function() ms.matmul(a, b):free() end)
  local pa = ffi.cast("float*", a:data_ptr())
  local pb = ffi.cast("float*", b:data_ptr())
  local pc = ffi.cast("float*", c:data_ptr())
  local t_blas = best_of(reps, function()
    blas.cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1, pa, k, pb, n, 0, pc, n)
  end)
  emit({__order = {"bench", "m", "k", "n", "moonshard_gflops", "openblas_gflops", "ratio"},
        bench = "gemm", m = m, k = k, n = n, moonshard_gflops = flops / t_ms / 1e9,
        openblas_gflops = flops / t_blas / 1e9, ratio = t_blas / t_ms})
end

-- Dispatch: a 3x3 add with autograd on (both inputs require grad, so a node is recorded).
local x = ms.randn(3, 3, {requires_grad = true})
local y = ms.randn(3, 3, {requires_grad = true})
local iterations = quick and 20000 or 200000
local function adds()
  for _ = 1, iterations do local _ = x + y end
end
local t_add = best_of(3, function() adds(); collectgarbage() end)
local t_gc = best_of(3, function() collectgarbage() end)
emit({__order = {"bench", "iterations", "ns_per_op"}, bench = "dispatch_add_3x3_autograd",
      iterations = iterations, ns_per_op = (t_add - t_gc) / iterations * 1e9})
