-- bench/compare.sh's tables: one pair's ratios (pair DIR K), or over pairs 1..K the medians
-- and ranges of both step times and of the per-pair ratio (summary DIR K). JSON lines.
-- DIR holds ours.K (bench/fsdp.lua's lines) and theirs.K (bench/torch_fsdp.py's).
-- bound_ratio is the lowest ratio any program could reach on the pair's machine: moonshard's
-- FLOPs per step at the sgemm rate measured in the same run (step_ms x flop_fraction), over
-- PyTorch's step; a target below it asks for GEMMs faster than the machine's sgemm.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local emit = require("bench.support").emit

local mode, dir, count = arg[1], arg[2], tonumber(arg[3])

-- step_ms by "model/strategy/world_size" of one run's output, and the step at the sgemm rate
-- (step_ms x flop_fraction) by the same keys.
local function read(path)
  local rows, bounds = {}, {}
  for line in io.lines(path) do
    local model = line:match('"model":%s*"([^"]+)"')
    local strategy = line:match('"strategy":%s*"([^"]+)"')
    local size = line:match('"world_size":%s*(%d+)')
    local ms = tonumber(line:match('"step_ms":%s*([%d.e+-]+)'))
    local fraction = tonumber(line:match('"flop_fraction":%s*([%d.e+-]+)'))
    if model and strategy and size and ms then
      local key = model .. "/" .. strategy .. "/" .. size
      rows[key], bounds[key] = ms, fraction and ms * fraction
    end
  end
  return rows, bounds
end

local function sorted_keys(ours, theirs)
  local keys = {}
  for key in pairs(ours) do if theirs[key] then keys[#keys + 1] = key end end
  table.sort(keys)
  return keys
end

local function median(values)
  local s = {unpack(values)}
  table.sort(s)
  local n = #s
  return n % 2 == 1 and s[(n + 1) / 2] or (s[n / 2] + s[n / 2 + 1]) / 2
end


local ORDER = {"bench", "pair", "pairs", "model", "strategy", "world_size", "moonshard_ms", "torch_ms", "ratio",
               "bound_ratio", "moonshard_ms_min", "moonshard_ms_max", "torch_ms_min", "torch_ms_max", "ratio_min", "ratio_max"}

local function fields(key)
  local model, strategy, size = key:match("([^/]+)/([^/]+)/(%d+)")
  return {model = model, strategy = strategy, world_size = tonumber(size)}
end

if mode == "pair" then
  local ours, bounds = read(dir .. "/ours." .. count)
  local theirs = read(dir .. "/theirs." .. count)
  for _, key in ipairs(sorted_keys(ours, theirs)) do
    local row = fields(key)
    row.bench, row.pair = "compare_pair", count
    row.moonshard_ms, row.torch_ms, row.ratio = ours[key], theirs[key], ours[key] / theirs[key]
    row.bound_ratio = bounds[key] and bounds[key] / theirs[key]
    emit(row, ORDER)
  end
elseif mode == "summary" then
  local by_key = {}
  for pair = 1, count do
    local ours, bounds = read(dir .. "/ours." .. pair)
    local theirs = read(dir .. "/theirs." .. pair)
    for _, key in ipairs(sorted_keys(ours, theirs)) do
      local b = by_key[key] or {ours = {}, theirs = {}, ratio = {}, bound = {}}
      by_key[key] = b
      table.insert(b.ours, ours[key])
      table.insert(b.theirs, theirs[key])
      table.insert(b.ratio, ours[key] / theirs[key])
      if bounds[key] then table.insert(b.bound, bounds[key] / theirs[key]) end
    end
  end
  local keys = {}
  for key in pairs(by_key) do keys[#keys + 1] = key end
  table.sort(keys)
  for _, key in ipairs(keys) do
    local b, row = by_key[key], fields(key)
    row.bench, row.pairs = "compare", #b.ratio
    row.moonshard_ms, row.torch_ms, row.ratio = median(b.ours), median(b.theirs), median(b.ratio)
    row.bound_ratio = #b.bound > 0 and median(b.bound) or nil
    for name, values in pairs({moonshard_ms = b.ours, torch_ms = b.theirs, ratio = b.ratio}) do
      row[name .. "_min"], row[name .. "_max"] = math.min(unpack(values)), math.max(unpack(values))
    end
    emit(row, ORDER)
  end
else
  io.stderr:write("usage: luajit bench/compare_rows.lua pair|summary DIR K\n")
  os.exit(2)
end
