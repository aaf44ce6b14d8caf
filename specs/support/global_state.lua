-- Process-wide settings a spec may change (default dtype, random state, thread count, grad
-- mode): a spec file that changes them saves them before and restores them after each test:
--   before_each(global_state.save); after_each(global_state.restore)
-- (a setup block that changes them ends with global_state.restore(): it runs before the
-- first save).
local ms = require "moonshard"
local finally = require "moonshard.finally"

local M = {}

local function snapshot()
  return {dtype = ms.get_default_dtype(), rng = ms.get_rng_state(), threads = ms.get_num_threads(),
          grad = ms.is_grad_enabled()}
end

local function restore(s)
  ms.set_default_dtype(s.dtype)
  ms.set_rng_state(s.rng)
  ms.set_num_threads(s.threads)
  ms.set_grad_enabled(s.grad)
end

local saved = snapshot()

-- fn(...)'s results, the settings restored afterwards (also when fn raises).
function M.preserving(fn, ...)
  local before = snapshot()
  return finally(function() restore(before) end, fn, ...)
end

function M.save() saved = snapshot() end
function M.restore() restore(saved) end

return M
