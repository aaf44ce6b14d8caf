-- moonshard plot metrics.jsonl: the loss curve of a metrics file (one JSON object per
-- line with "step" and "loss", as examples/train.lua writes) drawn by gnuplot into a PNG.
local args = require "moonshard.cli.args"
local json = require "dkjson"

local M = {}

M.usage = [[
usage: moonshard plot METRICS.jsonl [-o OUT.png] [--title TEXT]

Reads one JSON object per line (fields "step" and "loss"; other fields are ignored) and
draws loss against step with gnuplot (Debian package gnuplot-nox). A loss recorded as null
(a nan or inf loss, as examples/train.lua records it) is not drawn: its step is marked by a
red dashed line and counted.

  -o OUT.png     the image to write (default: METRICS with .png instead of .jsonl)
  --title TEXT   the plot's title (default: the metrics file name)
  --help         this text
]]

-- The steps of a metrics file, in file order: {step, loss} with loss nil where the file
-- holds null (or a number too large for a double).
function M.read_points(path)
  local file, err = io.open(path, "r")
  if not file then error(("cannot read %s: %s"):format(path, tostring(err)), 0) end
  local points, number = {}, 0
  for line in file:lines() do
    number = number + 1
    if line:match("%S") then
      local record, stop, problem = json.decode(line, 1, json.null)
      if problem == nil and line:find("%S", stop) then
        problem = ("trailing characters at column %d"):format(line:find("%S", stop))
      end
      if problem then file:close() error(("%s:%d: %s"):format(path, number, problem), 0) end
      local loss = type(record) == "table" and record.loss
      if type(record) ~= "table" or type(record.step) ~= "number" or
         (type(loss) ~= "number" and loss ~= json.null) then
        file:close()
        error(("%s:%d: expected an object with numeric \"step\" and \"loss\""):format(path, number), 0)
      end
      local finite = type(loss) == "number" and loss == loss and math.abs(loss) ~= math.huge
      points[#points + 1] = {record.step, finite and loss or nil}
    end
  end
  file:close()
  if #points == 0 then error(path .. " has no metrics lines", 0) end
  return points
end

local function quoted(text) return "'" .. text:gsub("'", "''") .. "'" end

-- The gnuplot script: finite points as a line, each other step as a red dashed mark.
local function gnuplot_script(points, output, title, data_path)
  local lines = {
    "set terminal pngcairo size 900,540 enhanced font 'sans,11'",
    "set output " .. quoted(output),
    "set title " .. quoted(title) .. " noenhanced",
    "set xlabel 'step'", "set ylabel 'loss'", "set grid", "set key off",
    "set offsets graph 0.02, graph 0.02, graph 0.05, graph 0.05",
  }
  local finite, marked = 0, 0
  for _, p in ipairs(points) do
    if p[2] then
      finite = finite + 1
    else
      marked = marked + 1
      lines[#lines + 1] = ("set arrow from %.17g, graph 0 to %.17g, graph 1 nohead dashtype 2 " ..
                           "linecolor rgb '#d62728'"):format(p[1], p[1])
    end
  end
  if marked > 0 then
    lines[#lines + 1] = ("set label %s at graph 0.99, graph 0.96 right textcolor rgb '#d62728'")
      :format(quoted(("%d non-finite loss%s (dashed)"):format(marked, marked == 1 and "" or "es")))
  end
  if finite == 0 then
    lines[#lines + 1] = ("set xrange [%.17g:%.17g]"):format(points[1][1] - 1, points[#points][1] + 1)
    lines[#lines + 1] = "set yrange [0:1]"
    lines[#lines + 1] = "plot NaN notitle"
  else
    lines[#lines + 1] = "plot " .. quoted(data_path) ..
                        " using 1:2 with linespoints linewidth 2 pointtype 7 pointsize 0.4 linecolor rgb '#1f77b4'"
  end
  return table.concat(lines, "\n") .. "\n", finite, marked
end

local function read_all(path)
  local file = io.open(path, "r")
  if not file then return "" end
  local text = file:read("*a")
  file:close()
  return text
end

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
  -- the image's file is opened here first, so a folder that does not exist is our error
  -- (gnuplot would fall back to writing the PNG to the terminal)
  local probe, problem = io.open(output, "wb")
  if not probe then error(("cannot write %s: %s"):format(output, tostring(problem):gsub("^[^:]*: ", "")), 0) end
  probe:close()
  local data_path, script_path, log_path = os.tmpname(), os.tmpname(), os.tmpname()
  local data = assert(io.open(data_path, "w"))
  for _, p in ipairs(points) do -- a blank line breaks the curve at a non-finite step
    data:write(p[2] and ("%.17g %.17g\n"):format(p[1], p[2]) or "\n")
  end
  data:close()
  local script, finite, marked = gnuplot_script(points, output, opts.title or path, data_path)
  local file = assert(io.open(script_path, "w"))
  file:write(script)
  file:close()
  -- only temporary names reach the shell; gnuplot's own output never reaches the terminal
  local ok, _, code = os.execute(("gnuplot %s >/dev/null 2>%s"):format(script_path, log_path))
  local log = read_all(log_path)
  os.remove(data_path); os.remove(script_path); os.remove(log_path)
  if ok ~= 0 and ok ~= true then
    os.remove(output)
    error(("gnuplot failed (status %s) writing %s: %s"):format(tostring(code or ok), output, log), 0)
  end
  local image = io.open(output, "rb")
  local size = image and image:seek("end") or 0
  if image then image:close() end
  if size == 0 then
    os.remove(output)
    error(("gnuplot did not write %s: %s"):format(output, log), 0)
  end
  local first, last
  for _, p in ipairs(points) do
    if p[2] then first = first or p[2]; last = p[2] end
  end
  local summary = first and ("loss %.4g -> %.4g"):format(first, last) or "no finite loss"
  io.stdout:write(("wrote %s (%d points, %s%s)\n"):format(output, finite, summary,
    marked > 0 and (", %d non-finite marked"):format(marked) or ""))
  return 0
end

return M
