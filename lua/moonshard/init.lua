-- moonshard: fully sharded training on a C runtime. `local ms = require "moonshard"`.
-- This module assembles the namespace: tensors and their methods, autograd, memory.

-- LuaJIT keeps compiled traces in at most maxmcode KiB of machine code (512 by default) and
-- maxtrace traces (1000). A model's forward, backward and optimizer step through moonshard's
-- op path need more: once the area is full LuaJIT flushes every trace and compiles them
-- again, over and over (a small transformer's training loop flushed every 6 steps). Raised
-- before anything is compiled; a program that wants other limits sets them after this.
require("jit").opt.start("maxmcode=8192", "maxtrace=8000")

local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local random = require "moonshard.random"
local scope = require "moonshard.scope"
local handles = require "moonshard.handles"
local raw = require "moonshard.ops.raw"
local pointwise = require "moonshard.ops.pointwise"
local shape_ops = require "moonshard.ops.shape"
local reduce = require "moonshard.ops.reduce"
local linalg = require "moonshard.ops.linalg"
local nn_ops = require "moonshard.ops.nn"
local inplace = require "moonshard.ops.inplace"

local lib, check, fail = C.lib, C.check, C.fail

local ms = {}
ms.Tensor = Tensor
ms.__version__ = require "moonshard.version"

-- ---- tensor methods ----

for _, family in ipairs({pointwise, shape_ops, reduce, linalg, inplace}) do
  for name, fn in pairs(family) do
    if type(fn) == "function" and Tensor[name] == nil then Tensor[name] = fn end
  end
end
for _, name in ipairs({"softmax", "log_softmax", "dropout"}) do Tensor[name] = nn_ops[name] end

Tensor.__add = pointwise.add
Tensor.__sub = pointwise.sub
Tensor.__mul = pointwise.mul
Tensor.__div = pointwise.div
Tensor.__pow = pointwise.pow
Tensor.__unm = pointwise.neg

function Tensor:backward(grad, opts)
  if grad ~= nil and not Tensor.is_tensor(grad) and type(grad) == "table" and opts == nil then
    opts, grad = grad, nil
  end
  autograd.backward({self}, {grad}, opts)
end

local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}

function Tensor:requires_grad_(flag)
  if flag == nil then flag = true end
  if flag and not FLOATING[self:dtype()] then
    fail("requires_grad_", "only floating-point tensors can require grad, this one is %s", self:dtype())
  end
  if not flag and self.grad_fn then
    fail("requires_grad_", "cannot turn off requires_grad of a non-leaf tensor (use detach)")
  end
  self.requires_grad = flag or nil
  return self
end

function Tensor:register_hook(fn) return autograd.register_hook(self, fn) end
function Tensor:register_post_accumulate_grad_hook(fn)
  return autograd.register_post_accumulate_grad_hook(self, fn)
end

-- A non-leaf keeps its gradient in .grad from now on, accumulating over backward passes as a
-- leaf's does (retains_grad is then true); a leaf always does. Calling it again changes nothing.
function Tensor:retain_grad()
  if self.grad_fn == nil or rawget(self, "retains_grad") then return self end
  self.retains_grad = true
  autograd.register_hook(self, function(g)
    local existing = rawget(self, "grad")
    if existing ~= nil then
      check(lib.ms_binary(existing._c, existing._c, g._c, lib.MS_ADD), "retain_grad")
      existing:_bump_version()
    else
      self.grad = scope.keep(raw.copy(g))
    end
  end)
  return self
end

function Tensor:float() return self:to("f32") end
function Tensor:double() return self:to("f64") end

-- Release the tensor's storage reference now instead of at collection.
function Tensor:free() self:_release() end

-- ---- namespace ----

for _, family in ipairs({pointwise, shape_ops, reduce, linalg}) do
  for name, fn in pairs(family) do ms[name] = fn end
end
for _, name in ipairs({"empty", "zeros", "ones", "full", "arange"}) do ms[name] = Tensor[name] end
ms.tensor = Tensor.from_table
ms.is_tensor = Tensor.is_tensor
ms.Size = Tensor.Size
ms.set_default_dtype, ms.get_default_dtype = Tensor.set_default_dtype, Tensor.get_default_dtype

local function check_like(name, t, opts)
  if not Tensor.is_tensor(t) then fail(name, "expected a tensor, got %s", type(t)) end
  if opts ~= nil and type(opts) ~= "table" then fail(name, "options must be a table, got %s", type(opts)) end
end

local function like(name, maker)
  return function(t, opts)
    check_like(name, t, opts)
    opts = opts or {}
    return maker(t:shape(), {dtype = opts.dtype or t:dtype(), device = opts.device or t:device(),
                             requires_grad = opts.requires_grad})
  end
