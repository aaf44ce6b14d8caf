-- The nccl backend on forked ranks, one GPU each: every collective, dtype and op against
-- values worked out here, sub-groups through ncclCommSplit, mismatched calls, and a
-- collective overlapping compute on the communication stream.
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
  local avg = sum / size
  return FLOATING[dtype] and avg or math.floor(avg)
end

local function on_device(list, dtype, rank)
  return ms.tensor(list, {dtype = dtype}):to(gpu.rank_device(rank))
end

local function host_list(t) return t:to("cpu"):to("f64"):table() end

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

  it("all-reduces every dtype with every op", function()
    local failures = run(function(rank)
      local wrong = {}
      for _, dtype in ipairs(DTYPES) do
        for _, op in ipairs({"sum", "avg", "max", "min"}) do
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
