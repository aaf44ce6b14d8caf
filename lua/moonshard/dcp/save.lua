-- Sharded saves: every rank writes the chunks it owns into its own shard file and commits
-- them, then rank 0 merges every rank's chunk table and commits the step's manifest. An
-- async save stages a copy of the rank's chunks (copy-on-write) and a C thread writes them.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local scope = require "moonshard.scope"
local stateful = require "moonshard.dcp.stateful"
local layout = require "moonshard.dcp.layout"
local values = require "moonshard.dcp.values"
local handle = require "moonshard.dcp.handle"
local exchange = require "moonshard.dcp.exchange"
local host = require "moonshard.dcp.host"
local options = require "moonshard.dcp.options"

local ffi = require "ffi"
local lib, check, fail = C.lib, C.check, C.fail

local M = {}

-- The async save whose manifest is not committed yet; every later save or load waits for it.
local pending = nil

function M.wait_pending()
  if pending then pending:wait() end
end

-- Staging buffers of async saves, by directory and fqn, reused by the next save of the
-- same tensors (the previous save is always finished by then). ms_store_stage fills them
-- lazily: the caller's tensors are copied as they are written to, or by the writer thread.
local staging_buffers = {}

local function same_layout(a, b)
  return a._c.dtype == b._c.dtype and a:shape() == b:shape()
end

local function stage(dir, what)
  local buffers = staging_buffers[dir] or {}
  staging_buffers[dir] = buffers
  return function(s, fqn, t)
    local buffer = buffers[fqn]
    if buffer and not (rawget(buffer, "_c") and same_layout(buffer, t)) then
      if rawget(buffer, "_c") then buffer:_release() end
      buffer = nil
    end
    if not buffer then
      buffer = scope.keep(Tensor.empty_raw(t:shape(), t._c.dtype, lib.MS_POOL_HOST))
      buffers[fqn] = buffer
    end
    check(lib.ms_store_stage(s, buffer._c, t._c), what)
    return buffer
  end
end

local global_shape_buf, offsets_buf = ffi.new("int64_t[8]"), ffi.new("int64_t[8]")

