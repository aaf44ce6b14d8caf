-- The REPL's helper functions over a checkpoint store and/or a live model: ls, steps,
-- show, diff, load and help. They print what they find; load returns a tensor or value.
local ms = require "moonshard"
local inspect = require "moonshard.cli.inspect"

local M = {}

local HELP = [[
  ls([prefix], [step]) names with shapes: the live model's, or the store's at step (latest)
  steps()              the store's committed steps
  show(fqn, [step])    which rank holds which rows, shape, dtype, min, max, mean, norm and
                       checksum state (a step, or a name the live model lacks, reads the store)
  diff(a, b)           what changed between steps a and b of the store
  load(fqn, [step])    the full tensor (gathered from the ranks for a live model) or value
  store, model, ms     the open store, the live model and the moonshard module
  help()               this text; Ctrl-D or quit() leaves]]

local function print_lines(lines)
  for _, line in ipairs(lines) do io.stdout:write(line, "\n") end
end

-- context: {store = dcp store or nil, live = repl.live object or nil}
function M.build(context)
  local store, live = context.store, context.live
  local h = {}

  local function need_store(what)
    if not store then error(what .. ": no store is open (moonshard repl DIR, or ms.repl{store = DIR})", 0) end
    return store
  end

  local function latest()
    local steps = need_store("steps"):steps()
    if #steps == 0 then error("the store " .. store.dir .. " has no committed step", 0) end
    return steps[#steps]
  end

  local function live_lines(fqn)
    local p = live:parameter(fqn)
    local lines = {fqn .. "  (live)"}
    local shape = p:shape()
    if ms.is_dtensor(p) then
      local names = {}
      for i, pl in ipairs(p.placements) do names[i] = tostring(pl) end
      lines[#lines + 1] = ("  %s %s  placements {%s} on mesh %s"):format(p:dtype(), inspect.shape(shape),
        table.concat(names, ", "), inspect.shape(p.device_mesh:shape()))
      local n = #shape > 0 and shape[1] or 1
      for _, line in ipairs(inspect.draw_layout(inspect.layout_of_dtensor(p), n)) do lines[#lines + 1] = line end
    else
      lines[#lines + 1] = ("  %s %s  (not sharded)"):format(p:dtype(), inspect.shape(shape))
    end
    local full = live:gather(fqn)
    lines[#lines + 1] = "  " .. inspect.stats_line(inspect.stats(full))
    full:free()
    lines[#lines + 1] = "  checksums: none (a live tensor; stored steps are checked by show(fqn, step))"
    return lines
  end

  function h.help() io.stdout:write("helpers:\n", HELP, "\n") end

  function h.steps() return need_store("steps"):steps() end

  function h.ls(prefix, step)
    prefix = prefix or ""
    local shown = 0
    if live and step == nil then
      for _, fqn in ipairs(live.names) do
        if fqn:sub(1, #prefix) == prefix then
          local p = live:parameter(fqn)
          io.stdout:write(("%-48s %-4s %s\n"):format(fqn, p:dtype(), inspect.shape(p:shape())))
          shown = shown + 1
        end
      end
    else
      step = step or latest()
      for _, e in ipairs(need_store("ls"):entries(step)) do
        if e.fqn:sub(1, #prefix) == prefix then
          io.stdout:write(("%-52s %s\n"):format(e.fqn, inspect.entry_summary(store, step, e)))
          shown = shown + 1
        end
      end
    end
    if shown == 0 then io.stdout:write(("no names start with '%s'\n"):format(prefix)) end
  end

  function h.show(fqn, step)
    if type(fqn) ~= "string" then error("show: expected a name such as show('model.lm_head.weight')", 0) end
    if live and step == nil and live:has(fqn) then
      print_lines(live_lines(fqn))
    else
      print_lines(inspect.show_stored(need_store("show"), step or latest(), fqn))
    end
  end

  function h.diff(a, b)
    local s = need_store("diff")
    if type(a) ~= "number" or type(b) ~= "number" then error("diff: expected two step numbers, e.g. diff(100, 200)", 0) end
    local same = 0
    local rows = inspect.diff(s, a, s, b)
    for _, row in ipairs(rows) do
      if row.change == "same" then same = same + 1
      else io.stdout:write(("%-8s %-52s %s\n"):format(row.change, row.fqn, row.detail or "")) end
    end
    io.stdout:write(("%d entries, %d unchanged, %d changed\n"):format(#rows, same, #rows - same))
  end

  function h.load(fqn, step)
    if type(fqn) ~= "string" then error("load: expected a name", 0) end
    if live and step == nil and live:has(fqn) then return live:gather(fqn) end
    return need_store("load"):read(fqn, step or latest())
  end

  -- Names completion offers inside strings: the live model's and the latest step's.
  function h._names()
    local names = {}
    if live then for _, n in ipairs(live.names) do names[#names + 1] = n end end
    if store then
      local ok, steps = pcall(store.steps, store)
      if ok and #steps > 0 then
        for _, e in ipairs(store:entries(steps[#steps])) do names[#names + 1] = e.fqn end
      end
    end
    return names
  end

  return h
end

return M
