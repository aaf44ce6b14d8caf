-- FSDP mixed precision (PyTorch's MixedPrecision): the validated policy, the cast of a
-- unit's forward inputs to param_dtype and of its modules' floating buffers to buffer_dtype.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local fail = C.fail

local M = {}

local FLOAT = {f32 = true, f64 = true, bf16 = true, f16 = true}
local DTYPE_KEYS = {"param_dtype", "reduce_dtype", "buffer_dtype"}
local FLAG_DEFAULTS = {keep_low_precision_grads = false, cast_forward_inputs = false, cast_root_forward_params = true}

local function float_dtype(value, key, what)
  if value == nil then return nil end
  local ok, id = pcall(Tensor.dtype_id, value, what)
  local name = ok and Tensor.dtype_names[id]
  if not (name and FLOAT[name]) then
    fail(what, "mixed_precision.%s must be a float dtype (f32, f64, bf16 or f16), got %s", key, tostring(value))
  end
  return name
end

-- Check a mixed_precision table; returns it unchanged (fsdp.MixedPrecision{...}).
function M.validate(policy, what)
  what = what or "MixedPrecision"
  if type(policy) ~= "table" then fail(what, "mixed_precision must be a table such as {param_dtype = 'bf16'}, got %s", type(policy)) end
  for key, value in pairs(policy) do
    if FLAG_DEFAULTS[key] ~= nil then
      if type(value) ~= "boolean" then fail(what, "mixed_precision.%s must be true or false, got %s", key, tostring(value)) end
    elseif key ~= "param_dtype" and key ~= "reduce_dtype" and key ~= "buffer_dtype" then
      fail(what, "unknown mixed_precision option '%s' (expected param_dtype, reduce_dtype, buffer_dtype, " ..
           "keep_low_precision_grads, cast_forward_inputs or cast_root_forward_params)", tostring(key))
    end
  end
  for _, key in ipairs(DTYPE_KEYS) do float_dtype(policy[key], key, what) end
  if policy.keep_low_precision_grads then
    fail(what, "mixed_precision.keep_low_precision_grads = true is not supported: gradients land on the " ..
         "full-precision shards the optimizer steps")
  end
  return policy
end

-- The policy a unit runs with (canonical dtype names; nil without mixed precision):
-- {param_dtype, reduce_dtype (default param_dtype), buffer_dtype, cast_forward_inputs,
-- cast_root_forward_params}.
function M.resolve(policy)
  if policy == nil then return nil end
  M.validate(policy, "FSDP")
  local out = {}
  for _, key in ipairs(DTYPE_KEYS) do out[key] = float_dtype(policy[key], key, "FSDP") end
  out.reduce_dtype = out.reduce_dtype or out.param_dtype
  for key, default in pairs(FLAG_DEFAULTS) do
    if policy[key] == nil then out[key] = default else out[key] = policy[key] end
  end
  return out
end

-- Floating tensors in args (and in plain tables inside them) cast to dtype through
-- autograd; nil when nothing changes.
function M.cast_inputs(args, dtype)
  local changed = false
  local function cast(value)
    if Tensor.is_tensor(value) then
      if FLOAT[value:dtype()] and value:dtype() ~= dtype then
        changed = true
        return value:to(dtype)
      end
      return value
    elseif type(value) == "table" and getmetatable(value) == nil then
      local out = {}
      for k, v in pairs(value) do out[k] = cast(v) end
      return out
    end
    return value
  end
  local out = cast(args)
  return changed and out or nil
end

-- Cast the floating buffers of modules to dtype in place of the originals. casts maps an
-- original to its cast and is shared by every unit of one FSDP call, so a buffer shared by
-- several modules (one tensor under several names) stays one tensor. Returns the records
-- {module, name, dtype = original dtype, original, cast, made = whether this record made the
-- cast} the state dict and undo use.
function M.cast_buffers(modules, dtype, casts)
  casts = casts or {}
  local records = {}
  for _, m in ipairs(modules) do
    for name, b in m:named_buffers({recurse = false, remove_duplicate = false}) do
      local cast, made = casts[b], false
      if cast == nil and Tensor.is_tensor(b) and not Tensor.is_meta(b) and FLOAT[b:dtype()] and b:dtype() ~= dtype then
        cast = Tensor.empty_raw(b:shape(), Tensor.dtype_id(dtype, "FSDP"), b._c.storage.pool)
        C.check(C.lib.ms_copy(cast._c, b._c), "FSDP: buffer_dtype")
        casts[b], made = cast, true
      end
      if cast ~= nil then
        m:set_buffer(name, cast)
        records[#records + 1] = {module = m, name = name, dtype = b:dtype(), original = b, cast = cast, made = made}
      end
    end
  end
  return records
end

-- Put back the buffers cast_buffers replaced and free each cast it made once.
function M.restore_buffers(records)
  for _, r in ipairs(records) do r.module:set_buffer(r.name, r.original) end
  for _, r in ipairs(records) do
    if r.made then r.cast:_release() end
  end
end

-- Wrapping succeeded: the records keep only what the state dict reads (module, name, dtype).
function M.commit(records)
  for _, r in ipairs(records or {}) do r.original, r.cast = nil, nil end
end

return M
