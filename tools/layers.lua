-- Checks the layers of runtime/ (docs/DESIGN.md, "Layers"): draws an arrow from a file to each
-- runtime header it includes and to each .c file defining a function or table it names, then
-- fails on files that use each other in a circle and on arrows the layer rules forbid
-- (runtime/cpu and runtime/cuda are leaves; comm and store never use each other).
-- Usage (repository root): luajit tools/layers.lua [-v]. Exits 1 naming every violation.
local verbose = arg[1] == "-v"

local function list(command)
  local files, pipe = {}, assert(io.popen(command))
  for line in pipe:lines() do files[#files + 1] = line end
  pipe:close()
  table.sort(files)
  return files
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  -- Comments, strings and character constants name nothing.
  text = text:gsub("/%*.-%*/", " "):gsub("//[^\n]*", " ")
  text = text:gsub('"[^"\n]*"', function(s) return s:match('^"[^"]*%.[ch]u?h?"$') and s or '""' end)
  text = text:gsub("'\\?.'", "0")
  return text
end

-- The text outside preprocessor lines (a macro's braces are not the file's).
local function code(text)
  return (text:gsub("\\\n", " "):gsub("\n%s*#[^\n]*", "\n"))
end

local files = list("find runtime -name '*.c' -o -name '*.h' | sort")
local exists = {}
for _, path in ipairs(files) do exists[path] = true end

-- Where each non-static function or global table is defined.
local definer = {}
local texts = {}
for _, path in ipairs(files) do
  local text = read(path)
  texts[path] = text
  if path:match("%.c$") then
    -- Top-level statements; one that opens a struct body goes on after its closing brace.
    local depth, statement, opened = 0, {}, ""
    for piece in code("\n" .. text):gmatch("[^{};]+[{};]?") do
      local body, closer = piece:match("^(.-)([{};]?)$")
      if depth == 0 then
        statement[#statement + 1] = body
        if closer ~= "" then
          local s = opened .. table.concat(statement)
          statement, opened = {}, ""
          local func = s:match("([%a_][%w_]*)%s*%b()%s*$")
          if closer == "{" and not func and not s:match("=%s*$") then opened = s end
          if closer == "{" and not s:match("%f[%w]static%f[%W]") and not s:match("typedef") then
            local name = func or s:match("([%a_][%w_]*)%s*=%s*$")
            if name then definer[name] = path end
          end
        end
      end
      if closer == "{" then depth = depth + 1 elseif closer == "}" then depth = depth - 1 end
    end
  end
end

local umbrella = {}
for name in texts["runtime/ms.h"]:gmatch('#%s*include%s*"([^"]+)"') do
  umbrella["runtime/" .. name] = true
end

-- The arrows.
local edges = {}
for _, path in ipairs(files) do
  local out, seen = {}, {}
  local function add(target, why)
    if target and target ~= path and not seen[target] then
      seen[target] = why
      out[#out + 1] = target
    end
  end
  local dir = path:match("^(.*)/")
  for name in texts[path]:gmatch('#%s*include%s*"([^"]+)"') do
    local here = (dir .. "/" .. name):gsub("[^/]+/%.%./", "")
    local target = exists[here] and here or exists["runtime/" .. name] and "runtime/" .. name
    -- ms.h is the umbrella: the public headers it includes at its end include it back for
    -- the core types, so that each can be included alone.
    if target and not (target == "runtime/ms.h" and umbrella[path]) then
      add(target, "#include \"" .. name .. "\"")
    end
  end
  if path:match("%.c$") then -- a header's declarations use nothing
    for name in texts[path]:gmatch("[%a_][%w_]*") do add(definer[name], name) end
  end
  edges[path] = {targets = out, why = seen}
end

-- Circles: strongly connected components of more than one file (Tarjan).
local index, low, on_stack, stack, counter, circles = {}, {}, {}, {}, 0, {}
local function visit(v)
  counter = counter + 1
  index[v], low[v] = counter, counter
  stack[#stack + 1] = v
  on_stack[v] = true
  for _, w in ipairs(edges[v].targets) do
    if not index[w] then
      visit(w)
      low[v] = math.min(low[v], low[w])
    elseif on_stack[w] then
      low[v] = math.min(low[v], index[w])
    end
  end
  if low[v] == index[v] then
    local component = {}
    repeat
      local w = table.remove(stack)
      on_stack[w] = nil
      component[#component + 1] = w
    until w == v
    if #component > 1 then
      table.sort(component)
      circles[#circles + 1] = component
    end
  end
end
for _, path in ipairs(files) do
  if not index[path] then visit(path) end
end

if verbose then
  for _, path in ipairs(files) do
    for _, target in ipairs(edges[path].targets) do
      print(path .. " -> " .. target .. " (" .. edges[path].why[target] .. ")")
    end
  end
end
-- Engines whose files share one private header and call each other freely; a circle is
-- allowed only inside one of them (docs/DESIGN.md, "Layers").
local engines = {"runtime/store/", "runtime/comm/local"}
local function inside_engine(component)
  for _, prefix in ipairs(engines) do
    local all = true
    for _, v in ipairs(component) do
      if v:sub(1, #prefix) ~= prefix then all = false end
    end
    if all then return true end
  end
  return false
end
local kept = {}
for _, component in ipairs(circles) do
  if not inside_engine(component) then kept[#kept + 1] = component end
end
circles = kept

for _, component in ipairs(circles) do
  local members = {}
  for _, v in ipairs(component) do members[v] = true end
  print("layers: files that use each other in a circle:")
  for _, v in ipairs(component) do
    for _, w in ipairs(edges[v].targets) do
      if members[w] then print(string.format("  %s -> %s (%s)", v, w, edges[v].why[w])) end
    end
  end
end
-- Forbidden arrows: from files under the first prefix to files under the second. The leaves
-- see only the core (runtime/*.c, *.h), their own directory and the ops backend interface.
local forbidden = {
  {"runtime/cpu/", "runtime/ops/"}, {"runtime/cpu/", "runtime/cuda/"},
  {"runtime/cpu/", "runtime/comm/"}, {"runtime/cpu/", "runtime/store/"},
  {"runtime/cuda/", "runtime/ops/"}, {"runtime/cuda/", "runtime/cpu/"},
  {"runtime/cuda/", "runtime/comm/"}, {"runtime/cuda/", "runtime/store/"},
  {"runtime/comm/", "runtime/store/"}, {"runtime/store/", "runtime/comm/"},
}
local allowed = {["runtime/ops/backend.h"] = true}
local bad = 0
for _, path in ipairs(files) do
  for _, target in ipairs(edges[path].targets) do
    for _, rule in ipairs(forbidden) do
      if path:sub(1, #rule[1]) == rule[1] and target:sub(1, #rule[2]) == rule[2]
         and not allowed[target] then
        print(string.format("layers: %s -> %s (%s): %s must not use %s", path, target,
                            edges[path].why[target], rule[1], rule[2]))
        bad = bad + 1
      end
    end
  end
end

if #circles > 0 or bad > 0 then os.exit(1) end
print(string.format("layers: %d files of runtime/, no circles, no forbidden arrows", #files))