-- Begin step on this rank, put the chunks it owns, and commit them (in the background the
-- commit only starts the writer).
local function write_local(s, leaves, step, rank, background, staging, what)
  check(lib.ms_store_begin(s, step, rank, background and lib.MS_STORE_BACKGROUND or
                           lib.MS_STORE_FOREGROUND), what)
  if not background then
    local bytes = 0
    for _, leaf in ipairs(leaves) do
      if leaf.kind ~= "value" then
        local place = layout.of(leaf, rank, what)
        if place.writer then bytes = bytes + place.tensor:nbytes() end
      end
    end
    check(lib.ms_store_reserve(s, bytes), what)
  end
  for _, leaf in ipairs(leaves) do
    if leaf.kind == "value" then
      if rank == 0 then
        local bytes = values.encode(leaf.value)
        check(lib.ms_store_put_bytes(s, leaf.fqn, bytes, #bytes), what)
      end
    else
      local place = layout.of(leaf, rank, what)
      if place.writer then
        local t = staging and staging(s, leaf.fqn, place.tensor) or host.saved(place.tensor, what)
        check(lib.ms_store_put_tensor(s, leaf.fqn, t._c, layout.int64s(place.global_shape, global_shape_buf),
                                      layout.int64s(place.offsets, offsets_buf)), what)
      end
    end
  end
  check(lib.ms_store_commit_data(s), what)
end

-- exchange.all_gather for a save holding handle s: when the collective itself raises (a peer
-- is gone, or in the REPL sits at the prompt), the save is abandoned and s closed at once, so
-- its writer lock goes with the error instead of with the garbage collector.
local function gather(s, ok, bytes)
  local done, outcomes = pcall(exchange.all_gather, ok, bytes)
  if not done then
    if s then
      lib.ms_store_abort(s)
      handle.close(s)
    end
    error(outcomes, 0)
  end
  return outcomes
end

-- keep_last = k keeps the k newest steps (by number) once the step is committed; a step
-- older than k committed ones would be deleted by its own save, so the save is refused
-- before anything is written.
local function check_retention(s, dir, step, keep_last, what)
  if not keep_last then return end
  local newer = {}
  for _, other in ipairs(handle.steps(s, what)) do
    if other > step then newer[#newer + 1] = string.format("%d", other) end
  end
  if #newer >= keep_last then
    fail(what, "%s: step %d with keep_last = %d would be deleted by its own save: the store holds %d newer " ..
         "step%s (%s); delete %s first (dcp.delete or moonshard ckpt rm), or save a later step", dir, step,
         keep_last, #newer, #newer == 1 and "" or "s", table.concat(newer, ", "), #newer == 1 and "it" or "them")
  end
end

-- Rank 0 takes the store's writer lock (one writing job at a time) and chooses the step:
-- opts.step, or the latest + 1 under the lock. Every rank learns it, or every rank raises.
local function lock_and_agree(s, open_error, dir, opts, what)
  local rank = exchange.world()
  local ok, text = s ~= nil, open_error
  if ok and rank == 0 then
    ok, text = pcall(function()
      check(lib.ms_store_lock(s), what)
      local step = opts.step
      if step == nil then
        local latest = handle.latest(s, what)
        step = latest and latest + 1 or 0
        if not options.is_step(step) then
          fail(what, "%s: the step after %d would be 2^53, past the steps a Lua number holds exactly; " ..
               "pass a smaller step", dir, latest)
        end
      end
      check_retention(s, dir, step, opts.keep_last, what)
      return string.format("%d", step)
    end)
  end
  local outcomes = gather(s, ok, ok and (text or "") or tostring(text))
  local failure = exchange.failure(outcomes)
  if failure then
    if s then handle.close(s) end
    fail(what, "%s", failure)
  end
  return tonumber(outcomes[1].bytes)
end

local table_ptr, table_size = ffi.new("const void*[1]"), ffi.new("int64_t[1]")

local function own_chunk_table(s, what)
  check(lib.ms_store_chunk_table(s, table_ptr, table_size), what)
  return ffi.string(table_ptr[0], table_size[0])
end

local function commit_manifest(s, outcomes, world_size, opts, what)
  for r = 2, world_size do
    local bytes = outcomes[r].bytes
    check(lib.ms_store_merge_chunk_table(s, bytes, #bytes), what)
  end
  check(lib.ms_store_commit_manifest(s, world_size), what)
  if opts.keep_last then check(lib.ms_store_keep_last(s, opts.keep_last), what) end
end

-- The collective end of a save on every rank: exchange outcomes and chunk tables, commit
-- the manifest on rank 0, agree on its outcome. Closes the handle; raises on any failure.
local function finish(s, local_ok, local_error, opts, what)
  local rank, world_size = exchange.world()
  local ok, bytes = local_ok, local_error
  if ok then ok, bytes = pcall(own_chunk_table, s, what) end
  local outcomes = gather(s, ok, bytes or "")
  local failure = exchange.failure(outcomes)
  if failure then
    if s then
      lib.ms_store_abort(s)
      handle.close(s)
    end
    fail(what, "%s", failure)
  end
  local committed, commit_error = true, ""
  if rank == 0 then committed, commit_error = pcall(commit_manifest, s, outcomes, world_size, opts, what) end
  failure = exchange.failure(gather(s, committed, commit_error or ""))
  handle.close(s)
  if failure then fail(what, "%s", failure) end
end

-- Open the store, agree on the step under rank 0's writer lock, and write this rank's
-- part; returns ok, the handle and the step or the error, so that every rank reaches the
-- collectives of finish.
local function start(leaves, dir, opts, background, staging, what)
  local rank = exchange.world()
  local opened, s = pcall(handle.open, dir, handle.READ_WRITE, what)
  local step = lock_and_agree(opened and s or nil, not opened and s or nil, dir, opts, what)
  local ok, err = pcall(write_local, s, leaves, step, rank, background, staging, what)
  return ok, s, ok and step or err
end

-- dcp.save(state_dict, dir, {step =, keep_last =}): returns the step written.
function M.save(state_dict, dir, opts, what)
  opts = options.check(opts, options.SAVE, what)
  local leaves = stateful.flatten(state_dict, what)
  M.wait_pending()
  local ok, s, step = start(leaves, dir, opts, false, nil, what)
  finish(s, ok, not ok and step or nil, opts, what)
  return step
end

-- dcp.delete(dir, step): remove a committed step and reclaim its space (one process, while
-- no save of the store is in flight).
function M.delete(dir, step, what)
  options.check_step(step, what)
  M.wait_pending()
  -- a store must be there: opening for writing would make one
  handle.close(handle.open(dir, handle.READ_ONLY, what))
  local s = handle.open(dir, handle.READ_WRITE, what)
  local status = lib.ms_store_delete(s, step)
  local ok, err = pcall(check, status, what)
  handle.close(s)
  if not ok then error(err, 0) end
end

local AsyncSave = {}
AsyncSave.__index = AsyncSave

-- Wait for the writer, then commit the step on every rank (a collective: every rank calls
-- it). Returns the step; raises the save's error. Later calls return at once.
function AsyncSave:wait()
  if self.finished then
    if self.error then error(self.error, 0) end
    return self.step
  end
  self.finished = true
  if pending == self then pending = nil end
  local ok, err = self.local_ok, self.local_error
  if ok then ok, err = pcall(function() check(lib.ms_store_wait(self.store), self.what) end) end
  local done, failure = pcall(finish, self.store, ok, err, self.opts, self.what)
  self.store = nil
  if not done then
    self.error = failure
    error(failure, 0)
  end
  return self.step
end

-- dcp.async_save(state_dict, dir, opts): stages this rank's chunks, starts the writer and
-- returns a handle; h:wait() commits the step.
function M.async_save(state_dict, dir, opts, what)
  opts = options.check(opts, options.SAVE, what)
  local leaves = stateful.flatten(state_dict, what)
  M.wait_pending()
  local ok, s, step = start(leaves, dir, opts, true, stage(dir, what), what)
  local h = setmetatable({store = s, opts = opts, what = what, local_ok = ok,
                          local_error = not ok and step or nil, step = ok and step or nil}, AsyncSave)
  pending = h
  return h
end

return M