end
ms.zeros_like = like("zeros_like", Tensor.zeros)
ms.ones_like = like("ones_like", Tensor.ones)
ms.empty_like = like("empty_like", Tensor.empty)
ms.rand_like = like("rand_like", random.rand)
ms.randn_like = like("randn_like", random.randn)
function ms.full_like(t, value, opts)
  check_like("full_like", t, opts)
  opts = opts or {}
  return Tensor.full(t:shape(), value, {dtype = opts.dtype or t:dtype(), device = opts.device or t:device()})
end

ms.manual_seed = random.manual_seed
ms.device = Tensor.with_device -- ms.device("meta", function() return Model() end)
ms.get_rng_state, ms.set_rng_state = random.get_rng_state, random.set_rng_state
ms.rand, ms.randn, ms.randint = random.rand, random.randn, random.randint

ms.no_grad = autograd.no_grad
ms.enable_grad = autograd.enable_grad
ms.is_grad_enabled = autograd.is_grad_enabled
ms.set_grad_enabled = autograd.set_grad_enabled
ms.autograd = autograd
ms.keep = scope.keep
-- ms.scope(fn, ...): fn's results escape, every other tensor it made is released on return.
ms.scope = scope.run
-- Seconds on the monotonic clock, for timing.
function ms.clock() return lib.ms_clock_seconds() end

local flag = ffi.new("int[1]")

function ms.equal(a, b)
  if not Tensor.is_tensor(a) or not Tensor.is_tensor(b) then fail("equal", "expected two tensors") end
  check(lib.ms_equal(flag, a._c, b._c), "equal")
  return flag[0] == 1
end

function ms.allclose(a, b, opts)
  opts = opts or {}
  if not Tensor.is_tensor(a) or not Tensor.is_tensor(b) then fail("allclose", "expected two tensors") end
  local rtol, atol = opts.rtol or 1e-5, opts.atol or 1e-8
  if type(rtol) ~= "number" or type(atol) ~= "number" or rtol < 0 or atol < 0 then
    fail("allclose", "rtol and atol must be non-negative numbers, got %s and %s", tostring(rtol), tostring(atol))
  end
  if not raw.same_shape(a._c, b._c) then -- broadcast, as PyTorch's allclose
    local shape = raw.broadcast_shape(a, b, "allclose")
    a, b = shape_ops.expand(a, shape), shape_ops.expand(b, shape)
  end
  check(lib.ms_allclose(flag, a._c, b._c, rtol, atol), "allclose")
  return flag[0] == 1
end

-- ---- memory ----

local stats = ffi.new("ms_memory_stats")

function ms.memory_stats(device)
  local pool = Tensor.pool_id(device or "cpu", "memory_stats")
  handles.flush_due()
  check(lib.ms_pool_stats(pool, stats), "memory_stats")
  return {allocated = tonumber(stats.allocated), peak = tonumber(stats.peak),
          reserved = tonumber(stats.reserved), allocs = tonumber(stats.allocs),
          frees = tonumber(stats.frees), active = tonumber(stats.active)}
end

function ms.reset_peak_memory_stats(device)
  handles.flush_due()
  check(lib.ms_pool_reset_peak(Tensor.pool_id(device or "cpu", "reset_peak_memory_stats")),
        "reset_peak_memory_stats")
end

function ms.empty_cache(device)
  handles.flush_due()
  check(lib.ms_pool_empty_cache(Tensor.pool_id(device or "cpu", "empty_cache")), "empty_cache")
end

function ms.set_num_threads(n)
  if type(n) ~= "number" or n % 1 ~= 0 then fail("set_num_threads", "expected a whole number, got %s", tostring(n)) end
  check(lib.ms_set_num_threads(n), "set_num_threads")
end
function ms.get_num_threads() return lib.ms_get_num_threads() end

-- torch.backends.cuda's switch of the flash-style attention kernel, and its CPU opt-in.
ms.backends = {enable_flash_sdp = nn_ops.enable_flash_sdp, flash_sdp_enabled = nn_ops.flash_sdp_enabled,
               enable_cpu_flash_sdp = nn_ops.enable_cpu_flash_sdp, cpu_flash_sdp_enabled = nn_ops.cpu_flash_sdp_enabled}

-- ---- distributed tensors ----

local placement = require "moonshard.placement"
local DTensor = require "moonshard.dtensor"
ms.Shard, ms.Replicate = placement.Shard, placement.Replicate
ms.DTensor = DTensor
ms.distribute_tensor = DTensor.distribute
ms.is_dtensor = DTensor.is_dtensor
ms.traceback = require("moonshard.traceback").traceback

-- ---- submodules, loaded on first use ----

local submodules = {
  nn = "moonshard.nn", optim = "moonshard.optim", dist = "moonshard.dist",
  fsdp = "moonshard.fsdp", ac = "moonshard.ac", dcp = "moonshard.dcp",
  repl = "moonshard.repl", data = "moonshard.data",
  amp = "moonshard.amp", profiler = "moonshard.profiler",
}
setmetatable(ms, {__index = function(t, key)
  local path = submodules[key]
  if path then
    local module = require(path)
    rawset(t, key, module)
    return module
  end
end})

return ms
