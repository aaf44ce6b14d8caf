-- Store handles for the dcp module: opening and closing the C ms_store, listing steps and
-- reading entry records. A handle belongs to the process that opened it (open after fork).
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local lib, check = C.lib, C.check

local M = {}

M.READ_ONLY, M.READ_WRITE = 0, 1

local handle_out = ffi.new("ms_store*[1]")

function M.open(dir, mode, what)
  if type(dir) ~= "string" or dir == "" then
    C.fail(what, "the checkpoint directory must be a non-empty string, got %s", tostring(dir))
  end
  check(lib.ms_store_open(handle_out, dir, mode), what)
  return ffi.gc(handle_out[0], lib.ms_store_close)
end

function M.close(s)
  lib.ms_store_close(ffi.gc(s, nil))
end

local count_out = ffi.new("int64_t[1]")

-- Committed steps, ascending, as Lua numbers.
function M.steps(s, what)
  check(lib.ms_store_steps(s, nil, 0, count_out), what)
  local n = tonumber(count_out[0])
  local out = {}
  if n == 0 then return out end
  local buffer = ffi.new("int64_t[?]", n)
  check(lib.ms_store_steps(s, buffer, n, count_out), what)
  for i = 0, math.min(n, tonumber(count_out[0])) - 1 do
    if buffer[i] >= 2 ^ 53 then
      C.fail(what, "the store holds step %s, past 2^53 - 1, the largest step a Lua number holds exactly",
             (tostring(buffer[i]):gsub("LL$", "")))
    end
    out[#out + 1] = tonumber(buffer[i])
  end
  return out
end

-- The newest committed step, or nil when there is none.
function M.latest(s, what)
  local steps = M.steps(s, what)
  return steps[#steps]
end

local entry_out = ffi.new("ms_store_entry")

-- A Lua record of one C entry (the bytes pointer stays valid until the handle closes).
local function record(entry)
  local r = {fqn = ffi.string(entry.fqn), nbytes = tonumber(entry.nbytes)}
  if entry.kind == lib.MS_STORE_TENSOR then
    r.kind = "tensor"
    r.dtype = Tensor.dtype_names[entry.dtype]
    r.dtype_id = entry.dtype
    local shape = {}
    for d = 0, entry.ndim - 1 do shape[d + 1] = tonumber(entry.shape[d]) end
    r.shape = setmetatable(shape, Tensor.Size)
    r.chunks = entry.chunk_count
  else
    r.kind = "bytes"
    r.bytes = entry.bytes
  end
  return r
end

-- The entry fqn of step (a keyed look-up), or nil when step has none.
function M.entry(s, step, fqn, what)
  local status = lib.ms_store_entry_find(s, step, fqn, entry_out)
  if status == lib.MS_ERR_NOT_FOUND and ffi.string(lib.ms_last_error()):find("has no entry", 1, true) then
    return nil
  end
  check(status, what)
  return record(entry_out)
end

-- Every entry of step, sorted by fqn, and a table of them by fqn.
function M.entries(s, step, what)
  check(lib.ms_store_entry_count(s, step, count_out), what)
  local list, by_fqn = {}, {}
  for i = 0, tonumber(count_out[0]) - 1 do
    check(lib.ms_store_entry_at(s, step, i, entry_out), what)
    local r = record(entry_out)
    list[#list + 1] = r
    by_fqn[r.fqn] = r
  end
  return list, by_fqn
end

return M
