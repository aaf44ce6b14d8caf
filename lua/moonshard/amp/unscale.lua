-- Unscaling an optimizer's gradients for amp.GradScaler: check each for inf/NaN, multiply it by
-- 1/scale in place, and agree on the result across the ranks that share the parameters.
local ffi = require "ffi"
local bit = require "bit"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local raw = require "moonshard.ops.raw"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local F32, BF16, F16 = 0, 2, 3
local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}

local function is_finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

local function local_of(t)
  if DTensor.is_dtensor(t) then return t:to_local() end
  return t
end

-- Are all elements of t (f32 or f64, not empty) finite? Max and min reductions keep NaN.
local function all_finite(t, what)
  local c = t._c
  local shape = {}
  for d = 1, c.ndim do shape[d] = 1 end
  local out = Tensor.empty_raw(shape, c.dtype, c.storage.pool)
  local mask = bit.lshift(1, c.ndim) - 1
  check(lib.ms_reduce(out._c, c, raw.MAX, mask), what)
  local hi = out:item()
  check(lib.ms_reduce(out._c, c, raw.MIN, mask), what)
  local lo = out:item()
  out:_release()
  return is_finite(hi) and is_finite(lo)
end

-- Check one gradient for inf/NaN (before unscaling, as PyTorch does) and multiply it by
-- inv_scale in place. 16-bit gradients go through an f32 copy: math in f32, one rounding.
-- Returns true when a non-finite value was found; checking stops once found is set.
local function check_and_unscale(g, inv_scale, found, what)
  local c = g._c
  if c.numel == 0 then return found end
  local sixteen = c.dtype == BF16 or c.dtype == F16
  local work = g
  if sixteen then
    work = Tensor.empty_like_raw(g, F32)
    check(lib.ms_copy(work._c, c), what)
  end
  if not found and not all_finite(work, what) then found = true end
  if inv_scale ~= 1 then
    check(lib.ms_binary_scalar(work._c, work._c, inv_scale, raw.MUL, 0), what)
    if sixteen then check(lib.ms_copy(c, work._c), what) end
  end
  if sixteen then work:_release() end
  g:_bump_version()
  return found
end

-- The groups found_inf is all-reduced over: process_group if given, else every mesh dim of
-- the distinct meshes of the optimizer's sharded or replicated (DTensor) parameters, in the
-- order the parameters come (the same on every rank).
local function inf_check_groups(optimizer, process_group)
  if process_group then return {process_group} end
  local meshes, groups = {}, {}
  for _, group in ipairs(optimizer.param_groups) do
    for _, p in ipairs(group.params) do
      if DTensor.is_dtensor(p) then
        local seen = false
        for _, m in ipairs(meshes) do
          if m == p.device_mesh then seen = true break end
        end
        if not seen then
          meshes[#meshes + 1] = p.device_mesh
          for d = 0, p.device_mesh:ndim() - 1 do groups[#groups + 1] = p.device_mesh:get_group(d) end
        end
      end
    end
  end
  return groups
end

-- Unscale every gradient of the optimizer by inv_scale. Returns 1 when a gradient held inf or
-- NaN (on any rank of the groups above), 0 when none did, nil when no parameter has a
-- gradient on any of those ranks. Gradient dtypes are checked before anything changes.
function M.unscale_grads(optimizer, inv_scale, process_group, what)
  local grads = {}
  for _, group in ipairs(optimizer.param_groups) do
    for i, p in ipairs(group.params) do
      local grad = rawget(p, "grad")
      if grad ~= nil then
        local g = local_of(grad)
        if not FLOATING[g:dtype()] then
          fail(what, "parameter %d has a %s gradient; only floating-point gradients can be unscaled", i, g:dtype())
        end
        grads[#grads + 1] = g
      end
    end
  end
  local found, recorded = false, #grads > 0
  for _, g in ipairs(grads) do found = check_and_unscale(g, inv_scale, found, what) end
  local groups = inf_check_groups(optimizer, process_group)
  if #groups > 0 then
    local flags = Tensor.empty_raw({2}, F32, 0)
    local ptr = ffi.cast("float*", lib.ms_tensor_data(flags._c))
    ptr[0], ptr[1] = found and 1 or 0, recorded and 1 or 0
    local dist = require "moonshard.dist"
    for _, g in ipairs(groups) do dist.all_reduce(flags, "max", {group = g}) end
    found, recorded = ptr[0] > 0, ptr[1] > 0
    flags:_release()
  end
  if not recorded then return nil end
  return found and 1 or 0
end

return M
