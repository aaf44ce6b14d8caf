-- Tab completion for the REPL: global names, fields and methods along a dotted path
-- (tables, modules, tensors; evaluated without calling anything), and parameter or
-- store names inside strings.
local Module = require "moonshard.nn.module"

local M = {}

local KEYWORDS = {"and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
                  "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while"}

local function add_keys(out, t, seen_tables)
  if type(t) ~= "table" or seen_tables[t] then return end
  seen_tables[t] = true
  for k in pairs(t) do
    if type(k) == "string" and k:match("^[%a_][%w_]*$") then out[k] = true end
  end
end

-- Names reachable from value with '.' or ':': its own keys, a module's children,
-- parameters and buffers, and the methods of its class chain or metatable.
local function members(value)
  local names, seen_tables = {}, {}
  if type(value) ~= "table" then
    if type(value) == "string" then add_keys(names, string, seen_tables) end
    return names
  end
  add_keys(names, value, seen_tables)
  if Module.is_module(value) then
    local own = {}
    for name in value:named_children() do own[name] = true end
    for name in value:named_parameters({recurse = false}) do own[name] = true end
    for name in value:named_buffers({recurse = false}) do own[name] = true end
    add_keys(names, own, seen_tables)
    for _, class in ipairs(Module.class_chain(value)) do add_keys(names, class, seen_tables) end
  end
  local mt = getmetatable(value)
  local depth = 0
  while type(mt) == "table" and depth < 5 do
    local index = rawget(mt, "__index")
    if type(index) ~= "table" then break end
    add_keys(names, index, seen_tables)
    mt, depth = getmetatable(index), depth + 1
  end
  return names
end

local function resolve(env, path)
  local value = env
  for segment in path:gmatch("[^%.:]+") do
    if type(value) ~= "table" and type(value) ~= "string" then return nil end
    local ok, next_value = pcall(function() return value[segment] end)
    if not ok or next_value == nil then return nil end
    value = next_value
  end
  return value
end

-- Candidates for word: full replacement strings, sorted.
function M.candidates(env, word, extra_names)
  local set = {}
  local base, separator, partial = word:match("^(.-)([%.:])([%w_]*)$")
  if base and base ~= "" and base:match("^[%a_][%w_%.:]*$") then
    local value = resolve(env, base)
    if value ~= nil then
      for name in pairs(members(value)) do
        local hidden = name:sub(1, 1) == "_" and partial:sub(1, 1) ~= "_"
        if not hidden and name:sub(1, #partial) == partial then set[base .. separator .. name] = true end
      end
    end
  else
    local names, seen_tables = {}, {}
    add_keys(names, env, seen_tables)
    local mt = getmetatable(env)
    if mt and type(mt.__index) == "table" then add_keys(names, mt.__index, seen_tables) end
    for _, k in ipairs(KEYWORDS) do names[k] = true end
    for name in pairs(names) do
      local hidden = name:sub(1, 1) == "_" and word:sub(1, 1) ~= "_"
      if not hidden and name:sub(1, #word) == word then set[name] = true end
    end
  end
  for _, name in ipairs(extra_names or {}) do
    if #word > 0 and name:sub(1, #word) == word then set[name] = true end
  end
  local out = {}
  for name in pairs(set) do out[#out + 1] = name end
  table.sort(out)
  return out
end

return M
