-- Missing and unexpected keys of a state-dict load, found and reported one way for modules,
-- FSDP and dcp: "missing keys: a, b; unexpected keys: c", sorted, long lists cut short.
local M = {}

local LISTED_KEYS = 10

-- The keys of expected (an array) absent from given, and the keys of given (a table keyed
-- by name) not in expected (sorted).
function M.compare(expected, given)
  local known, missing, unexpected = {}, {}, {}
  for _, key in ipairs(expected) do
    known[key] = true
    if given[key] == nil then missing[#missing + 1] = key end
  end
  for key in pairs(given) do
    if not known[key] then unexpected[#unexpected + 1] = tostring(key) end
  end
  table.sort(unexpected)
  return missing, unexpected
end

-- "a, b, ... and N more" of keys, sorted (keys itself is left as it is).
function M.list(keys)
  local sorted = {unpack(keys)}
  table.sort(sorted, function(a, b) return tostring(a) < tostring(b) end)
  local shown = {}
  for i = 1, math.min(#sorted, LISTED_KEYS) do shown[i] = tostring(sorted[i]) end
  local text = table.concat(shown, ", ")
  if #sorted > LISTED_KEYS then text = text .. string.format(" and %d more", #sorted - LISTED_KEYS) end
  return text
end

-- "missing keys <notes.missing>: ...; unexpected keys <notes.unexpected>: ..." for the
-- non-empty lists; notes (optional) explain each kind.
function M.describe(missing, unexpected, notes)
  local parts = {}
  for _, kind in ipairs({{"missing", missing}, {"unexpected", unexpected}}) do
    local keys = kind[2]
    if keys and #keys > 0 then
      local note = notes and notes[kind[1]]
      parts[#parts + 1] = kind[1] .. " keys" .. (note and " " .. note or "") .. ": " .. M.list(keys)
    end
  end
  return table.concat(parts, "; ")
end

return M
