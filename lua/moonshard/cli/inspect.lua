-- Inspection shared by `moonshard ckpt` and the REPL: sizes and shapes as text, tensor
-- statistics, which rank holds which rows (stored chunks or a live DTensor's mesh), and
-- the differences between two steps of a store.
local ms = require "moonshard"
local placement = require "moonshard.placement"

local M = {}

function M.bytes(n)
  local units, i = {"B", "KiB", "MiB", "GiB", "TiB"}, 1
  while n >= 1024 and i < #units do n, i = n / 1024, i + 1 end
  return i == 1 and ("%d B"):format(n) or ("%.1f %s"):format(n, units[i])
end

function M.shape(shape) return "[" .. table.concat(shape, ", ") .. "]" end

-- A string as a quoted Lua literal with every control byte escaped ("a\27[2J" for an ESC),
-- so a stored value cannot drive the terminal.
function M.quote(text)
  return (("%q"):format(text):gsub("\\\n", "\\n"))
end

-- A key name as it is when it is plain text, quoted like a string value (M.quote) when it
-- holds control bytes such as terminal escapes.
function M.name(fqn)
  fqn = tostring(fqn)
  if fqn:find("[%z\1-\31\127]") then return M.quote(fqn) end
  return fqn
end

-- A key name inside a sentence: 'model.w', or quoted like a string value (M.quote).
function M.named(fqn)
  local name = M.name(fqn)
  return name == tostring(fqn) and "'" .. name .. "'" or name
end

-- {min, max, mean, norm} of a plain tensor, computed in f64; nil when it is empty.
function M.stats(t)
  if t:numel() == 0 then return nil end
  return ms.no_grad(function()
    local d = t:dtype() == "f64" and t or t:to("f64")
    local squares = d * d
    local out = {min = d:min():item(), max = d:max():item(), mean = d:mean():item(),
                 norm = math.sqrt(squares:sum():item())}
    squares:free()
    if not rawequal(d, t) then d:free() end
    return out
  end)
end

function M.stats_line(stats)
  if not stats then return "empty" end
  return ("min %.6g  max %.6g  mean %.6g  norm %.6g"):format(stats.min, stats.max, stats.mean, stats.norm)
end

-- Row ranges per rank from a store's chunks: {{rank =, first =, rows =}, ...} by rank then row.
function M.layout_of_chunks(chunks, shape)
  local pieces = {}
  for _, c in ipairs(chunks) do
    local first = #shape > 0 and c.offsets[1] or 0
    local rows = #shape > 0 and c.sizes[1] or 1
    pieces[#pieces + 1] = {rank = c.rank, first = first, rows = rows}
  end
  table.sort(pieces, function(a, b)
    if a.rank ~= b.rank then return a.rank < b.rank end
    return a.first < b.first
  end)
  local merged = {}
  for _, p in ipairs(pieces) do
    local last = merged[#merged]
    if last and last.rank == p.rank and last.first + last.rows == p.first then
      last.rows = last.rows + p.rows
    elseif not (last and last.rank == p.rank and last.first == p.first and last.rows == p.rows) then
      merged[#merged + 1] = {rank = p.rank, first = p.first, rows = p.rows}
    end
  end
  return merged
end

-- Row ranges per global rank of a DTensor from its mesh and placements.
function M.layout_of_dtensor(t)
  local mesh, shape = t.device_mesh, t:shape()
  local n = #shape > 0 and shape[1] or 1
  local mesh_shape = mesh:shape()
  local out = {}
  local function visit(dim, coords)
    if dim > #mesh_shape then
      local first, rows = 0, n
      for d, p in ipairs(t.placements) do
        if p:is_shard() then first, rows = placement.shard_range(n, mesh_shape[d], coords[d]) end
      end
      out[#out + 1] = {rank = mesh:rank_at(coords), first = first, rows = rows}
      return
    end
    for c = 0, mesh_shape[dim] - 1 do
      coords[dim] = c
      visit(dim + 1, coords)
    end
  end
  visit(1, {})
  table.sort(out, function(a, b) return a.rank < b.rank end)
  return out
end

-- Lines drawing layout over n rows: "rank 1  rows  19..37  |    #####    |".
function M.draw_layout(layout, n, width)
  width = width or 40
  local lines = {}
  for _, p in ipairs(layout) do
    local bar
    if n == 0 or p.rows == 0 then
      bar = string.rep(" ", width)
    else
      local from = math.floor(p.first / n * width)
      local to = math.max(from + 1, math.floor((p.first + p.rows) / n * width + 0.5))
      bar = string.rep(" ", from) .. string.rep("#", to - from) .. string.rep(" ", width - to)
    end
    local rows = p.rows == 0 and "no rows" or ("rows %d..%d"):format(p.first, p.first + p.rows - 1)
    lines[#lines + 1] = ("  rank %-3d %-18s |%s|"):format(p.rank, rows, bar)
  end
  return lines
end

-- ---- stores ----

function M.entry_map(store, step)
  local map = {}
  for _, e in ipairs(store:entries(step)) do map[e.fqn] = e end
  return map
end

-- One line describing a store entry: "f32 [76, 64] 19.0 KiB in 4 chunks" or the value.
function M.entry_summary(store, step, e)
  if e.kind == "tensor" then
    return ("%-4s %-14s %9s in %d chunk%s"):format(e.dtype, M.shape(e.shape), M.bytes(e.nbytes), e.chunks,
                                                 e.chunks == 1 and "" or "s")
  end
  local value = store:read(e.fqn, step)
  return ("%-7s %s"):format(e.kind, type(value) == "string" and M.quote(value) or tostring(value))
end

-- Checksum state of fqn at step: "ok (4 chunks)" or the problem.
function M.checksum_state(store, step, fqn, chunk_count)
  for _, problem in ipairs(store:verify(step, fqn)) do return "FAILED: " .. problem.message end
  return ("ok (%d chunk%s verified)"):format(chunk_count, chunk_count == 1 and "" or "s")
end

-- Lines showing a stored entry: its summary, rank layout, statistics and checksum state.
function M.show_stored(store, step, fqn)
  local e = M.entry_map(store, step)[fqn]
  if not e then error(("step %d has no entry %s"):format(step, M.named(fqn)), 0) end
  local lines = {("%s  (step %d)"):format(M.name(fqn), step), "  " .. M.entry_summary(store, step, e)}
  if e.kind ~= "tensor" then return lines end
  local n = #e.shape > 0 and e.shape[1] or 1
  for _, line in ipairs(M.draw_layout(M.layout_of_chunks(store:chunks(fqn, step), e.shape), n)) do
    lines[#lines + 1] = line
  end
  local t = store:read(fqn, step)
  lines[#lines + 1] = "  " .. M.stats_line(M.stats(t))
  t:free()
  lines[#lines + 1] = "  checksums " .. M.checksum_state(store, step, fqn, e.chunks)
  return lines
end

-- Differences between two steps (of one store or two): an array of
-- {fqn =, change = "added" | "removed" | "type" | "values" | "same", detail =}.
function M.diff(store_a, step_a, store_b, step_b)
  local a, b = M.entry_map(store_a, step_a), M.entry_map(store_b, step_b)
  local names, seen = {}, {}
  for fqn in pairs(a) do names[#names + 1], seen[fqn] = fqn, true end
  for fqn in pairs(b) do if not seen[fqn] then names[#names + 1] = fqn end end
  table.sort(names)
  local out = {}
  for _, fqn in ipairs(names) do
    local ea, eb = a[fqn], b[fqn]
    local row = {fqn = fqn}
    if not ea then
      row.change, row.detail = "added", M.entry_summary(store_b, step_b, eb)
    elseif not eb then
      row.change, row.detail = "removed", M.entry_summary(store_a, step_a, ea)
    elseif ea.kind ~= eb.kind or (ea.kind == "tensor" and (ea.dtype ~= eb.dtype or M.shape(ea.shape) ~= M.shape(eb.shape))) then
      row.change = "type"
      row.detail = M.entry_summary(store_a, step_a, ea) .. " -> " .. M.entry_summary(store_b, step_b, eb)
    elseif ea.kind ~= "tensor" then
      local va, vb = store_a:read(fqn, step_a), store_b:read(fqn, step_b)
      local function shown(v) return type(v) == "string" and M.name(v) or tostring(v) end
      if va == vb then row.change = "same" else row.change, row.detail = "values", shown(va) .. " -> " .. shown(vb) end
    else
      local ta, tb = store_a:read(fqn, step_a), store_b:read(fqn, step_b)
      if ms.equal(ta, tb) then
        row.change = "same"
      else
        local da, db = ta:to("f64"), tb:to("f64")
        local delta = (db - da):abs()
        local max_delta, delta_norm = delta:max():item(), math.sqrt((delta * delta):sum():item())
        local base = math.sqrt((da * da):sum():item())
        row.change = "values"
        row.detail = ("max |b-a| %.4g  |b-a|/|a| %.4g"):format(max_delta, base > 0 and delta_norm / base or math.huge)
        row.max_delta = max_delta
      end
      ta:free(); tb:free()
    end
    out[#out + 1] = row
  end
  return out
end

return M
