-- examples/train.lua end to end at tiny sizes, as separate processes on forked ranks:
-- the loss starts at ln(vocab) and falls, the store holds the saved steps, an interrupted
-- run resumed from its store ends bit-identical to an uninterrupted one, bad options fail.
local ms = require "moonshard"

local TINY = "--nproc 2 --batch 8 --seq 16 --layers 1 --dim 16 --heads 2 --lr 0.01 --log-every 100"

local ROOT = io.popen("pwd"):read("*l")

local function run(args)
  local pipe = io.popen("luajit examples/train.lua " .. args .. " 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output
end

local function temp_dir()
  local dir = os.tmpname()
  os.remove(dir)
  return dir
end

local function metrics(path)
  local rows = {}
  for line in io.lines(path) do
    local record = assert(require("dkjson").decode(line), line)
    rows[#rows + 1] = {step = record.step, loss = record.loss}
  end
  return rows
end

-- The number of distinct characters of the corpus, counted here independently.
local function corpus_vocab()
  local file = assert(io.open("examples/data/shakespeare.txt", "rb"))
  local text = file:read("*a")
  file:close()
  local seen, count = {}, 0
  for i = 1, #text do
    local b = text:byte(i)
    if not seen[b] then seen[b], count = true, count + 1 end
  end
  return count, text
end

describe("examples/train.lua", function()
  it("rejects unknown options and bad values with a message naming them", function()
    local cases = {
      {"--stepz 3", "unknown option '--stepz'"},
      {"--steps three", "--steps needs an integer, got 'three'"},
      {"--ac sometimes", "unknown --ac 'sometimes'"},
      {"--strategy ZERO3", "unknown --strategy 'ZERO3'"},
      {"--dim 30 --heads 4", "--heads 4 must divide --dim 30"},
      {"--resume", "--resume needs --ckpt DIR"},
    }
    for _, case in ipairs(cases) do
      local status, output = run(case[1])
      assert.equal(2, status, case[1])
      assert.truthy(output:find(case[2], 1, true), output)
    end
  end)

  it("rejects an unusable --ckpt and out-of-range values before training, naming the option", function()
    local file = os.tmpname()
    local base = "--nproc 2 --batch 8 --seq 16 --layers 1 --dim 16 --heads 2 --steps 1 --out " .. temp_dir()
    local cases = {
      {"--ckpt /proc/nope --save-every 0", "--ckpt /proc/nope: cannot create the directory"},
      {"--ckpt " .. file, "--ckpt " .. file .. " is a file, not a directory"},
      {"--ckpt /proc", "--ckpt /proc: cannot write into the directory"},
      {"--lr nan", "--lr must be a positive finite number, got nan"},
      {"--lr inf", "--lr must be a positive finite number, got inf"},
      {"--seed -1", "--seed must be a non-negative integer, got -1"},
      {"--log-every 0", "--log-every must be at least 1, got 0"},
      {"--log-every -2", "--log-every must be at least 1, got -2"},
      {"--sample -1", "--sample must be >= 0 (0: no sample), got -1"},
    }
    for _, case in ipairs(cases) do
      local status, output = run(base .. " " .. case[1])
      assert.equal(2, status, case[1] .. "\n" .. output)
      assert.truthy(output:find("train: " .. case[2], 1, true), output)
      assert.falsy(output:find("traceback", 1, true), output)
    end
    os.remove(file)
  end)

  it("prints its options with --help", function()
    local status, output = run("--help")
    assert.equal(0, status)
    for _, option in ipairs({"--nproc", "--strategy", "--ac", "--steps", "--batch", "--seq", "--layers", "--dim",
                             "--lr", "--ckpt", "--save-every", "--resume", "--seed"}) do
      assert.truthy(output:find(option, 1, true), option)
    end
  end)

  it("runs from another directory, with its data found next to it", function()
    local out = temp_dir()
    -- a library named relative to the repository (the sanitizer runs') named from /
    local lib = os.getenv("MOONSHARD_LIB")
    local lib_env = lib and ("MOONSHARD_LIB=" .. (lib:sub(1, 1) == "/" and lib or ROOT .. "/" .. lib) .. " ") or ""
    local pipe = io.popen("cd / && env -u LUA_PATH " .. lib_env .. "luajit " .. ROOT .. "/examples/train.lua --nproc 1 --steps 2 " ..
                          "--batch 2 --seq 16 --layers 1 --dim 16 --heads 2 --ac none --sample 0 --out " .. out ..
                          " 2>&1; echo \"exit=$?\"")
    local output = pipe:read("*a")
    pipe:close()
    assert.are.equal("0", output:match("exit=(%d+)%s*$"), output)
    assert.are.equal(2, #metrics(out .. "/metrics.jsonl"))
    os.execute("rm -rf " .. out)
  end)

  it("fails clearly when the global batch does not split over the ranks", function()
    local status, output = run(TINY .. " --batch 5 --steps 1 --sample 0 --out " .. temp_dir())
    assert.equal(1, status)
    assert.truthy(output:find("--batch 5 must be a multiple of the number of ranks (2)", 1, true), output)
  end)

  it("fails clearly when --resume finds no store", function()
    local missing = temp_dir()
    local status, output = run(TINY .. " --steps 2 --sample 0 --resume --ckpt " .. missing .. " --out " .. temp_dir())
    assert.equal(1, status)
    assert.truthy(output:find(missing .. ": no such checkpoint directory", 1, true), output)
  end)

  it("makes its --out directory whatever characters the path holds", function()
    local parent = temp_dir()
    local out = parent .. "/it's a \"run\"; touch " .. parent .. "/escaped"
    local quoted = "'" .. out:gsub("'", "'\\''") .. "'"
    local status, output = run(TINY .. " --steps 1 --sample 0 --out " .. quoted)
    assert.equal(0, status, output)
    assert.is_truthy(io.open(out .. "/metrics.jsonl"), "no metrics in " .. out)
    assert.is_nil(io.open(parent .. "/escaped"), "a shell ran a command from the path")
    os.execute("rm -rf '" .. parent .. "'")
  end)

  describe("training #slow", function()
    local out, ckpt

    setup(function()
      out, ckpt = temp_dir(), temp_dir()
    end)

    teardown(function()
      os.execute("rm -rf '" .. out .. "' '" .. ckpt .. "'")
    end)

    it("starts at the uniform-prediction loss, falls, saves the steps and samples text", function()
      local status, output = run(TINY .. " --steps 12 --save-every 6 --sample 40 --ckpt " .. ckpt .. " --out " .. out)
      assert.equal(0, status, output)
      local rows = metrics(out .. "/metrics.jsonl")
      assert.equal(12, #rows)
      for i, row in ipairs(rows) do assert.equal(i, row.step) end
      local vocab, text = corpus_vocab()
      -- near-zero initial weights predict every character with probability 1/vocab
      assert.is_true(math.abs(rows[1].loss - math.log(vocab)) < 0.05,
                     ("first loss %.4f, ln(%d) = %.4f"):format(rows[1].loss, vocab, math.log(vocab)))
      local first = (rows[1].loss + rows[2].loss + rows[3].loss) / 3
      local last = (rows[10].loss + rows[11].loss + rows[12].loss) / 3
      assert.is_true(last < first - 0.3, ("loss fell from %.4f to %.4f only"):format(first, last))
      assert.truthy(output:find("step%s+12/12"), output)
      assert.truthy(output:find("tok/s", 1, true))
      assert.truthy(output:find("mem ", 1, true))

      local store = ms.dcp.open(ckpt)
      assert.same({6, 12}, store:steps())
      assert.equal(12, store:read("step", 12))
      local wte = store:read("model.transformer.wte.weight", 12)
      assert.same({vocab, 16}, {wte:size(0), wte:size(1)})
      assert.same({}, store:verify())
      store:close()

      local sample = assert(io.open(out .. "/sample.txt")):read("*a"):gsub("\n$", "")
      assert.equal(40, #sample)
      for i = 1, #sample do
        assert.truthy(text:find(sample:sub(i, i), 1, true), "sampled a character not in the corpus")
      end
    end)

    it("resumes an interrupted run to the same losses and the same weights", function()
      local interrupted, interrupted_out = temp_dir(), temp_dir()
      local args = TINY .. " --steps 12 --save-every 6 --sample 0 --ckpt " .. interrupted .. " --out " .. interrupted_out
      local status, output = run(args .. " --stop-after 6")
      assert.equal(0, status, output)
      assert.same({6}, (function() local s = ms.dcp.open(interrupted); local st = s:steps(); s:close(); return st end)())
      status, output = run(args .. " --resume")
      assert.equal(0, status, output)
      assert.truthy(output:find("step%s+7/12"), output)

      local full_rows, resumed_rows = metrics(out .. "/metrics.jsonl"), metrics(interrupted_out .. "/metrics.jsonl")
      assert.equal(12, #resumed_rows)
      for i = 1, 12 do
        assert.equal(full_rows[i].step, resumed_rows[i].step)
        assert.equal(full_rows[i].loss, resumed_rows[i].loss, "loss of step " .. i)
      end
      local a, b = ms.dcp.open(ckpt), ms.dcp.open(interrupted)
      local compared = 0
      for _, e in ipairs(a:entries(12)) do
        if e.kind == "tensor" then
          local ta, tb = a:read(e.fqn, 12), b:read(e.fqn, 12)
          assert.is_true(ms.equal(ta, tb), e.fqn .. " differs after resuming")
          compared = compared + 1
        end
      end
      assert.is_true(compared > 20)
      a:close(); b:close()
      os.execute("rm -rf '" .. interrupted .. "' '" .. interrupted_out .. "'")
    end)

    it("refuses to write into a store that already holds steps unless resuming", function()
      local status, output = run(TINY .. " --steps 12 --sample 0 --ckpt " .. ckpt .. " --out " .. temp_dir())
      assert.equal(1, status)
      assert.truthy(output:find("the store " .. ckpt .. " already holds steps 6, 12; continue it with --resume", 1, true), output)
      assert.falsy(output:find("stack traceback", 1, true), output)
    end)

    it("feeds each rank its slice of the global batch: 1, 2 and 4 ranks reach the same losses", function()
      local reference
      for _, ranks in ipairs({1, 2, 4}) do
        local dir = temp_dir()
        local status, output = run(TINY:gsub("--nproc 2", "--nproc " .. ranks) .. " --steps 6 --sample 0 --out " .. dir)
        assert.equal(0, status, output)
        local rows = metrics(dir .. "/metrics.jsonl")
        reference = reference or rows
        for step = 1, 6 do
          assert.is_true(math.abs(reference[step].loss - rows[step].loss) < 1e-5,
                         ("%d ranks, step %d: %.6f vs %.6f on one rank"):format(ranks, step, rows[step].loss, reference[step].loss))
        end
        os.execute("rm -rf '" .. dir .. "'")
      end
    end)

    it("trains to the same losses with every sharding strategy", function()
      local reference
      for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"}) do
        local dir = temp_dir()
        local status, output = run(TINY:gsub("--nproc 2", "--nproc 4") .. " --steps 3 --sample 0 --strategy " .. strategy .. " --out " .. dir)
        assert.equal(0, status, output)
        local rows = metrics(dir .. "/metrics.jsonl")
        reference = reference or rows
        for step = 1, 3 do
          assert.is_true(math.abs(reference[step].loss - rows[step].loss) < 1e-5, strategy .. " step " .. step)
        end
        os.execute("rm -rf '" .. dir .. "'")
      end
    end)

    it("runs unchanged under mpirun, to the losses it reaches on forked ranks", function()
      local dir = temp_dir()
      local pipe = io.popen("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n 2 " ..
                            "luajit examples/train.lua " .. TINY .. " --steps 12 --sample 0 --out " .. dir ..
                            " 2>&1; echo \"exit=$?\"")
      local output = pipe:read("*a")
      pipe:close()
      assert.truthy(output:find("exit=0", 1, true), output)
      local under_mpi, forked = metrics(dir .. "/metrics.jsonl"), metrics(out .. "/metrics.jsonl")
      assert.equal(12, #under_mpi)
      for step = 1, 12 do assert.equal(forked[step].loss, under_mpi[step].loss, "step " .. step) end
      os.execute("rm -rf '" .. dir .. "'")
    end)

    it("trains to the same losses with every --ac mode", function()
      local losses = {}
      for _, mode in ipairs({"none", "full", "selective", "offload"}) do
        local dir = temp_dir()
        local status, output = run(TINY .. " --steps 3 --sample 0 --ac " .. mode .. " --out " .. dir)
        assert.equal(0, status, output)
        losses[mode] = metrics(dir .. "/metrics.jsonl")
        os.execute("rm -rf '" .. dir .. "'")
      end
      for _, mode in ipairs({"full", "selective", "offload"}) do
        for step = 1, 3 do assert.equal(losses.none[step].loss, losses[mode][step].loss, mode .. " step " .. step) end
      end
    end)
  end)

  describe("--dtype", function()
    local function losses_of(dir)
      local out = {}
      for i, row in ipairs(metrics(dir .. "/metrics.jsonl")) do out[i] = row.loss end
      return out
    end

    -- finite throughout, and the last two steps' mean below the first two's
    local function assert_finite_falling(losses, what)
      for i, loss in ipairs(losses) do
        assert.is_true(loss == loss and loss > 0 and loss < math.huge, what .. " step " .. i .. ": " .. tostring(loss))
      end
      local n = #losses
      assert.is_true((losses[n] + losses[n - 1]) / 2 < (losses[1] + losses[2]) / 2 - 0.05,
                     what .. " loss did not fall: " .. table.concat(losses, ", "))
    end

    -- every model tensor of step in the store is f32 (the masters), and how many there are
    local function model_dtypes(store, step)
      local count, others = 0, {}
      for _, e in ipairs(store:entries(step)) do
        if e.kind == "tensor" and e.fqn:match("^model%.") then
          count = count + 1
          if e.dtype ~= "f32" then others[#others + 1] = e.fqn .. " " .. tostring(e.dtype) end
        end
      end
      return count, others
    end

    local function scaler_state(store, step)
      local out = {}
      for _, e in ipairs(store:entries(step)) do
        if e.fqn:match("^scaler%.") then out[e.fqn] = store:read(e.fqn, step) end
      end
      return out
    end

    it("refuses an unknown dtype", function()
      local status, output = run("--dtype f8")
      assert.equal(2, status)
      assert.truthy(output:find("unknown --dtype 'f8' (expected f32, bf16 or f16)", 1, true), output)
    end)

    it("bf16 trains to a finite falling loss and checkpoints f32 masters without a scaler", function()
      local dir, ckpt = temp_dir(), temp_dir()
      local status, output = run(TINY .. " --dtype bf16 --steps 6 --save-every 6 --sample 0 --ckpt " .. ckpt .. " --out " .. dir)
      assert.equal(0, status, output)
      local losses = losses_of(dir)
      assert.equal(6, #losses)
      assert_finite_falling(losses, "bf16")
      local store = ms.dcp.open(ckpt)
      local count, others = model_dtypes(store, 6)
      assert.is_true(count > 10)
      assert.same({}, others)
      assert.same({}, scaler_state(store, 6))
      store:close()
      os.execute("rm -rf '" .. dir .. "' '" .. ckpt .. "'")
    end)

    it("f16 trains with the GradScaler, checkpoints its state and resumes it bitwise", function()
      local full, full_ckpt, part, part_ckpt = temp_dir(), temp_dir(), temp_dir(), temp_dir()
      local common = TINY .. " --dtype f16 --steps 6 --save-every 3 --sample 0"
      local status, output = run(common .. " --ckpt " .. full_ckpt .. " --out " .. full)
      assert.equal(0, status, output)
      local losses = losses_of(full)
      assert.equal(6, #losses)
      assert_finite_falling(losses, "f16")
      status, output = run(common .. " --ckpt " .. part_ckpt .. " --out " .. part .. " --stop-after 3")
      assert.equal(0, status, output)
      status, output = run(common .. " --ckpt " .. part_ckpt .. " --out " .. part .. " --resume")
      assert.equal(0, status, output)
      assert.same(losses, losses_of(part))

      local a, b = ms.dcp.open(full_ckpt), ms.dcp.open(part_ckpt)
      local count, others = model_dtypes(a, 6)
      assert.is_true(count > 10)
      assert.same({}, others)
      local scaler = scaler_state(a, 6)
      -- a GradScaler's state: its scale (a power of two) and the steps since it last changed,
      -- which only a restored scaler carries on from 3 to 6 steps
      assert.is_number(scaler["scaler.scale"])
      assert.equal(0, math.log(scaler["scaler.scale"]) / math.log(2) % 1)
      assert.is_number(scaler["scaler._growth_tracker"])
      assert.is_true(scaler["scaler._growth_tracker"] > 3, "growth tracker " .. tostring(scaler["scaler._growth_tracker"]))
      assert.same(scaler, scaler_state(b, 6))
      for _, e in ipairs(a:entries(6)) do
        if e.kind == "tensor" then assert.is_true(ms.equal(a:read(e.fqn, 6), b:read(e.fqn, 6)), e.fqn .. " differs after resuming") end
      end
      a:close(); b:close()
      os.execute("rm -rf '" .. full .. "' '" .. full_ckpt .. "' '" .. part .. "' '" .. part_ckpt .. "'")
    end)
  end)
end)
