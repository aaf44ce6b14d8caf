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

-- The REPL on a terminal of its own (specs/support/pty.lua), with real keystrokes and
-- signals: Ctrl-C (the terminal's SIGINT), SIGTERM, garbage input, values that cannot print.
describe("the REPL under interrupts and bad input", function()
  local pty = require "support.pty"
  local SIGTERM = 15
  local ENV = {LUA_PATH = "lua/?.lua;lua/?/init.lua;;", MOONSHARD_HISTORY = ""}
  local term

  after_each(function()
    if term then term:close() end
    term = nil
  end)

  it("never lets a signal that arrives as a line returns escape the line's protection", function()
    -- Lines of a few hundred loop steps that end by raising SIGINT on themselves: the hook,
    -- every 1000 instructions, sometimes fires in the code around the line as it returns,
    -- where an error would end the session. Each call must return; the signal stays pending.
    local code = [[
      local ffi = require "ffi"
      ffi.cdef "int raise(int sig);"
      local lib = require("moonshard.ffi").lib
      local run = require "moonshard.repl.run"
      assert(lib.ms_interrupt_install() == 0)
      local escaped, left_pending = 0, 0
      for i = 1, 3000 do
        local fn = assert(run.compile("local s = 0 for j = 1, " .. (200 + i % 400) .. " do s = s + j end raise(2)"))
        local ok = pcall(run.call, fn, setmetatable({raise = ffi.C.raise}, {__index = _G}))
        if not ok then escaped = escaped + 1 end
        if lib.ms_interrupt_take() ~= 0 then left_pending = left_pending + 1 end
      end
      io.write(escaped, " ", left_pending > 0 and "some left pending" or "none left pending")
    ]]
    local pipe = io.popen(string.format("LUA_PATH='lua/?.lua;lua/?/init.lua;;' luajit -e %q 2>&1", code))
    local text = pipe:read("*a")
    pipe:close()
    assert.are.equal("0 some left pending", text)
  end)

  -- Type line; returns the position after the screen's echo of it.
  local function type_line(line)
    local at = #term.text + 1
    term:send(line .. "\n")
    return term:expect(line .. "\n", 20, at)
  end

  -- Bytes of a fixed pseudo-random sequence (an LCG) after ESC newline (Meta-Ctrl-J, which
  -- readline's emacs mode binds to "switch to vi mode"): once made readline spin in its vi
  -- code at 100% CPU, deaf to SIGTERM.
  local function garbage()
    local bytes, x = {"\27\n"}, 3
    for _ = 1, 2800 do
      x = (x * 1103515245 + 12345) % 2147483648
      bytes[#bytes + 1] = string.char(math.floor(x / 65536) % 256)
    end
    return table.concat(bytes)
  end

  it("Ctrl-C cancels the typed line and the running line and keeps the session", function()
    term = pty.spawn({"bin/moonshard", "repl"}, ENV)
    term:expect("moonshard> ")
    term:send("never = 'run'")
    term:send("\3")
    term:expect("^C\nmoonshard> ")
    type_line("for i = 1, 2 do")
    local at = #term.text + 1
    term:send("\3") -- drops the pending lines too
    term:expect("^C\nmoonshard> ", 20, at) -- (a signal may come after keys typed at once)
    local after_loop = type_line("=never")
    term:expect("nil\n", 20, after_loop)
    local after = type_line("n = 0; while true do n = n + 1 end")
    pty.sleep_ms(300)
    term:send("\3")
    term:expect("error: repl:1: interrupted by SIGINT", 20, after)
    after = type_line("=n > 0")
    term:expect("true\n", 20, after)
    -- a loop of tensor ops, compiled code included
    after = type_line("t = ms.ones(8); while true do t = t + 1; t = t - 1 end")
    pty.sleep_ms(300)
    term:send("\3")
    term:expect("interrupted by SIGINT", 20, after)
    after = type_line("=t:numel()")
    term:expect("8\n", 20, after)
  end)

  it("prints an error for a value whose __tostring raises and keeps the session", function()
    term = pty.spawn({"bin/moonshard", "repl"}, ENV)
    term:expect("moonshard> ")
    type_line("bad = setmetatable({}, {__tostring = function() error('no text for you') end})")
    local after = type_line("bad")
    term:expect("error: cannot print the value: repl:1: no text for you", 20, after)
    after = type_line("error(bad)")
    term:expect("error: (an error whose __tostring raised", 20, after)
    after = type_line("=1 + 1")
    term:expect("2\n", 20, after)
  end)

  it("ends on SIGTERM, at the prompt and while a line runs", function()
    term = pty.spawn({"bin/moonshard", "repl"}, ENV)
    term:expect("moonshard> ")
    term:signal(SIGTERM)
    assert.are.same({"exit", 1}, {term:wait(20)}, term.text)
    assert.truthy(term.text:find("repl: ended by SIGTERM", 1, true), term.text)
    term:close()
    term = pty.spawn({"bin/moonshard", "repl"}, ENV)
    term:expect("moonshard> ")
    type_line("while true do end")
    pty.sleep_ms(300)
    term:signal(SIGTERM)
    assert.are.same({"exit", 1}, {term:wait(20)}, term.text)
    assert.truthy(term.text:find("interrupted by SIGTERM", 1, true), term.text)
  end)

  it("survives garbage typed at the terminal, staying in emacs mode", function()
    term = pty.spawn({"bin/moonshard", "repl"}, ENV)
    term:expect("moonshard> ")
    -- without the keys that mean something to the terminal or end the session by design:
    -- Ctrl-C, -Z, -\ (signals), -S, -Q (flow control), -D (end of input)
    local keys = garbage():gsub("[\3\26\28\19\17\4]", "")
    for i = 1, #keys, 256 do
      term:send(keys:sub(i, i + 255))
      term:pump(10)
    end
    term:send("\7") -- Ctrl-G leaves a search or a numeric argument
    pty.sleep_ms(200)
    local at = #term.text + 1
    term:send("\3") -- drops the line and any pending ones
    term:expect("^C\nmoonshard> ", 20, at)
    at = #term.text + 1
    term:send("=12\27x\n") -- ESC x: Meta-x in emacs mode; vi mode would delete the 2
    term:expect("\n12\n", 20, at)
    term:signal(SIGTERM)
    assert.are.equal("exit", (term:wait(20)), term.text)
  end)

  it("follows an inputrc that chooses vi mode", function()
    local inputrc = os.tmpname()
    local file = assert(io.open(inputrc, "w"))
    file:write("set editing-mode vi\n")
    file:close()
    local env = {INPUTRC = inputrc}
    for k, v in pairs(ENV) do env[k] = v end
    term = pty.spawn({"bin/moonshard", "repl"}, env)
    term:expect("moonshard> ")
    local at = #term.text + 1
    term:send("=12\27x\n")
    term:expect("\n1\n", 20, at)
    os.remove(inputrc)
  end)

  it("runs %all lines on every rank of a live model and refuses collectives in plain lines", function()
    local script = os.tmpname() .. ".lua"
    local file = assert(io.open(script, "w"))
    file:write([[
local ms = require "moonshard"
ms.dist.spawn(2, function(rank)
  local model = ms.nn.Linear(2, 4)
  ms.no_grad(function() model.weight:copy_(ms.arange(8):view(4, 2)); model.bias:fill_(0) end)
  ms.fsdp.FSDP(model)
  ms.repl{model = model, history = false}
  print("rank " .. rank .. " left the session")
end)
print("the job ended")
]])
    file:close()
    term = pty.spawn({"luajit", script}, ENV)
    term:expect("%all <line> runs a line on every rank")
    term:expect("moonshard> ")
    -- a forward needs every rank: a plain line fails at once, naming %all
    local after = type_line("y = model(ms.ones(1, 2))")
    term:expect("error: dist.all_gather_into_tensor: the other ranks are waiting at the REPL " ..
                "prompt; run the line on every rank with %all <line>\n", 20, after)
    after = type_line("%all y = model(ms.ones(1, 2))")
    after = type_line("%all =y:sum():item(), ms.dist.get_rank()")
    -- rows (0,1), (2,3), (4,5), (6,7) of the weight times ones: 1 + 5 + 9 + 13
    term:expect("[rank 0]\n28\n0\n[rank 1]\n28\n1\n", 20, after)
    after = type_line("%all =ms.dist.get_rank() == 1 and error('only on 1') or 'fine'")
    term:expect('[rank 0] "fine"\n[rank 1] error: repl:1: only on 1\n', 20, after)
    -- Ctrl-C at the terminal reaches every process: the line stops, the session and job stay
    after = type_line("%all t = ms.ones(4); for i = 1, 1e12 do ms.dist.all_reduce(t); t:div_(2) end")
    pty.sleep_ms(500)
    term:send("\3")
    term:expect("[rank 1] ", 20, after)
    pty.sleep_ms(200)
    after = type_line("%all =ms.dist.get_rank() + 10")
    after = term:expect("[rank 0] 10\n[rank 1] 11\n", 20, after)
    -- Ctrl-D once the prompt is back (readline has the terminal): an EOF typed while the
    -- terminal is still in line mode between two lines is lost when readline takes it over.
    term:expect("moonshard> ", 20, after)
    term:send("\4")
    term:expect("the job ended")
    assert.are.same({"exit", 0}, {term:wait(20)}, term.text)
    assert.truthy(term.text:find("rank 0 left the session", 1, true), term.text)
    assert.truthy(term.text:find("rank 1 left the session", 1, true), term.text)
    os.remove(script)
  end)

  it("reads piped input without readline, garbage included, and ends at its end", function()
    local input = os.tmpname()
    local file = assert(io.open(input, "wb"))
    file:write("=1 + 2\nbad = setmetatable({}, {__tostring = function() error('x') end})\nbad\n", garbage(), "\n=40 + 2\n")
    file:close()
    local pipe = io.popen("timeout -s KILL 60 bin/moonshard repl --no-history < " .. input .. " 2>&1; echo \"exit=$?\"")
    local output = pipe:read("*a")
    pipe:close()
    os.remove(input)
    assert.truthy(output:find("moonshard REPL (LuaJIT)\n", 1, true), output)
    assert.truthy(output:find("moonshard> 3\n", 1, true), output)
    assert.truthy(output:find("error: cannot print the value", 1, true), output)
    assert.truthy(output:find("moonshard> 42\n", 1, true), output)
    assert.truthy(output:find("exit=0", 1, true), output)
  end)
end)
