-- moonshard plot metrics.jsonl: the loss curve of a metrics file (one JSON object per
-- line with "step" and "loss", as examples/train.lua writes) drawn by gnuplot into a PNG.
local args = require "moonshard.cli.args"
local json = require "moonshard.cli.json"

local M = {}

M.usage = [[
usage: moonshard plot METRICS.jsonl [-o OUT.png] [--title TEXT]

Reads one JSON object per line (fields "step" and "loss"; other fields are ignored) and
draws loss against step with gnuplot (Debian package gnuplot-nox).

  -o OUT.png     the image to write (default: METRICS with .png instead of .jsonl)
  --title TEXT   the plot's title (default: the metrics file name)
  --help         this text
]]

-- The (step, loss) points of a metrics file, in file order.
function M.read_points(path)
  local file, err = io.open(path, "r")
  if not file then error(("cannot read %s: %s"):format(path, tostring(err)), 0) end
  local points, number = {}, 0
  for line in file:lines() do
    number = number + 1
    if line:match("%S") then
      local ok, record = pcall(json.decode, line)
      if not ok then file:close() error(("%s:%d: %s"):format(path, number, record), 0) end
      if type(record) ~= "table" or type(record.step) ~= "number" or type(record.loss) ~= "number" then
        file:close()
        error(("%s:%d: expected an object with numeric \"step\" and \"loss\""):format(path, number), 0)
      end
      points[#points + 1] = {record.step, record.loss}
    end
  end
  file:close()
  if #points == 0 then error(path .. " has no metrics lines", 0) end
  return points
end

local function quoted(text) return "'" .. text:gsub("'", "''") .. "'" end

function M.main(argv)
  local opts, positional = args.parse(argv, {["-o"] = "string", ["--title"] = "string", ["--help"] = "flag"})
  if opts.help then io.stdout:write(M.usage) return 0 end
  local path = positional[1]
  if not path then args.usage_error("no metrics file given") end
  if #positional > 1 then args.usage_error("expected one metrics file, got %d", #positional) end
  local points = M.read_points(path)
  local status = os.execute("command -v gnuplot >/dev/null 2>&1")
  if status ~= 0 and status ~= true then
    error("gnuplot is not installed (Debian: apt-get install gnuplot-nox; tools/setup.sh installs it)", 0)
  end
  local output = opts.o or (path:gsub("%.jsonl$", "") .. ".png")
  local data_path = os.tmpname()
  local data = assert(io.open(data_path, "w"))
  for _, p in ipairs(points) do data:write(("%.17g %.17g\n"):format(p[1], p[2])) end
  data:close()
  local script = table.concat({
    "set terminal pngcairo size 900,540 enhanced font 'sans,11'",
    "set output " .. quoted(output),
    "set title " .. quoted(opts.title or path) .. " noenhanced",
    "set xlabel 'step'", "set ylabel 'loss'", "set grid", "set key off",
    "plot " .. quoted(data_path) .. " using 1:2 with lines linewidth 2 linecolor rgb '#1f77b4'",
  }, "\n")
  local gnuplot = io.popen("gnuplot 2>&1", "w")
  gnuplot:write(script, "\n")
  local ok, _, code = gnuplot:close()
  os.remove(data_path)
  if not ok and code ~= 0 then error(("gnuplot failed (status %s) writing %s"):format(tostring(code), output), 0) end
  local image = io.open(output, "rb")
  if not image then error("gnuplot did not write " .. output, 0) end
  image:close()
  io.stdout:write(("wrote %s (%d points, loss %.4g -> %.4g)\n"):format(output, #points, points[1][2], points[#points][2]))
  return 0
end

return M
