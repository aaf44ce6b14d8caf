-- moonshard ckpt ls|show|verify|diff|rm|export|import: inspect checkpoint stores written by
-- ms.dcp, check their checksums, compare steps, delete steps, convert to and from safetensors.
local args = require "moonshard.cli.args"
-- loads moonshard (and so the library) only when a command runs, inside its error handling
local function inspect() return require "moonshard.cli.inspect" end

local M = {}

M.usage = [[
usage: moonshard ckpt <subcommand> ...

  ls DIR                         committed steps with their entries, bytes and ranks
                                 (a step that cannot be read is listed as DAMAGED; exit 1)
  show DIR [FQN|PREFIX] [--step S]
                                 entries of a step (the latest by default); one entry in
                                 detail: rank layout, min/max/mean/norm, checksum state
  verify DIR [--step S]          check every chunk against its checksum, every step's
                                 manifest included (exit 1 on damage)
  diff DIR STEP_A STEP_B [--other DIR_B]
                                 what changed between two steps (STEP_B of DIR_B with --other)
  rm DIR STEP                    delete a step and reclaim its space (fails while a job
                                 writes the store)
  export DIR OUT.safetensors [--step S] [--prefix P]
                                 tensors under prefix P (default "model.") as safetensors,
                                 named without the prefix (PyTorch's state-dict keys)
  import IN.safetensors DIR [--step S] [--prefix P]
                                 the file's tensors into a new step, stored under prefix
                                 P (step 0 in a new store; a store with steps needs --step)
  --help                         this text
]]

local function dcp() return require("moonshard").dcp end

local function out(fmt, ...) io.stdout:write(fmt:format(...), "\n") end

local function open(dir)
  if not dir then args.usage_error("no store directory given") end
  return dcp().open(dir)
end

local function step_of(store, wanted)
  local steps = store:steps()
  if #steps == 0 then error(store.dir .. " has no committed step", 0) end
  if wanted == nil then return steps[#steps] end
  for _, s in ipairs(steps) do if s == wanted then return s end end
  error(("%s has no step %d (steps: %s)"):format(store.dir, wanted, table.concat(steps, ", ")), 0)
end

local commands = {}

-- A raised message without its "moonshard: <function>: " prefix.
local function detail(message)
  return (tostring(message):gsub("^moonshard: [^ ]+: ", ""))
end

-- Whether a step listed a moment ago was deleted since (retention by a running job).
local function gone_meanwhile(message)
  message = tostring(message)
  return not message:find("is damaged", 1, true) and
         (message:find("was deleted while reading", 1, true) or message:find("is not committed", 1, true)) ~= nil
end

function commands.ls(argv)
  local _, positional = args.parse(argv, {})
  local store = open(positional[1])
  local steps = store:steps()
  out("%s: %d committed step%s", store.dir, #steps, #steps == 1 and "" or "s")
  if #steps > 0 then out("  %8s %8s %8s %12s %6s", "step", "entries", "tensors", "tensor bytes", "ranks") end
  local damaged = 0
  for _, step in ipairs(steps) do
    local entries, tensors, bytes, ranks, rank_count = nil, 0, 0, {}, 0
    local listed, err = pcall(function()
      entries = store:entries(step)
      for _, e in ipairs(entries) do
        if e.kind == "tensor" then
          tensors, bytes = tensors + 1, bytes + e.nbytes
          for _, c in ipairs(store:chunks(e.fqn, step)) do
            if not ranks[c.rank] then ranks[c.rank], rank_count = true, rank_count + 1 end
          end
        end
      end
    end)
    if listed then
      out("  %8d %8d %8d %12s %6d", step, #entries, tensors, inspect().bytes(bytes), rank_count)
    elseif gone_meanwhile(err) then
      out("  %8d  deleted while listing (retention by a running job)", step)
    else
      damaged = damaged + 1
      out("  %8d  DAMAGED: %s", step, inspect().name(detail(err)))
    end
  end
  store:close()
  if damaged > 0 then
    io.stderr:write(("moonshard ckpt ls: %d damaged step%s\n"):format(damaged, damaged == 1 and "" or "s"))
    return 1
  end
end

function commands.show(argv)
  local opts, positional = args.parse(argv, {["--step"] = "int"})
  local store = open(positional[1])
  local step = step_of(store, opts.step)
  local pattern = positional[2]
  local entries = inspect().entry_map(store, step)
  if pattern and entries[pattern] then
    for _, line in ipairs(inspect().show_stored(store, step, pattern)) do out("%s", line) end
    store:close()
    return
  end
  local shown = 0
  for _, e in ipairs(store:entries(step)) do
    if not pattern or e.fqn:sub(1, #pattern) == pattern then
      out("%-52s %s", inspect().name(e.fqn), inspect().entry_summary(store, step, e))
      shown = shown + 1
    end
  end
  store:close()
  if pattern and shown == 0 then
    error(("step %d has no entry named or starting with %s"):format(step, inspect().named(pattern)), 0)
  end
end

function commands.verify(argv)
  local opts, positional = args.parse(argv, {["--step"] = "int"})
  local store = open(positional[1])
  local steps = opts.step and {step_of(store, opts.step)} or store:steps()
  local damaged, damaged_steps = 0, 0
  for _, step in ipairs(steps) do
    local chunks, problems, deleted = 0, {}, {}
    local listed, err = pcall(function()
      problems, deleted = store:verify(step)
      if #problems == 0 and #deleted == 0 then
        for _, e in ipairs(store:entries(step)) do chunks = chunks + (e.chunks or 0) end
      end
    end)
    local gone = not listed and not opts.step and gone_meanwhile(err)
    if not listed and not gone then
      if opts.step then error(err, 0) end
      problems = {{step = step, message = detail(err)}}
    end
    if gone or #deleted > 0 then
      out("step %d: deleted while reading (retention by a running job)", step)
    elseif #problems == 0 then
      out("step %d: ok (%d chunks)", step, chunks)
    else
      for _, p in ipairs(problems) do
        if p.fqn then
          damaged = damaged + 1
          out("step %d: %s: %s", step, inspect().name(p.fqn), inspect().name(p.message))
        else
          damaged_steps = damaged_steps + 1
          out("step %d: DAMAGED: %s", step, inspect().name(p.message))
        end
      end
    end
  end
  store:close()
  if damaged + damaged_steps > 0 then
    local parts = {}
    if damaged_steps > 0 then
      parts[#parts + 1] = ("%d step%s whose manifest cannot be read"):format(damaged_steps, damaged_steps == 1 and "" or "s")
    end
    if damaged > 0 then parts[#parts + 1] = ("%d damaged entr%s"):format(damaged, damaged == 1 and "y" or "ies") end
    io.stderr:write(("moonshard ckpt verify: %s\n"):format(table.concat(parts, ", ")))
    return 1
  end
end

function commands.rm(argv)
  local _, positional = args.parse(argv, {})
  local dir, step = positional[1], args.step(positional[2])
  if not dir then args.usage_error("no store directory given") end
  if not step then args.usage_error("rm needs a step number (an integer in [0, 2^53))") end
  local store = open(dir)
  step_of(store, step)
  store:close()
  dcp().delete(dir, step)
  out("deleted step %d of %s", step, dir)
end

function commands.diff(argv)
  local opts, positional = args.parse(argv, {["--other"] = "string"})
  local store_a = open(positional[1])
  local a, b = args.step(positional[2]), args.step(positional[3])
  if not a or not b then args.usage_error("diff needs two step numbers (integers in [0, 2^53))") end
  local store_b = opts.other and dcp().open(opts.other) or store_a
  local rows = inspect().diff(store_a, step_of(store_a, a), store_b, step_of(store_b, b))
  local same = 0
  for _, row in ipairs(rows) do
    if row.change == "same" then
      same = same + 1
    else
      out("%-8s %-52s %s", row.change, inspect().name(row.fqn), row.detail or "")
    end
  end
  out("%d entries, %d unchanged, %d changed", #rows, same, #rows - same)
  store_a:close()
  if store_b ~= store_a then store_b:close() end
end

M.commands = commands

function M.main(argv)
  local name = argv[1]
  if name == nil then args.usage_error("no subcommand given") end
  if name == "--help" or name == "-h" then io.stdout:write(M.usage) return 0 end
  local rest = {unpack(argv, 2)}
  for _, a in ipairs(rest) do if a == "--help" or a == "-h" then io.stdout:write(M.usage) return 0 end end
  local command = commands[name] or (name == "export" or name == "import") and require("moonshard.cli.convert")[name]
  if not command then args.usage_error("unknown subcommand '%s'", name) end
  return command(rest)
end

return M
