-- The REPL driven through a pseudo-terminal (util-linux `script`) as a person would use
-- it: over a store (moonshard repl DIR) and over a live model sharded on two forked ranks
-- (ms.repl{model = model}), with completion, history, multi-line input and errors.
local ms = require "moonshard"

local function temp_path(suffix)
  local path = os.tmpname()
  os.remove(path)
  return path .. (suffix or "")
end

-- Run command on a pseudo-terminal with the given keystrokes; returns its screen output
-- with carriage returns and terminal mode switches removed.
local function on_terminal(command, keys, env)
  local input = temp_path(".keys")
  local file = assert(io.open(input, "wb"))
  file:write(keys)
  file:close()
  local pipe = io.popen(("%s timeout 60 script -qec %q /dev/null < %s 2>&1"):format(env or "", command, input))
  local output = pipe:read("*a")
  pipe:close()
  os.remove(input)
  return (output:gsub("\r", ""):gsub("\27%[%?2004[hl]", ""))
end

-- The text the REPL printed after the prompt line holding `line`.
local function after(output, line)
  local prompt_line = "moonshard> " .. line .. "\n"
  local at = output:find(prompt_line, 1, true)
  assert.truthy(at, "the session never ran: " .. line .. "\n" .. output)
  local rest = output:sub(at + #prompt_line)
  return rest:sub(1, (rest:find("moonshard> ", 1, true) or #rest + 1) - 1)
end

local function make_store(dir)
  for _, step in ipairs({5, 7}) do
    ms.dcp.save({model = {w = ms.arange(6):view(3, 2) * (step - 4), bias = ms.tensor({1, 2})}, note = "step " .. step},
                dir, {step = step})
  end
end

describe("the REPL", function()
  local dir, history

  setup(function()
    dir, history = temp_path(), temp_path(".history")
    make_store(dir)
  end)

  teardown(function()
    os.execute("rm -rf '" .. dir .. "'")
    os.remove(history)
  end)

  it("answers helpers, expressions and statements over a store, with completion and history", function()
    local keys = table.concat({
      "steps()", "ls()", 'show("model.w", 5)', 'show("model.b\t")', "diff(5, 7)",
      "=load(\"model.w\"):sum():item()", "t = {name = 'x', sizes = {2, 3}}", "t",
      "for i = 1, 2 do", "print('turn', i)", "end", "nosuch()", "=ms.dist.get_wo\t", "",
    }, "\n")
    local output = on_terminal("bin/moonshard repl " .. dir, keys, "MOONSHARD_HISTORY=" .. history)
    assert.truthy(output:find("store " .. dir .. ": 2 steps (5..7)", 1, true), output)
    assert.equal("{5, 7}\n", after(output, "steps()"))
    assert.truthy(after(output, "ls()"):find("model.w%s+f32%s+%[3, 2%]"))
    local shown = after(output, 'show("model.w", 5)')
    assert.truthy(shown:find("rank 0%s+rows 0..2 "), shown)
    assert.truthy(shown:find("min 0  max 5  mean 2.5  norm 7.4162", 1, true), shown)
    assert.truthy(shown:find("checksums ok (1 chunk verified)", 1, true), shown)
    -- completion turned model.b into model.bias
    assert.truthy(after(output, 'show("model.bias")'):find("f32%s+%[2%]"), output)
    local changes = after(output, "diff(5, 7)")
    assert.truthy(changes:find("values%s+model.w%s+max |b%-a| 10 "), changes)
    assert.truthy(changes:find('values%s+note%s+step 5 %-> step 7'), changes)
    assert.equal("45\n", after(output, '=load("model.w"):sum():item()'))
    local printed = after(output, "t")
    assert.truthy(printed:find('name = "x",', 1, true), printed)
    assert.truthy(printed:find("sizes = {2, 3},", 1, true), printed)
    assert.truthy(output:find("turn\t1\nturn\t2\n"), output)
    assert.truthy(after(output, "nosuch()"):find("error: repl:1: attempt to call global 'nosuch'", 1, true))
    assert.truthy(output:find("moonshard> =ms.dist.get_world_size", 1, true), output)
    local saved = assert(io.open(history)):read("*a")
    assert.truthy(saved:find('show("model.w", 5)\n', 1, true), saved)
    assert.truthy(saved:find("for i = 1, 2 do\n", 1, true), saved)
  end)

  it("gathers a live model's shards on demand from rank 0", function()
    local script = temp_path(".lua")
    local file = assert(io.open(script, "w"))
    file:write([[
local ms = require "moonshard"
ms.dist.spawn(2, function(rank)
  local model = ms.nn.Linear(2, 4)
  ms.no_grad(function() model.weight:copy_(ms.arange(8):view(4, 2)) end)
  ms.fsdp.FSDP(model)
  ms.repl{model = model, history = false}
  print("rank " .. rank .. " left the session")
end)
]])
    file:close()
    local keys = table.concat({'show("weight")', '=load("weight")', "=model.weight:to_local():shape()", "model.weight", ""}, "\n")
    local output = on_terminal("luajit " .. script, keys, "LUA_PATH='lua/?.lua;lua/?/init.lua;;'")
    os.remove(script)
    assert.truthy(output:find("live model: 2 parameters on 2 ranks", 1, true), output)
    local shown = after(output, 'show("weight")')
    assert.truthy(shown:find("placements {Shard(0)} on mesh [2]", 1, true), shown)
    assert.truthy(shown:find("rank 0%s+rows 0..1 "), shown)
    assert.truthy(shown:find("rank 1%s+rows 2..3 "), shown)
    assert.truthy(shown:find(("min 0  max 7  mean 3.5  norm %.6g"):format(math.sqrt(140)), 1, true), shown)
    local gathered = after(output, '=load("weight")')
    assert.truthy(gathered:find("[[0.0000, 1.0000],", 1, true), gathered)
    assert.truthy(gathered:find("[6.0000, 7.0000]]", 1, true), gathered)
    assert.equal("[2, 2]\n", after(output, "=model.weight:to_local():shape()"))
    local dtensor = after(output, "model.weight")
    assert.truthy(dtensor:find("DTensor(shape=[4, 2], dtype=f32, mesh=[2], placements={Shard(0)},", 1, true), dtensor)
    assert.truthy(dtensor:find("local rows on rank 0: [2, 2]", 1, true), dtensor)
    assert.truthy(dtensor:find("[[0.0000, 1.0000],", 1, true), dtensor)
    assert.truthy(output:find("rank 0 left the session", 1, true), output)
    assert.truthy(output:find("rank 1 left the session", 1, true), output)
  end)

  it("refuses a missing store with a message naming it", function()
    local missing = temp_path()
    local pipe = io.popen("bin/moonshard repl " .. missing .. " </dev/null 2>&1; echo \"exit=$?\"")
    local output = pipe:read("*a")
    pipe:close()
    assert.truthy(output:find("exit=1", 1, true), output)
    assert.truthy(output:find(missing .. ": no such checkpoint directory", 1, true), output)
  end)
end)
