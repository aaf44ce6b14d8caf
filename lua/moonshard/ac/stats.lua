-- Cumulative activation-checkpointing counters: regions recomputed and bytes of saved
-- activations packed to the host pool.
local M = {}

local counters = {recomputed = 0, offloaded_bytes = 0}

function M.add_recomputed(n) counters.recomputed = counters.recomputed + n end
function M.add_offloaded(bytes) counters.offloaded_bytes = counters.offloaded_bytes + bytes end
function M.snapshot() return {recomputed = counters.recomputed, offloaded_bytes = counters.offloaded_bytes} end
function M.reset() counters.recomputed, counters.offloaded_bytes = 0, 0 end

return M
