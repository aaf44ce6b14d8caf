-- The safetensors file format: an 8-byte little-endian header length, a JSON header naming
-- each tensor's dtype, shape and byte range, then the raw little-endian data.
local ffi = require "ffi"
local ms = require "moonshard"
local json = require "dkjson"

local M = {}

local TO_FILE = {f32 = "F32", f64 = "F64", bf16 = "BF16", f16 = "F16", i32 = "I32", i64 = "I64", u8 = "U8"}
local FROM_FILE, ELEMENT_BYTES = {}, {F32 = 4, F64 = 8, BF16 = 2, F16 = 2, I32 = 4, I64 = 8, U8 = 1}
for ours, theirs in pairs(TO_FILE) do FROM_FILE[theirs] = ours end

local function fail(fmt, ...) error("safetensors: " .. fmt:format(...), 0) end

local function u64_le(n)
  local bytes = {}
  for i = 1, 8 do
    bytes[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(bytes)
end

-- The header's deepest nesting of objects and arrays, up to limit + 1 (strings skipped), so
-- that one nested past any safetensors header is refused before the JSON decoder recurses
-- into it.
local MAX_HEADER_DEPTH = 64

local function nesting_depth(text, limit)
  local depth, deepest, at = 0, 0, 1
  while true do
    local i, _, c = text:find('([%[%]{}"])', at)
    if not i then return deepest end
    if c == '"' then
      local close = i
      repeat
        close = text:find('["\\]', close + 1)
        if close and text:sub(close, close) == "\\" then close = close + 1 else break end
      until false
      if not close then return deepest end
      at = close + 1
    else
      depth = depth + ((c == "[" or c == "{") and 1 or -1)
      if depth > deepest then
        deepest = depth
        if deepest > limit then return deepest end
      end
      at = i + 1
    end
  end
end

local function read_u64_le(s)
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + s:byte(i) end
  return n
end

-- Write tensors ({{name =, tensor =}, ...}, CPU tensors) to path, in the order given;
-- metadata is an optional table of string values.
function M.write(path, tensors, metadata)
  local header, offset = {}, 0
  if metadata and next(metadata) then header.__metadata__ = metadata end
  for _, entry in ipairs(tensors) do
    local t = entry.tensor
    local dtype = TO_FILE[t:dtype()]
    if not dtype then fail("'%s' has dtype %s, which safetensors cannot hold", entry.name, t:dtype()) end
    if header[entry.name] then fail("the name '%s' appears twice", entry.name) end
    local nbytes = t:nbytes()
    header[entry.name] = {dtype = dtype, shape = {unpack(t:shape())}, data_offsets = {offset, offset + nbytes}}
    offset = offset + nbytes
  end
  -- every object's keys sorted, so the same tensors always give the same bytes
  local keys = {"data_offsets", "dtype", "shape"}
  for key in pairs(header) do keys[#keys + 1] = key end
  for key in pairs(metadata or {}) do keys[#keys + 1] = key end
  table.sort(keys)
  local text = json.encode(setmetatable(header, {__jsontype = "object"}), {keyorder = keys})
  text = text .. string.rep(" ", (8 - #text % 8) % 8)
  local file, err = io.open(path, "wb")
  if not file then fail("cannot write %s: %s", path, tostring(err)) end
  file:write(u64_le(#text), text)
  for _, entry in ipairs(tensors) do
    local t = entry.tensor:contiguous()
    file:write(ffi.string(t:data_ptr(), t:nbytes()))
  end
  local ok, close_err = file:close()
  if not ok then fail("cannot write %s: %s", path, tostring(close_err)) end
  return offset
end

local function check_entry(path, name, info, data_size)
  if type(info) ~= "table" or type(info.dtype) ~= "string" or type(info.shape) ~= "table" or
     type(info.data_offsets) ~= "table" or #info.data_offsets ~= 2 then
    fail("%s: tensor '%s' needs dtype, shape and data_offsets", path, name)
  end
  local dtype = FROM_FILE[info.dtype]
  if not dtype then fail("%s: tensor '%s' has dtype %s, which moonshard does not support", path, name, info.dtype) end
  local numel = 1
  for _, d in ipairs(info.shape) do
    if type(d) ~= "number" or d < 0 or d % 1 ~= 0 then fail("%s: tensor '%s' has a bad shape", path, name) end
    numel = numel * d
  end
  local first, last = info.data_offsets[1], info.data_offsets[2]
  if type(first) ~= "number" or type(last) ~= "number" or first < 0 or last < first or last > data_size then
    fail("%s: tensor '%s' has data_offsets outside the %d data bytes", path, name, data_size)
  end
  if last - first ~= numel * ELEMENT_BYTES[info.dtype] then
    fail("%s: tensor '%s' spans %d bytes but %s %s needs %d", path, name, last - first, info.dtype,
         json.encode(info.shape), numel * ELEMENT_BYTES[info.dtype])
  end
  return dtype
end

-- Read path: returns an array {{name =, tensor =}, ...} sorted by name, and the metadata.
function M.read(path)
  local file, err = io.open(path, "rb")
  if not file then fail("cannot read %s: %s", path, tostring(err)) end
  local size = file:seek("end")
  file:seek("set", 0)
  local prefix = file:read(8)
  if not prefix or #prefix < 8 then file:close(); fail("%s is too short to be a safetensors file", path) end
  local header_size = read_u64_le(prefix)
  if header_size > size - 8 or header_size > 100 * 1024 * 1024 then
    file:close()
    fail("%s: header length %d does not fit the file (%d bytes)", path, header_size, size)
  end
  local text = file:read(header_size)
  if nesting_depth(text, MAX_HEADER_DEPTH) > MAX_HEADER_DEPTH then
    file:close()
    fail("%s: the header nests objects and arrays more than %d deep; a safetensors header has 3 levels",
         path, MAX_HEADER_DEPTH)
  end
  local header, stop, problem = json.decode(text)
  if problem == nil and text:find("[^ \t\r\n]", stop) then
    problem = ("trailing characters at byte %d"):format(text:find("[^ \t\r\n]", stop))
  end
  if problem or type(header) ~= "table" then
    file:close()
    fail("%s: the header is not a JSON object (%s)", path, problem or type(header))
  end
  local data_start, data_size = 8 + header_size, size - 8 - header_size
  local metadata = header.__metadata__
  header.__metadata__ = nil
  local spans = {}
  for name, info in pairs(header) do
    local dtype = check_entry(path, name, info, data_size)
    spans[#spans + 1] = {name = name, dtype = dtype, info = info}
  end
  -- By start, then end (an empty tensor sits where the next one starts), then name: one
  -- order whatever order the header's table iterates in (table.sort is not stable).
  table.sort(spans, function(a, b)
    local sa, sb = a.info.data_offsets, b.info.data_offsets
    if sa[1] ~= sb[1] then return sa[1] < sb[1] end
    if sa[2] ~= sb[2] then return sa[2] < sb[2] end
    return a.name < b.name
  end)
  local covered = 0
  for _, span in ipairs(spans) do
    if span.info.data_offsets[1] ~= covered then
      file:close()
      fail("%s: tensor '%s' does not start where the previous one ends (byte %d)", path, span.name, covered)
    end
    covered = span.info.data_offsets[2]
  end
  if covered ~= data_size then file:close(); fail("%s: %d data bytes are not covered by any tensor", path, data_size - covered) end
  local out = {}
  for _, span in ipairs(spans) do
    local t = ms.empty(#span.info.shape > 0 and span.info.shape or {}, {dtype = span.dtype})
    local nbytes = span.info.data_offsets[2] - span.info.data_offsets[1]
    file:seek("set", data_start + span.info.data_offsets[1])
    if nbytes > 0 then ffi.copy(t:data_ptr(), file:read(nbytes), nbytes) end
    out[#out + 1] = {name = span.name, tensor = ms.keep(t)}
  end
  file:close()
  table.sort(out, function(a, b) return a.name < b.name end)
  return out, metadata
end

return M
