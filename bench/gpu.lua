-- GPU throughput: cuBLAS GEMM TFLOP/s, memory bandwidth of the element-wise, row-wise and
-- optimizer kernels, and nccl collectives (algbw and busbw as nccl-tests define them).
-- Prints JSON lines; on a machine without a GPU prints one line saying why and exits 0.
-- Usage (repository root): luajit bench/gpu.lua [--only gemm,kernels,collectives]
--   [--ranks N] [--max-bytes 268435456] [--repeats 20] [--quick]
-- --device host --quick runs every part on the host pool, the collectives on the local
-- backend: a dry run of the script on a machine without a GPU (the figures are then CPU
-- figures).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ffi = require "ffi"
local ms = require "moonshard"
local dist = ms.dist
local lib = require("moonshard.ffi").lib

local now = require("bench.support").now

local function parse_args(argv)
  local opts = {only = {gemm = true, kernels = true, collectives = true}, repeats = 20,
                max_bytes = 256 * 2 ^ 20, device = "cuda:0", sizes = {1024, 2048, 4096, 8192},
                elements = 64 * 2 ^ 20}
  local i = 1
  while i <= #argv do
    local a, v = argv[i], argv[i + 1]
    if a == "--only" then
      opts.only = {}
      for item in v:gmatch("[^,]+") do opts.only[item] = true end
    elseif a == "--ranks" then opts.ranks = tonumber(v)
    elseif a == "--max-bytes" then opts.max_bytes = tonumber(v)
    elseif a == "--repeats" then opts.repeats = tonumber(v)
    elseif a == "--device" then opts.device = v
    elseif a == "--quick" then
      opts.sizes, opts.elements, opts.repeats, opts.max_bytes = {256}, 2 ^ 20, 2, 2 ^ 20
      i = i - 1
    else error("gpu.lua: unknown argument " .. a) end
    i = i + 2
  end
  return opts
end

