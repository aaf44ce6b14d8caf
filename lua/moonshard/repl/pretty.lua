-- The REPL's printer: tensors in PyTorch's summarised layout (first and last three items
-- of long dims), DTensors with their mesh, placements and local shard, nested tables
-- with sorted keys up to a depth, modules by their repr.
local ffi = require "ffi"
local ms = require "moonshard"

local M = {}

local EDGE, SUMMARISE_ABOVE, LINE_WIDTH, MAX_DEPTH, MAX_ITEMS = 3, 1000, 100, 3, 40

local function number_text(v, integer)
  if integer then return string.format("%d", v) end
  if v ~= v then return "nan" end
  if v == math.huge then return "inf" elseif v == -math.huge then return "-inf" end
  return string.format("%.4f", v)
end

-- Indices shown along a dim of size n: all of them, or the first and last EDGE with nil
-- standing for the elided middle.
local function shown(n, summarise)
  local out = {}
  if summarise and n > 2 * EDGE then
    for i = 0, EDGE - 1 do out[#out + 1] = i end
    out[#out + 1] = false
    for i = n - EDGE, n - 1 do out[#out + 1] = i end
  else
    for i = 0, n - 1 do out[#out + 1] = i end
  end
  return out
end

-- The body "[[a, b], [c, d]]" of a plain tensor: large tensors show the first and last
-- items of each dim, and rows longer than a line show the edges of the last dim.
function M.tensor_body(t)
  local shape = t:shape()
  if t:numel() == 0 then return "[]" end
  local integer = t:dtype():sub(1, 1) == "i" or t:dtype() == "u8"
  local flat = ms.no_grad(function() return t:to("f64"):contiguous() end)
  local data = ffi.cast("const double *", flat:data_ptr())
  if #shape == 0 then
    local text = number_text(data[0], integer)
    flat:free()
    return text
  end
  local strides = {}
  local stride = 1
  for d = #shape, 1, -1 do strides[d], stride = stride, stride * shape[d] end
  local summarise = t:numel() > SUMMARISE_ABOVE
  local width, pad_to, short_rows = 0, 0, summarise
  local function render(dim, base, indent)
    local parts = {}
    for _, i in ipairs(shown(shape[dim], dim == #shape and short_rows or summarise)) do
      if i == false then
        parts[#parts + 1] = "..."
      elseif dim == #shape then
        local text = number_text(data[base + i], integer)
        width = math.max(width, #text)
        parts[#parts + 1] = string.rep(" ", pad_to - #text) .. text
      else
        parts[#parts + 1] = render(dim + 1, base + i * strides[dim], indent .. " ")
      end
    end
    local separator = dim == #shape and ", " or (",\n" .. string.rep("\n", #shape - dim - 1) .. indent .. " ")
    return "[" .. table.concat(parts, separator) .. "]"
  end
  render(1, 0, "       ")
  pad_to = width
  short_rows = summarise or shape[#shape] * (width + 2) > LINE_WIDTH
  local text = render(1, 0, "       ")
  flat:free()
  return text
end

function M.tensor(t)
  local extras = {"shape=" .. tostring(t:shape()), "dtype=" .. t:dtype()}
  if t:device() ~= "cpu" then extras[#extras + 1] = "device=" .. t:device() end
  if t.requires_grad then extras[#extras + 1] = "requires_grad=true" end
  return "tensor(" .. M.tensor_body(t) .. ",\n       " .. table.concat(extras, ", ") .. ")"
end

function M.dtensor(t)
  local names = {}
  for i, p in ipairs(t.placements) do names[i] = tostring(p) end
  local mesh = t.device_mesh
  local local_part = t:to_local()
  return ("DTensor(shape=%s, dtype=%s, mesh=%s, placements={%s},\n        local rows on rank %d: %s\n        %s)")
    :format(tostring(t:shape()), t:dtype(), "[" .. table.concat(mesh:shape(), ", ") .. "]", table.concat(names, ", "),
            ms.dist.get_rank(), tostring(local_part:shape()), M.tensor(local_part):gsub("\n", "\n        "))
end

local is_module = require("moonshard.nn.module").is_module

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return k end
  return "[" .. (type(k) == "string" and ("%q"):format(k) or tostring(k)) .. "]"
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta == "number" end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  return keys
end

local function value_text(v, depth, indent, seen)
  if ms.is_tensor(v) then return M.tensor(v):gsub("\n", "\n" .. indent) end
  if ms.is_dtensor(v) then return M.dtensor(v):gsub("\n", "\n" .. indent) end
  if is_module(v) then return tostring(v):gsub("\n", "\n" .. indent) end
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) ~= "table" then return tostring(v) end
  local mt = getmetatable(v)
  if mt and mt.__tostring then return tostring(v) end
  if seen[v] then return "<cycle>" end
  if depth >= MAX_DEPTH then return "{...}" end
  local keys = sorted_keys(v)
  if #keys == 0 then return "{}" end
  if #keys == #v and #keys <= MAX_ITEMS then
    local parts = {}
    for i, item in ipairs(v) do
      if type(item) == "table" then parts = nil break end
      parts[i] = type(item) == "string" and ("%q"):format(item) or tostring(item)
    end
    if parts and #table.concat(parts, ", ") <= 72 then return "{" .. table.concat(parts, ", ") .. "}" end
  end
  seen[v] = true
  local lines, inner = {}, indent .. "  "
  for i, k in ipairs(keys) do
    if i > MAX_ITEMS then
      lines[#lines + 1] = inner .. ("... (%d more)"):format(#keys - MAX_ITEMS)
      break
    end
    local shown_key = (type(k) == "number" and k == i) and "" or (key_text(k) .. " = ")
    lines[#lines + 1] = inner .. shown_key .. value_text(v[k], depth + 1, inner, seen) .. ","
  end
  seen[v] = nil
  return "{\n" .. table.concat(lines, "\n") .. "\n" .. indent .. "}"
end

-- Text for any Lua value as the REPL shows it.
function M.format(v) return (value_text(v, 0, "", {})) end

return M
