-- A small strict JSON reader and writer for the command line tools (safetensors headers,
-- metrics files). Objects decode to Lua tables, arrays to 1-based arrays, null to json.null.
local M = {}

M.null = setmetatable({}, {__tostring = function() return "null" end})

local escapes = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
                 ["\r"] = "\\r", ["\t"] = "\\t"}

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n == #t and (n > 0 or getmetatable(t) == M.array_mt)
end

M.array_mt = {}
-- An empty table that encodes as [] rather than {}.
function M.array(t) return setmetatable(t or {}, M.array_mt) end

-- Encode value; object keys are sorted so the output is deterministic.
function M.encode(value)
  local kind = type(value)
  if value == M.null or value == nil then return "null" end
  if kind == "boolean" then return tostring(value) end
  if kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then
      error("json.encode: " .. tostring(value) .. " has no JSON form", 2)
    end
    if value % 1 == 0 and math.abs(value) < 2 ^ 53 then return string.format("%d", value) end
    return string.format("%.17g", value)
  end
  if kind == "string" then return encode_string(value) end
  if kind ~= "table" then error("json.encode: cannot encode a " .. kind, 2) end
  local parts = {}
  if is_array(value) then
    for i, v in ipairs(value) do parts[i] = M.encode(v) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(value) do
    if type(k) ~= "string" then error("json.encode: object keys must be strings", 2) end
    keys[#keys + 1] = k
  end
  table.sort(keys)
  for i, k in ipairs(keys) do parts[i] = encode_string(k) .. ":" .. M.encode(value[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- ---- decoding ----

local function fail(pos, what)
  error(string.format("json: %s at byte %d", what, pos), 0)
end

local function skip(text, pos) return text:find("[^ \t\r\n]", pos) or #text + 1 end

local decode_value

local function decode_string(text, pos)
  local out, i = {}, pos + 1
  while true do
    local c = text:sub(i, i)
    if c == "" then fail(pos, "unterminated string") end
    if c == '"' then return table.concat(out), i + 1 end
    if c == "\\" then
      local e = text:sub(i + 1, i + 1)
      local simple = ({['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"})[e]
      if simple then
        out[#out + 1], i = simple, i + 2
      elseif e == "u" then
        local hex = text:sub(i + 2, i + 5)
        if not hex:match("^%x%x%x%x$") then fail(i, "bad \\u escape") end
        local code = tonumber(hex, 16)
        if code < 0x80 then out[#out + 1] = string.char(code)
        elseif code < 0x800 then out[#out + 1] = string.char(0xC0 + math.floor(code / 64), 0x80 + code % 64)
        else out[#out + 1] = string.char(0xE0 + math.floor(code / 4096), 0x80 + math.floor(code / 64) % 64, 0x80 + code % 64) end
        i = i + 6
      else
        fail(i, "bad escape")
      end
    elseif c:byte() < 32 then
      fail(i, "control character in string")
    else
      out[#out + 1], i = c, i + 1
    end
  end
end

local function decode_container(text, pos, close, read_item)
  local result, i = {}, skip(text, pos + 1)
  if text:sub(i, i) == close then return result, i + 1 end
  while true do
    i = read_item(result, i)
    i = skip(text, i)
    local c = text:sub(i, i)
    if c == close then return result, i + 1 end
    if c ~= "," then fail(i, "expected ',' or '" .. close .. "'") end
    i = skip(text, i + 1)
  end
end

function decode_value(text, pos)
  pos = skip(text, pos)
  local c = text:sub(pos, pos)
  if c == "{" then
    return decode_container(text, pos, "}", function(result, i)
      if text:sub(i, i) ~= '"' then fail(i, "expected a string key") end
      local key
      key, i = decode_string(text, i)
      i = skip(text, i)
      if text:sub(i, i) ~= ":" then fail(i, "expected ':'") end
      result[key], i = decode_value(text, i + 1)
      return i
    end)
  elseif c == "[" then
    return decode_container(text, pos, "]", function(result, i)
      result[#result + 1], i = decode_value(text, i)
      return i
    end)
  elseif c == '"' then
    return decode_string(text, pos)
  end
  for word, value in pairs({["true"] = true, ["false"] = false, null = M.null}) do
    if text:sub(pos, pos + #word - 1) == word then return value, pos + #word end
  end
  local number = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
  if number and number ~= "" and number ~= "-" then
    local n = tonumber(number)
    if n then return n, pos + #number end
  end
  fail(pos, c == "" and "unexpected end" or ("unexpected '" .. c .. "'"))
end

-- Decode one JSON document; raises "json: <problem> at byte N".
function M.decode(text)
  local value, pos = decode_value(text, 1)
  pos = skip(text, pos)
  if pos <= #text then fail(pos, "trailing characters") end
  return value
end

return M
