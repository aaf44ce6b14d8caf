-- bin/moonshard as a user runs it: the launcher on forked ranks, every ckpt subcommand on
-- a real two-rank store (including a corrupted copy and a missing one), safetensors
-- export checked byte by byte, import back, plots, --help and bad arguments everywhere.
local ffi = require "ffi"
local ms = require "moonshard"

local function moonshard(args, env)
  local pipe = io.popen((env and env .. " " or "") .. "bin/moonshard " .. args .. " 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output
end

local function temp_path(suffix)
  local path = os.tmpname()
  os.remove(path)
  return path .. (suffix or "")
end

local function write_file(path, text)
  local file = assert(io.open(path, "wb"))
  file:write(text)
  file:close()
end

local function read_file(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

-- A store written by two ranks: w [6, 2] sharded by rows (w[i][j] = 2i + j at step 1,
-- one more at step 2), a replicated bias [3] and the step number.
local function make_store(dir)
  ms.dist.spawn(2, function()
    local mesh = ms.dist.init_device_mesh({2})
    for step = 1, 2 do
      local full = ms.arange(12):view(6, 2) + (step - 1)
      local state = {model = {w = ms.distribute_tensor(full, mesh, {ms.Shard(0)}), bias = ms.tensor({0.5, -1, 2})},
                     step = step}
      ms.dcp.save(state, dir, {step = step})
    end
  end)
end

local function run_hello(args)
  local script = temp_path(".lua")
  write_file(script, [[
local ms = require "moonshard"
local t = ms.tensor({ms.dist.get_rank() + 1})
ms.dist.all_reduce(t, "sum")
print(("rank %d of %d sum %d args %s"):format(ms.dist.get_rank(), ms.dist.get_world_size(), t:item(), table.concat(arg, ",")))
if arg[1] == "fail" and ms.dist.get_rank() == 1 then error("rank one gives up") end
if arg[1] == "exit" then os.exit(tonumber(arg[2])) end
]])
  local status, output = moonshard((args:gsub("SCRIPT", script)))
  os.remove(script)
  return status, output
end

describe("moonshard", function()
  it("prints help for itself and every command", function()
    for _, args in ipairs({"--help", "run --help", "ckpt --help", "repl --help", "plot --help", "ckpt show --help"}) do
      local status, output = moonshard(args)
      assert.equal(0, status, args)
      assert.truthy(output:find("usage: moonshard", 1, true), args)
    end
  end)

  it("ckpt without a loadable library: help still prints, a command says why in one line", function()
    local status, output = moonshard("ckpt --help", "MOONSHARD_LIB=/nonexistent/libmoonshard.so")
    assert.are.equal(0, status)
    assert.matches("usage: moonshard ckpt", output)
    status, output = moonshard("ckpt ls /tmp", "MOONSHARD_LIB=/nonexistent/libmoonshard.so")
    assert.are.equal(1, status)
    assert.matches("^moonshard ckpt: cannot load the library /nonexistent/libmoonshard.so", output)
    assert.is_nil(output:find("traceback", 1, true))
  end)

  it("names an unknown command or subcommand and exits with status 2", function()
    local status, output = moonshard("frobnicate")
    assert.equal(2, status)
    assert.truthy(output:find("unknown command 'frobnicate'", 1, true))
    status, output = moonshard("ckpt frobnicate /tmp")
    assert.equal(2, status)
    assert.truthy(output:find("unknown subcommand 'frobnicate'", 1, true))
    status, output = moonshard("ckpt")
    assert.equal(2, status)
    assert.truthy(output:find("no subcommand given", 1, true))
  end)

  describe("run", function()
    it("runs a script on N forked ranks with its arguments", function()
      local status, output = run_hello("run -n 3 SCRIPT a b")
      assert.equal(0, status, output)
      for rank = 0, 2 do
        assert.truthy(output:find(("rank %d of 3 sum 6 args a,b"):format(rank), 1, true), output)
      end
    end)

    it("reports the rank that failed and exits with status 1", function()
      local status, output = run_hello("run -n 2 SCRIPT fail")
      assert.equal(1, status)
      assert.truthy(output:find("[rank 1]", 1, true), output)
      assert.truthy(output:find("rank one gives up", 1, true), output)
    end)

    it("treats os.exit(0) in the script as success and another status as failure", function()
      assert.equal(0, (run_hello("run -n 2 SCRIPT exit 0")))
      local status, output = run_hello("run -n 2 SCRIPT exit 3")
      assert.equal(1, status)
      assert.truthy(output:find("exited with status 3", 1, true), output)
    end)

    it("refuses bad arguments", function()
      local cases = {{"run /tmp/x.lua", 2, "-n N is required"}, {"run -n 0 /tmp/x.lua", 2, "-n must be between 1 and 64"},
                     {"run -n two /tmp/x.lua", 2, "-n needs an integer, got 'two'"}, {"run -n 2", 2, "no script given"},
                     {"run -n 2 /nonexistent/script.lua", 1, "cannot open script '/nonexistent/script.lua'"}}
      for _, case in ipairs(cases) do
        local status, output = moonshard(case[1])
        assert.equal(case[2], status, case[1])
        assert.truthy(output:find(case[3], 1, true), output)
      end
    end)
  end)

  describe("ckpt", function()
    local dir

    setup(function()
      dir = temp_path()
      make_store(dir)
    end)

    teardown(function() os.execute("rm -rf '" .. dir .. "'") end)

    it("ls lists the committed steps with entries, bytes and ranks", function()
      local status, output = moonshard("ckpt ls " .. dir)
      assert.equal(0, status, output)
      assert.truthy(output:find("2 committed steps", 1, true), output)
      -- 3 entries (model.bias, model.w, step), 2 tensors of 60 bytes, written by 2 ranks
      assert.truthy(output:find("%s1%s+3%s+2%s+60 B%s+2\n"), output)
      assert.truthy(output:find("%s2%s+3%s+2%s+60 B%s+2\n"), output)
    end)

    it("show lists a step's entries and draws one entry's rank layout and statistics", function()
      local status, output = moonshard("ckpt show " .. dir .. " --step 1")
      assert.equal(0, status, output)
      assert.truthy(output:find("model.w%s+f32%s+%[6, 2%]"), output)
      assert.truthy(output:find("step%s+number%s+1"), output)

      status, output = moonshard("ckpt show " .. dir .. " model.w --step 1")
      assert.equal(0, status, output)
      assert.truthy(output:find("rank 0%s+rows 0..2 "), output)
      assert.truthy(output:find("rank 1%s+rows 3..5 "), output)
      local sum_of_squares = 0
      for v = 0, 11 do sum_of_squares = sum_of_squares + v * v end
      assert.truthy(output:find(("min 0  max 11  mean 5.5  norm %.6g"):format(math.sqrt(sum_of_squares)), 1, true), output)
      assert.truthy(output:find("checksums ok (2 chunks verified)", 1, true), output)
    end)

    it("show names an entry the step does not have", function()
      local status, output = moonshard("ckpt show " .. dir .. " model.nope")
      assert.equal(1, status)
      assert.truthy(output:find("step 2 has no entry named or starting with 'model.nope'", 1, true), output)
      status, output = moonshard("ckpt show " .. dir .. " --step 7")
      assert.equal(1, status)
      assert.truthy(output:find("has no step 7 (steps: 1, 2)", 1, true), output)
    end)

    it("diff reports the changed tensors and values between two steps", function()
      local status, output = moonshard("ckpt diff " .. dir .. " 1 2")
      assert.equal(0, status, output)
      assert.truthy(output:find("values%s+model.w%s+max |b%-a| 1 "), output)
      assert.truthy(output:find("values%s+step%s+1 %-> 2"), output)
      assert.truthy(output:find("3 entries, 1 unchanged, 2 changed", 1, true), output)
    end)

    it("verify passes a sound store and names the entry of a corrupted chunk", function()
      local status, output = moonshard("ckpt verify " .. dir)
      assert.equal(0, status, output)
      assert.truthy(output:find("step 1: ok (3 chunks)", 1, true), output)
      local copy = temp_path()
      os.execute(("cp -r '%s' '%s'"):format(dir, copy))
      -- rank 1's rows of w at step 2 are the f32 values 7 .. 12; flip a bit in them
      local values = ffi.new("float[6]", {7, 8, 9, 10, 11, 12})
      local pattern = ffi.string(values, 24)
      local shard = copy .. "/shard-1.mdb"
      local bytes = read_file(shard)
      local at = bytes:find(pattern, 1, true)
      assert.truthy(at, "rank 1's chunk was not found in its shard file")
      local file = assert(io.open(shard, "r+b"))
      file:seek("set", at + 5)
      file:write(string.char((bytes:byte(at + 6) + 1) % 256))
      file:close()
      status, output = moonshard("ckpt verify " .. copy)
      assert.equal(1, status)
      assert.truthy(output:find("step 2: model.w:", 1, true), output)
      assert.truthy(output:find("1 damaged entry", 1, true), output)
      os.execute("rm -rf '" .. copy .. "'")
    end)

    it("export writes safetensors with the prefix removed, read back here byte by byte", function()
      local path = temp_path(".safetensors")
      local status, output = moonshard("ckpt export " .. dir .. " " .. path .. " --step 1")
      assert.equal(0, status, output)
      local bytes = read_file(path)
      local header_length = 0
      for i = 8, 1, -1 do header_length = header_length * 256 + bytes:byte(i) end
      local header = bytes:sub(9, 8 + header_length)
      assert.equal(0, (8 + header_length) % 8)
      assert.truthy(header:find('"w":{"data_offsets":[12,60],"dtype":"F32","shape":[6,2]}', 1, true), header)
      assert.truthy(header:find('"bias":{"data_offsets":[0,12],"dtype":"F32","shape":[3]}', 1, true), header)
      assert.truthy(header:find('"__metadata__":{"format":"pt"', 1, true), header)
      assert.falsy(header:find("model.", 1, true))
      local data = bytes:sub(9 + header_length)
      assert.equal(60, #data)
      local floats = ffi.new("float[15]")
      ffi.copy(floats, data, 60)
      local expected = {0.5, -1, 2}
      for v = 0, 11 do expected[#expected + 1] = v end
      for i, v in ipairs(expected) do assert.equal(v, floats[i - 1]) end
      os.remove(path)
    end)

    it("import brings an exported file back into a new store under the prefix", function()
      local path, copy = temp_path(".safetensors"), temp_path()
      assert.equal(0, (moonshard("ckpt export " .. dir .. " " .. path)))
      local status, output = moonshard("ckpt import " .. path .. " " .. copy .. " --prefix weights")
      assert.equal(0, status, output)
      assert.truthy(output:find("as step 0", 1, true), output)
      local original, imported = ms.dcp.open(dir), ms.dcp.open(copy)
      assert.is_true(ms.equal(original:read("model.w", 2), imported:read("weights.w", 0)))
      assert.is_true(ms.equal(original:read("model.bias", 2), imported:read("weights.bias", 0)))
      original:close(); imported:close()
      status, output = moonshard("ckpt import " .. path .. " " .. copy)
      assert.equal(1, status, output)
      assert.truthy(output:find("holds steps up to 0; the import would become the newest step", 1, true), output)
      status, output = moonshard("ckpt import " .. path .. " " .. copy .. " --step 1")
      assert.equal(0, status, output)
      assert.truthy(output:find("as step 1", 1, true), output)
      os.remove(path)
      os.execute("rm -rf '" .. copy .. "'")
    end)

    it("import refuses a file that is not safetensors", function()
      local path = temp_path(".safetensors")
      write_file(path, "\16\0\0\0\0\0\0\0{not json}      ")
      local status, output = moonshard("ckpt import " .. path .. " " .. temp_path())
      assert.equal(1, status)
      assert.truthy(output:find("safetensors: " .. path .. ": the header is not a JSON object", 1, true), output)
      write_file(path, "\200\0\0\0\0\0\0\0{}")
      status, output = moonshard("ckpt import " .. path .. " " .. temp_path())
      assert.equal(1, status)
      assert.truthy(output:find("header length 200 does not fit the file", 1, true), output)
      os.remove(path)
    end)

    it("names a missing store or a directory that is not one", function()
      local missing = temp_path()
      for _, sub in ipairs({"ls", "show", "verify"}) do
        local status, output = moonshard("ckpt " .. sub .. " " .. missing)
        assert.equal(1, status, sub)
        assert.truthy(output:find(missing .. ": no such checkpoint directory", 1, true), output)
      end
      local status, output = moonshard("ckpt ls /tmp")
      assert.equal(1, status)
      assert.truthy(output:find("/tmp is not a moonshard store", 1, true), output)
      status, output = moonshard("ckpt diff " .. dir .. " 1")
      assert.equal(2, status)
      assert.truthy(output:find("diff needs two step numbers", 1, true), output)
      status, output = moonshard("ckpt export " .. dir)
      assert.equal(2, status)
      assert.truthy(output:find("export needs a store directory and an output file", 1, true), output)
    end)
  end)

  describe("plot", function()
    it("writes a PNG of the loss curve", function()
      local metrics, png = temp_path(".jsonl"), temp_path(".png")
      write_file(metrics, '{"step": 1, "loss": 4.2}\n{"step": 2, "loss": 3.1}\n{"step": 3, "loss": 2.5}\n')
      local status, output = moonshard("plot " .. metrics .. " -o " .. png)
      assert.equal(0, status, output)
      assert.truthy(output:find("3 points, loss 4.2 -> 2.5", 1, true), output)
      assert.equal("\137PNG\r\n\26\n", read_file(png):sub(1, 8))
      os.remove(metrics); os.remove(png)
    end)

    it("names the line of a bad metrics file and a missing file", function()
      local metrics = temp_path(".jsonl")
      write_file(metrics, '{"step": 1, "loss": 4.2}\n{"step": 2}\n')
      local status, output = moonshard("plot " .. metrics)
      assert.equal(1, status)
      assert.truthy(output:find(metrics .. ':2: expected an object with numeric "step" and "loss"', 1, true), output)
      os.remove(metrics)
      status, output = moonshard("plot " .. metrics)
      assert.equal(1, status)
      assert.truthy(output:find("cannot read " .. metrics, 1, true), output)
      status, output = moonshard("plot")
      assert.equal(2, status)
      assert.truthy(output:find("no metrics file given", 1, true), output)
    end)
  end)
end)
