-- The nccl backend on forked ranks, one GPU each: every collective, dtype and op against
-- values worked out here, NaN through max and min, CPU tensors on the nccl world,
-- sub-groups through ncclCommSplit, mismatched calls, and a collective overlapping compute
-- on the communication stream.
local ms = require "moonshard"
local dist = ms.dist
local gpu = require "gpu.helpers"

local DTYPES = {"f32", "f64", "bf16", "f16", "i32", "i64", "u8"}
local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}

-- Rank r's element i: small integers, exact in every dtype.
local function value(r, i) return (r + 1) * 3 + i % 17 end

local function values(r, n, first)
  local out = {}
  for i = 1, n do out[i] = value(r, (first or 0) + i - 1) end
  return out
end

local function reduced(op, size, i, dtype)
  local sum = 0
  for r = 0, size - 1 do sum = sum + value(r, i) end
  if op == "sum" then return dtype == "u8" and sum % 256 or sum end
  if op == "max" then return value(size - 1, i) end
  if op == "min" then return value(0, i) end
  return sum / size -- avg: float dtypes only (an integer avg raises, as torch.distributed)
end

local function on_device(list, dtype, rank)
  return ms.tensor(list, {dtype = dtype}):to(gpu.rank_device(rank))
end

local function host_list(t) return t:to("cpu"):to("f64"):table() end

local NAN = 0 / 0

-- Rank r's element i for the NaN case: a NaN where i % 5 == r, an infinity (+ on even
-- ranks, - on odd ones) where i % 7 == r, value(r, i) elsewhere.
local function value_or_special(r, i)
  if i % 5 == r then return NAN end
  if i % 7 == r then return r % 2 == 0 and math.huge or -math.huge end
  return value(r, i)
end

local function specials(r, n)
  local out = {}
  for i = 1, n do out[i] = value_or_special(r, i - 1) end
  return out
end

-- max or min over ranks at element i; NaN when any rank has one.
local function reduced_with_nan(op, size, i)
  local acc = value_or_special(0, i)
  for r = 1, size - 1 do
    local v = value_or_special(r, i)
    if acc ~= acc or v ~= v then return NAN end
    acc = op == "max" and math.max(acc, v) or math.min(acc, v)
  end
  return acc
end

-- The first element of got (0-based) that is not want(i), NaN matching NaN; nil if none.
local function first_difference(got, want)
  for i, v in ipairs(got) do
    local expected = want(i - 1)
    if (expected ~= expected and v == v) or (expected == expected and v ~= expected) then
      return i - 1
    end
  end
end

