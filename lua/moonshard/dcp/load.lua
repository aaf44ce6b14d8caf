-- Loading in place with resharding: each rank fills the tensors of its state dict (its own
-- local shards, whatever mesh they are on) from every stored chunk that overlaps them, and
-- sets the non-tensor values. Every key, type, dtype and shape is checked before any copy.
-- Device tensors are filled through a host buffer (dcp/host.lua).
local C = require "moonshard.ffi"
local autograd = require "moonshard.autograd"
local stateful = require "moonshard.dcp.stateful"
local Tensor = require "moonshard.tensor"
local layout = require "moonshard.dcp.layout"
local values = require "moonshard.dcp.values"
local handle = require "moonshard.dcp.handle"
local exchange = require "moonshard.dcp.exchange"
local host = require "moonshard.dcp.host"
local state_keys = require "moonshard.state_keys"
local options = require "moonshard.dcp.options"

local ffi = require "ffi"
local lib, check, fail = C.lib, C.check, C.fail

local M = {}


local function value_kind(leaf)
  return leaf.kind == "value" and type(leaf.value) or (leaf.kind == "dtensor" and "DTensor" or "tensor")
end

local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}

-- Raise for the first leaf the stored entry cannot fill. A non-tensor value is decoded here
-- (returned), so that a value that cannot be read stops the load before anything is copied;
-- it fills a value of its own kind (number, string or boolean) only.
local function check_leaf(leaf, entry, where, what)
  local stored = entry.kind == "tensor" and "tensor" or values.kind(entry.bytes, entry.nbytes)
  if (entry.kind == "tensor") ~= (leaf.kind ~= "value") or
     (leaf.kind == "value" and stored ~= "unknown" and stored ~= type(leaf.value)) then
    fail(what, "%s: '%s' is a %s in the checkpoint but a %s in the state dict", where, leaf.fqn, stored,
         value_kind(leaf))
  end
  if entry.kind ~= "tensor" then return values.decode(entry.bytes, entry.nbytes, leaf.fqn, what) end
  local shape = leaf.value:shape()
  if not (shape == entry.shape) then
    fail(what, "%s: shape mismatch for '%s': the checkpoint has %s, the state dict has %s", where,
         leaf.fqn, tostring(entry.shape), tostring(shape))
  end
  local dtype = leaf.value:dtype()
  if dtype ~= entry.dtype and not (FLOATING[dtype] and FLOATING[entry.dtype]) then
    fail(what, "%s: dtype mismatch for '%s': the checkpoint has %s, the state dict has %s (only " ..
         "floating-point values cast on load)", where, leaf.fqn, entry.dtype, dtype)
  end
end

local offsets_buf = ffi.new("int64_t[8]")

-- Read a stored chunk region into target; a stored float of another dtype is read into a
-- buffer of its own dtype and cast by the copy, as PyTorch's copy_ does.
local function read_cast(s, step, fqn, target, stored_dtype, offsets, what)
  if target._c.dtype == stored_dtype then
    check(lib.ms_store_read_tensor(s, step, fqn, target._c, offsets), what)
    return
  end
  local buffer = Tensor.empty_raw(target:shape(), stored_dtype, target._c.storage.pool)
  local ok, err = pcall(function()
    check(lib.ms_store_read_tensor(s, step, fqn, buffer._c, offsets), what)
    check(lib.ms_copy(target._c, buffer._c), what)
  end)
  buffer:_release()
  if not ok then error(err, 0) end
end

local function load_from(s, leaves, dir, step, opts, what)
  local where = string.format("%s: step %d", dir, step)
  local _, stored = handle.entries(s, step, what)
  local wanted = {}
  for i, leaf in ipairs(leaves) do wanted[i] = leaf.fqn end
  local missing, unexpected = state_keys.compare(wanted, stored)
  if #missing > 0 then
    fail(what, "%s: %s", where, state_keys.describe(missing, nil, {missing = "(in the state dict, not in the checkpoint)"}))
  end
  if opts.strict ~= false and #unexpected > 0 then
    fail(what, "%s: %s", where, state_keys.describe(nil, unexpected, {
      unexpected = "(in the checkpoint, not in the state dict; pass strict = false to ignore them)"}))
  end
  local decoded = {}
  for i, leaf in ipairs(leaves) do decoded[i] = check_leaf(leaf, stored[leaf.fqn], where, what) end
  local rank = exchange.world()
  autograd.no_grad(function()
    for i, leaf in ipairs(leaves) do
      local entry = stored[leaf.fqn]
      if leaf.kind == "value" then
        leaf.parent[leaf.key] = decoded[i]
      else
        local place = layout.of(leaf, rank, what)
        host.read_into(place.tensor, function(target)
          read_cast(s, step, leaf.fqn, target, entry.dtype_id, layout.int64s(place.offsets, offsets_buf), what)
        end, what)
        place.tensor:_bump_version()
      end
    end
  end)
  table.sort(unexpected)
  return {step = step, unexpected_keys = unexpected}
end

-- The newest step, chosen by rank 0 and agreed by every rank (a collective when the world
-- has several ranks), so a job committing meanwhile cannot make ranks load different steps.
local function agreed_latest(s, open_error, dir, what)
  local rank, world_size = exchange.world()
  local ok, text = s ~= nil, open_error
  if ok and rank == 0 then
    ok, text = pcall(function()
      local step = handle.latest(s, what)
      if step == nil then fail(what, "%s has no committed step", dir) end
      return string.format("%d", step)
    end)
  end
  if world_size == 1 then
    if not ok then error(text, 0) end
    return tonumber(text)
  end
  local outcomes = exchange.all_gather(ok, ok and (text or "") or tostring(text))
  local failure = exchange.failure(outcomes)
  if failure then fail(what, "%s", failure) end
  return tonumber(outcomes[1].bytes)
end

-- dcp.load(state_dict, dir, {step =, strict =}): returns {step =, unexpected_keys =}.
function M.load(state_dict, dir, opts, what)
  opts = options.check(opts, options.LOAD, what)
  local leaves, statefuls = stateful.flatten(state_dict, what)
  require("moonshard.dcp.save").wait_pending()
  local opened, s = pcall(handle.open, dir, handle.READ_ONLY, what)
  local step = opts.step
  if step == nil then
    local agreed, chosen = pcall(agreed_latest, opened and s or nil, not opened and s or nil, dir, what)
    if not agreed then
      if opened then handle.close(s) end
      error(chosen, 0)
    end
    step = chosen
  elseif not opened then
    error(s, 0)
  end
  local ok, result = pcall(load_from, s, leaves, dir, step, opts, what)
  handle.close(s)
  if not ok and opts.step == nil and tostring(result):find(("step %d is not committed"):format(step), 1, true) then
    fail(what, "%s: step %d was deleted while reading", dir, step)
  end
  if not ok then error(result, 0) end
  stateful.restore(statefuls)
  return result
end

return M
