-- finally(cleanup, fn, ...): run fn(...), then cleanup() whether it returned or raised; give
-- back fn's results (every one, nils included) or raise its error again, unchanged.
local function finish(cleanup, ok, ...)
  cleanup()
  if not ok then error((...), 0) end
  return ...
end

return function(cleanup, fn, ...)
  return finish(cleanup, pcall(fn, ...))
end
