-- What the GPU specs share: the device count, device/CPU comparisons of tensors, and the
-- nccl backend started inside forked ranks. Every spec here carries the gpu tag.
-- MOONSHARD_SPEC_DEVICE=host runs the specs against the host pool instead of cuda:N and the
-- collectives on the local backend instead of nccl: a dry run of the specs themselves on a
-- machine without a GPU.
local ms = require "moonshard"
local ffi = require "ffi"
local lib = require("moonshard.ffi").lib
local assert = require "luassert"

local M = {}

local count = ffi.new("int[1]")
assert(lib.ms_cuda_device_count(count) == 0)
M.devices = count[0]
M.device = os.getenv("MOONSHARD_SPEC_DEVICE") or "cuda:0"

-- Why the specs needing n devices cannot run here, or nil when they can.
function M.missing_devices(n)
  if M.devices >= n or M.device == "host" then return nil end
  return string.format("needs %d CUDA device(s), this machine has %d (%s)", n, M.devices,
                       ffi.string(lib.ms_cuda_unavailable_reason()))
end

function M.cpu(t) return t:to("cpu") end
function M.gpu(t, device) return t:to(device or M.device) end
-- The device of a forked rank: one GPU per rank.
function M.rank_device(rank) return M.device == "host" and "host" or "cuda:" .. rank end
-- Ranks the multi-GPU specs fork: one per device, 2 to 4 (2 in a dry run).
function M.world_size() return M.device == "host" and 2 or math.min(M.devices, 4) end
M.backend = M.device == "host" and "local" or "nccl"

-- The device result (moved back) is close to the CPU result computed independently.
function M.assert_close(device_result, cpu_result, rtol, atol, what)
  local got = device_result:to("cpu")
  assert.are.same(cpu_result:shape(), got:shape(), what)
  assert.are.equal(cpu_result:dtype(), got:dtype(), what)
  local ok = ms.allclose(got, cpu_result, {rtol = rtol or 1e-5, atol = atol or 1e-6})
  if not ok then
    local diff = (got:to("f64") - cpu_result:to("f64")):abs():max():item()
    error(string.format("%s: device and CPU differ (max |diff| %g)", what or "result", diff), 2)
  end
end

function M.assert_equal(device_result, cpu_result, what)
  assert.is_true(ms.equal(device_result:to("cpu"), cpu_result), what)
end

-- In a forked rank: make the world an nccl group, run fn, make it the local group again.
-- In a dry run M.backend is "local", the world's own backend, which init_process_group keeps.
function M.with_nccl(fn)
  ms.dist.init_process_group(M.backend)
  local ok, result = pcall(fn)
  local destroyed, destroy_error = pcall(ms.dist.destroy_process_group)
  if not ok then error(result, 0) end
  if not destroyed then error(destroy_error, 0) end
  return result
end

function M.synchronize(device) assert(lib.ms_cuda_synchronize(device or 0) == 0) end

return M
