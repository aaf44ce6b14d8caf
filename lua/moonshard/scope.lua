-- Tensor lifetimes without reference counting: tensors created while a scope is open are
-- released when it closes unless they are returned from it or marked kept, so memory
-- falls when PyTorch's would instead of whenever LuaJIT's collector runs.
local M = {}

local tracked = {}   -- tensors created inside open scopes, oldest first
local count = 0
local depth = 0

-- Called by the tensor constructor for every new tensor.
function M.track(t)
  if depth > 0 then
    count = count + 1
    tracked[count] = t
  end
end

function M.active() return depth > 0 end

function M.enter()
  depth = depth + 1
  return count
end

-- Tensors are found directly or inside returned tables, up to three levels deep
-- (a DTensor, a table of outputs, a table of DTensors).
local function mark_escaping(value, flag, level)
  if type(value) ~= "table" then return end
  if rawget(value, "_c") ~= nil then
    value._escaping = flag
    return
  end
  if level >= 3 or getmetatable(value) and rawget(getmetatable(value), "__released") then
    return
  end
  for _, v in pairs(value) do
    if type(v) == "table" then mark_escaping(v, flag, level + 1) end
  end
end

-- Close the scope opened at mark. Values in results (tensors, or tables holding tensors)
-- survive and move to the enclosing scope; every other tensor created since mark is
-- released unless it was marked kept (t._keep).
function M.exit(mark, results, nresults)
  depth = depth - 1
  for i = 1, nresults do mark_escaping(results[i], true, 0) end
  local survivors = mark
  for i = mark + 1, count do
    local t = tracked[i]
    tracked[i] = nil
    if rawget(t, "_escaping") then
      if depth > 0 then
        survivors = survivors + 1
        tracked[survivors] = t
      end
    elseif not t._keep and rawget(t, "_c") ~= nil then
      t:_release()
    end
  end
  count = survivors
  for i = 1, nresults do mark_escaping(results[i], nil, 0) end
end

local NONE, few = {}, {}

-- Close the scope opened at mark with what pcall (or xpcall) of its body returned: the error
-- again, or the body's results, which escape it. Up to 4 results (a module's output, a
-- backward's gradients) need no new table of results, which LuaJIT cannot compile ({...}).
function M.close(mark, ok, ...)
  if not ok then
    M.exit(mark, NONE, 0)
    error((...), 0)
  end
  local n = select("#", ...)
  if n > 4 then
    M.exit(mark, {...}, n)
    return ...
  end
  local a, b, c, d = ...
  few[1], few[2], few[3], few[4] = a, b, c, d
  M.exit(mark, few, n)
  few[1], few[2], few[3], few[4] = nil, nil, nil, nil
  if n == 0 then return end
  if n == 1 then return a end
  if n == 2 then return a, b end
  if n == 3 then return a, b, c end
  return a, b, c, d
end

-- Run fn(...) in a scope; its return values escape, its other temporaries are released.
function M.run(fn, ...)
  local mark = M.enter()
  return M.close(mark, pcall(fn, ...))
end

-- Stop tracking t: it lives until released explicitly or collected.
function M.keep(t)
  t._keep = true
  return t
end

return M