describe("the nccl backend #gpu", function()
  local size = gpu.world_size()
  local missing = gpu.missing_devices(2)
  if missing then
    pending(missing)
    return
  end

  local function run(fn)
    return dist.spawn(size, function(rank) return gpu.with_nccl(function() return fn(rank) end) end)
  end

  it("reports itself as the world's backend", function()
    local names = run(function() return dist.get_backend() end)
    for r = 1, size do assert.are.equal(gpu.backend, names[r]) end
  end)

  it("all-reduces every dtype with every op (avg: the float dtypes)", function()
    local failures = run(function(rank)
      local wrong = {}
      for _, dtype in ipairs(DTYPES) do
        for _, op in ipairs(FLOATING[dtype] and {"sum", "avg", "max", "min"} or {"sum", "max", "min"}) do
          local t = on_device(values(rank, 1001), dtype, rank)
          dist.all_reduce(t, op)
          local got = host_list(t)
          for i = 1, #got do
            if got[i] ~= reduced(op, size, i - 1, dtype) then
              wrong[#wrong + 1] = dtype .. " " .. op
              break
            end
          end
        end
      end
      return wrong
    end)
    for r = 1, size do assert.are.same({}, failures[r], "rank " .. (r - 1)) end
  end)

  it("propagates NaN through max and min and leaves a reduce-scatter's input as it was", function()
    local failures = run(function(rank)
      local wrong = {}
      local n = 23
      for _, dtype in ipairs({"f32", "f64", "bf16", "f16"}) do
        for _, op in ipairs({"max", "min"}) do
          local function note(what, at)
            if at then
              wrong[#wrong + 1] = string.format("%s %s %s element %d", what, dtype, op, at)
            end
          end
          local t = on_device(specials(rank, 101), dtype, rank)
          dist.all_reduce(t, op)
          note("all_reduce", first_difference(host_list(t), function(i)
            return reduced_with_nan(op, size, i)
          end))
          local input = on_device(specials(rank, size * n), dtype, rank)
          local out = ms.empty(n, {dtype = dtype, device = gpu.rank_device(rank)})
          dist.reduce_scatter_tensor(out, input, op)
          note("reduce_scatter", first_difference(host_list(out), function(i)
            return reduced_with_nan(op, size, rank * n + i)
          end))
          note("reduce_scatter changed the input:", first_difference(host_list(input), function(i)
            return value_or_special(rank, i)
          end))
        end
      end
      return wrong
    end)
    for r = 1, size do assert.are.same({}, failures[r], "rank " .. (r - 1)) end
  end)

  -- The contract of dist.lua on an nccl world: CPU tensors go through the group's device
  -- and come back, still CPU tensors, holding what the local backend computes.
  it("takes CPU tensors and gives the local backend's results", function()
    local function collectives(rank)
      local summed = ms.tensor(values(rank, 101), {dtype = "f32"})
      dist.all_reduce(summed, "sum")
      local maxed = ms.tensor(specials(rank, 101), {dtype = "bf16"})
      dist.all_reduce(maxed, "max")
      local gathered = ms.empty(size * 37, {dtype = "i64"})
      dist.all_gather_into_tensor(gathered, ms.tensor(values(rank, 37), {dtype = "i64"}))
      local broadcast = ms.tensor(values(rank, 37), {dtype = "f64"})
      dist.broadcast(broadcast, size - 1)
      local results, devices = {}, {}
      for _, t in ipairs({summed, maxed, gathered, broadcast}) do
        devices[#devices + 1] = t:device()
        -- NaN ~= NaN: compare NaNs by name
        local list = host_list(t)
        for i, v in ipairs(list) do if v ~= v then list[i] = "nan" end end
        results[#results + 1] = list
      end
      return {results = results, devices = devices}
    end
    local on_nccl = run(collectives)
    local on_local = dist.spawn(size, collectives)
    for r = 1, size do
      assert.are.same({"cpu", "cpu", "cpu", "cpu"}, on_nccl[r].devices, "rank " .. (r - 1))
      assert.are.same(on_local[r].results, on_nccl[r].results, "rank " .. (r - 1))
    end
  end)

  it("all-gathers, reduce-scatters and broadcasts", function()
    local results = run(function(rank)
      local n = 37
      local gathered = ms.empty(size * n, {device = gpu.rank_device(rank)})
      dist.all_gather_into_tensor(gathered, on_device(values(rank, n), "f32", rank))
      local scattered = ms.empty(n, {device = gpu.rank_device(rank)})
      dist.reduce_scatter_tensor(scattered, on_device(values(rank, size * n), "f32", rank), "sum")
      local b = on_device(values(rank, n), "f64", rank)
      dist.broadcast(b, size - 1)
      dist.barrier()
      return {host_list(gathered), host_list(scattered), host_list(b)}
    end)
    local n = 37
    for r = 0, size - 1 do
      local gathered, scattered, b = unpack(results[r + 1])
      for q = 0, size - 1 do
        for i = 1, n do assert.are.equal(value(q, i - 1), gathered[q * n + i]) end
      end
      for i = 1, n do
        assert.are.equal(reduced("sum", size, r * n + i - 1, "f32"), scattered[i])
        assert.are.equal(value(size - 1, i - 1), b[i])
      end
    end
  end)

  it("runs collectives on a sub-group made with ncclCommSplit", function()
    local results = run(function(rank)
      local group = dist.new_group({0, size - 1})
      if rank ~= 0 and rank ~= size - 1 then return "not a member" end
      local t = on_device({rank + 1}, "f32", rank)
      dist.all_reduce(t, "sum", {group = group})
      return host_list(t)[1]
    end)
    assert.are.equal(1 + size, results[1])
    assert.are.equal(1 + size, results[size])
  end)

  it("fails every rank with a mismatch instead of hanging", function()
    local results = run(function(rank)
      local t = on_device(values(rank, rank == 0 and 4 or 5), "f32", rank)
      local ok, err = pcall(dist.all_reduce, t, "sum")
      return ok and "no error" or tostring(err)
    end)
    for r = 1, size do
      assert.is_truthy(results[r]:find("ranks disagree", 1, true), results[r])
    end
  end)

  it("overlaps an all-gather with compute and orders the consumer after it", function()
    local results = run(function(rank)
      local device = gpu.rank_device(rank)
      local n = 1048576
      local gathered = ms.empty(size * n, {device = device})
      local shard = ms.full({n}, rank + 1, {device = device})
      dist.all_gather_into_tensor(gathered, shard)
      local busy = ms.randn(512, 512, {device = device})
      for _ = 1, 8 do busy = busy:matmul(busy):tanh() end -- independent compute
      return host_list(gathered:view(size, n):sum(1))
    end)
    local n = 1048576
    for r = 1, size do
      for q = 1, size do assert.are.equal(q * n, results[r][q]) end
    end
  end)
end)
