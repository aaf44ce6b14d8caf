-- Cumulative activation-checkpointing counters: regions recomputed, op outputs a selective
-- policy handed back instead of recomputing them, last ops a recomputation skipped (its
-- early stop before the final GEMM), regions run with activation offload, and bytes of saved
-- activations packed to the host pool.
local M = {}

local names = {"recomputed", "reused_outputs", "skipped_ops", "offload_regions", "offloaded_bytes"}
local counters = {}
for _, name in ipairs(names) do counters[name] = 0 end

function M.add_recomputed(n) counters.recomputed = counters.recomputed + n end
function M.add_reused_output() counters.reused_outputs = counters.reused_outputs + 1 end
function M.add_skipped_op() counters.skipped_ops = counters.skipped_ops + 1 end
function M.add_offload_region() counters.offload_regions = counters.offload_regions + 1 end
function M.add_offloaded(bytes) counters.offloaded_bytes = counters.offloaded_bytes + bytes end
function M.snapshot()
  local copy = {}
  for _, name in ipairs(names) do copy[name] = counters[name] end
  return copy
end
function M.reset() for _, name in ipairs(names) do counters[name] = 0 end end

return M