local function json(fields)
  local parts = {}
  for _, kv in ipairs(fields) do
    local k, v = kv[1], kv[2]
    local text = type(v) == "string" and string.format("%q", v)
                 or (v % 1 == 0 and math.abs(v) < 2 ^ 53) and string.format("%d", v)
                 or string.format("%.6g", v)
    parts[#parts + 1] = string.format("%q: %s", k, text)
  end
  print("{" .. table.concat(parts, ", ") .. "}")
end

local function sync(device)
  local index = tonumber(tostring(device):match("^cuda:(%d+)$"))
  if index then assert(lib.ms_cuda_synchronize(index) == 0, ffi.string(lib.ms_last_error())) end
end

-- Seconds per call of fn on device, after one warm-up call; fn's temporaries are released.
local function time_of(fn, repeats, device)
  ms.scope(fn)
  sync(device)
  local start = now()
  for _ = 1, repeats do ms.scope(fn) end
  sync(device)
  return (now() - start) / repeats
end

local function bench_gemm(opts)
  for _, dtype in ipairs({"f32", "f64"}) do
    for _, n in ipairs(opts.sizes) do
      local a = ms.keep(ms.randn(n, n, {dtype = dtype, device = opts.device}))
      local b = ms.keep(ms.randn(n, n, {dtype = dtype, device = opts.device}))
      local seconds = time_of(function() a:matmul(b) end, opts.repeats, opts.device)
      json({{"bench", "gemm"}, {"dtype", dtype}, {"m", n}, {"n", n}, {"k", n},
            {"seconds", seconds}, {"tflops", 2 * n ^ 3 / seconds / 1e12}})
      a:_release()
      b:_release()
    end
  end
end

-- Bytes each kernel reads plus writes, per element of its input.
local KERNELS = {
  {"add", 12, function(x, y) return x + y end},
  {"gelu", 8, function(x) return ms.nn.F.gelu(x) end},
  {"softmax", 8, function(x) return x:view(-1, 1024):softmax(1) end},
  {"layer_norm", 8, function(x) return ms.nn.F.layer_norm(x:view(-1, 1024), {1024}) end},
  {"sum", 4, function(x) return x:sum() end},
}

local function bench_kernels(opts)
  local n, device = opts.elements, opts.device
  local x = ms.keep(ms.randn(n, {device = device}))
  local y = ms.keep(ms.randn(n, {device = device}))
  for _, kernel in ipairs(KERNELS) do
    local name, bytes_per, fn = kernel[1], kernel[2], kernel[3]
    local seconds = time_of(function() fn(x, y) end, opts.repeats, device)
    json({{"bench", "kernel"}, {"kernel", name}, {"elements", n}, {"seconds", seconds},
          {"gbps", bytes_per * n / seconds / 1e9}})
  end
  -- Adam reads param, grad, m, v and writes param, m, v: 28 bytes per f32 element.
  local param = ms.keep(ms.randn(n, {device = device}))
  param:requires_grad_()
  param.grad = ms.keep(ms.randn(n, {device = device}))
  local opt = ms.optim.AdamW({param}, {lr = 1e-3})
  local seconds = time_of(function() opt:step() end, opts.repeats, device)
  json({{"bench", "kernel"}, {"kernel", "adamw_step"}, {"elements", n}, {"seconds", seconds},
        {"gbps", 28 * n / seconds / 1e9}})
end

-- nccl-tests: bytes is the larger buffer; busbw scales algbw to what each link carries.
local BUS_FACTOR = {
  all_reduce = function(r) return 2 * (r - 1) / r end,
  all_gather = function(r) return (r - 1) / r end,
  reduce_scatter = function(r) return (r - 1) / r end,
  broadcast = function() return 1 end,
}

-- One rank per GPU on nccl; with --device host two ranks on the local backend (a dry run).
-- Runs before anything else touches a device: ranks that use CUDA cannot be forked from a
-- process where CUDA has started.
local function bench_collectives(opts, devices)
  local dry_run = opts.device == "host"
  local ranks = opts.ranks or (dry_run and 2 or devices)
  if ranks < 2 then
    json({{"bench", "collectives"}, {"skipped", "needs 2 GPUs, found " .. devices}})
    return
  end
  local backend = dry_run and "local" or "nccl"
  local lines = dist.spawn(ranks, function(rank, size)
    dist.init_process_group(backend) -- the world's own "local" keeps it as it is
    local device, out = dry_run and "host" or "cuda:" .. rank, {}
    local bytes = 1024
    while bytes <= opts.max_bytes do
      local part_count = math.floor(bytes / 4 / size)
      local count = part_count * size
      local big = ms.keep(ms.zeros(count, {device = device}))
      local part = ms.keep(ms.zeros(part_count, {device = device}))
      local calls = {
        all_reduce = function() dist.all_reduce(big, "sum") end,
        all_gather = function() dist.all_gather_into_tensor(big, part) end,
        reduce_scatter = function() dist.reduce_scatter_tensor(part, big, "sum") end,
        broadcast = function() dist.broadcast(big, 0) end,
      }
      for _, op in ipairs({"all_reduce", "all_gather", "reduce_scatter", "broadcast"}) do
        local seconds = time_of(calls[op], opts.repeats, device)
        local algbw = count * 4 / seconds / 1e9
        out[#out + 1] = {op, count * 4, seconds, algbw, algbw * BUS_FACTOR[op](size)}
      end
      big:_release()
      part:_release()
      bytes = bytes * 4
    end
    dist.destroy_process_group()
    return out
  end)
  for _, row in ipairs(lines[1]) do
    json({{"bench", "collective"}, {"backend", backend}, {"op", row[1]}, {"ranks", ranks},
          {"bytes", row[2]}, {"seconds", row[3]}, {"algbw_gbps", row[4]},
          {"busbw_gbps", row[5]}})
  end
end

local opts = parse_args(arg)
local count = ffi.new("int[1]")
assert(lib.ms_cuda_device_count(count) == 0)
if count[0] == 0 and opts.device ~= "host" then
  json({{"bench", "gpu"}, {"skipped", ffi.string(lib.ms_cuda_unavailable_reason())}})
  return
end
if opts.only.collectives then bench_collectives(opts, count[0]) end
if opts.only.gemm then bench_gemm(opts) end
if opts.only.kernels then bench_kernels(opts) end
