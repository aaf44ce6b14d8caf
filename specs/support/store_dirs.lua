-- Checkpoint directories for specs: a fresh path for each test, removed after it, with this
-- process's garbage collected so ranks forked by later tests do not inherit its tensors.
-- In a describe: before_each(store_dirs.before(function(path) dir = path end))
--                after_each(store_dirs.after)
local M = {}

local current

function M.fresh()
  local path = os.tmpname()
  os.remove(path)
  return path .. ".ckpt"
end

function M.before(set)
  return function()
    current = M.fresh()
    set(current)
  end
end

function M.after()
  os.execute("rm -rf '" .. current .. "'")
  collectgarbage()
  collectgarbage()
end

return M
