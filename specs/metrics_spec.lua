-- Honest metrics: a diverging run of examples/train.lua warns once and keeps metrics.jsonl
-- valid JSON (null for nan/inf, named in "nonfinite"); moonshard plot draws the finite
-- points and marks the others; a plot into a missing folder is an error, never PNG bytes
-- on the terminal.
local json = require "dkjson"

local function sh(command)
  local pipe = io.popen("(" .. command .. ") 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output:gsub("exit=%d+%s*$", "")
end

local function lines_of(path)
  local lines = {}
  for line in io.lines(path) do lines[#lines + 1] = line end
  return lines
end

describe("metrics of a diverging run", function()
  local out, status, output

  setup(function()
    out = os.tmpname()
    os.remove(out)
    -- a learning rate of 1e30 turns the loss into nan from the second step on
    status, output = sh("luajit examples/train.lua --nproc 1 --steps 6 --lr 1e30 --layers 1 --dim 16 " ..
                        "--heads 2 --seq 16 --batch 4 --sample 0 --ac none --log-every 1 --out " .. out)
  end)

  teardown(function() sh("rm -rf " .. out) end)

  it("warn once and stay valid JSON, with the non-finite values named", function()
    assert.equal(0, status, output)
    local _, warnings = output:gsub("train: warning: loss is nan at step 2", "")
    assert.equal(1, warnings, output)
    assert.equal(1, select(2, output:gsub("train: warning:", "")), output)
    local lines = lines_of(out .. "/metrics.jsonl")
    assert.equal(6, #lines)
    for i, line in ipairs(lines) do
      -- JSON has no nan/inf literals; every line is one complete object
      assert.falsy(line:find("[:,%[]%s*%-?[nNiI][naNAf]"), line)
      local record, stop, problem = json.decode(line, 1, json.null)
      assert.is_nil(problem, line)
      assert.equal(#line + 1, stop, line)
      assert.equal(i, record.step)
      if i == 1 then
        assert.is_true(record.loss > 3 and record.loss < 6, line)
        assert.is_nil(record.nonfinite)
      else
        assert.equal(json.null, record.loss, line)
        assert.same({loss = "nan"}, record.nonfinite)
      end
    end
  end)

  it("plot draws the finite points and marks the rest", function()
    local png = out .. "/loss.png"
    local plotted, text = sh("bin/moonshard plot " .. out .. "/metrics.jsonl -o " .. png)
    assert.equal(0, plotted, text)
    assert.truthy(text:find("(1 points, loss ", 1, true), text)
    assert.truthy(text:find("5 non-finite marked", 1, true), text)
    local image = assert(io.open(png, "rb"))
    assert.equal("\137PNG\r\n\26\n", image:read(8))
    image:close()
  end)

  it("plot into a missing folder is a clear error and writes no PNG to the terminal", function()
    local plotted, text = sh("bin/moonshard plot " .. out .. "/metrics.jsonl -o " .. out .. "/missing/loss.png")
    assert.equal(1, plotted, text)
    assert.truthy(text:find("moonshard plot: cannot write " .. out .. "/missing/loss.png: No such file or directory",
                            1, true), text)
    assert.falsy(text:find("PNG", 1, true), text)
  end)
end)

describe("moonshard plot", function()
  it("marks every step of a file without a finite loss and names a bad line", function()
    local path = os.tmpname()
    local file = assert(io.open(path, "w"))
    file:write('{"step": 1, "loss": null}\n{"step": 2, "loss": null}\n')
    file:close()
    local plotted, text = sh("bin/moonshard plot " .. path .. " -o " .. path .. ".png")
    assert.equal(0, plotted, text)
    assert.truthy(text:find("(0 points, no finite loss, 2 non-finite marked)", 1, true), text)
    file = assert(io.open(path, "w"))
    file:write('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": NaN}\n')
    file:close()
    plotted, text = sh("bin/moonshard plot " .. path .. " -o " .. path .. ".png")
    assert.equal(1, plotted, text)
    assert.truthy(text:find(path .. ":2:", 1, true), text)
    os.remove(path)
    os.remove(path .. ".png")
  end)
end)
