-- Collectives on every dtype and op, empty and odd sizes, world sizes 1 to 4, in place,
-- sub-groups, and bitwise identical results. Runs as is (forked ranks) and under
-- mpirun -n 4, where dist.spawn(n) runs on the first n processes.
local ms = require "moonshard"
local global_state = require "support.global_state"
local dist = ms.dist

local DTYPES = {"f32", "f64", "bf16", "f16", "i32", "i64", "u8"}
local OPS = {"sum", "avg", "max", "min"}
local SIZES = {0, 1, 7, 1001}
-- Above 64 KiB, where all_reduce reduces per-rank pieces and every collective first asks
-- whether the ranks' buffers can be copied directly.
local LARGE = {f32 = 70001, bf16 = 70001}

local function sizes_for(dtype)
  local sizes = {unpack(SIZES)}
  sizes[#sizes + 1] = LARGE[dtype]
  return sizes
end
local FLOATING = {f32 = true, f64 = true, bf16 = true, f16 = true}

-- The ops a dtype takes: avg only for floating dtypes (an integer average raises, as in
-- torch.distributed; dist_review_fixes_spec checks the error).
local function ops_for(dtype)
  return FLOATING[dtype] and OPS or {"sum", "max", "min"}
end

-- What rank r holds at element i: small integers, exact in every dtype, whose averages
-- over 1 to 4 ranks are multiples of 0.5.
local function value(r, i) return (r + 1) * 3 + i % 17 end

local function values(r, n, first)
  local out = {}
  for i = 1, n do out[i] = value(r, (first or 0) + i - 1) end
  return out
end

local function tensor_of(list, dtype)
  if #list == 0 then return ms.empty(0, {dtype = dtype}) end
  return ms.tensor(list, {dtype = dtype})
end

local function reduced(op, size, dtype, i)
  local sum = 0
  for r = 0, size - 1 do sum = sum + value(r, i) end
  if op == "sum" then return sum end
  if op == "max" then return value(size - 1, i) end
  if op == "min" then return value(0, i) end
  return sum / size
end

-- Descriptions of the elements of got that differ from want (at most three).
local function differences(label, got, want)
  local out = {}
  if #got ~= #want then return {label .. ": " .. #got .. " elements, expected " .. #want} end
  for i = 1, #want do
    if got[i] ~= want[i] and #out < 3 then
      out[#out + 1] = string.format("%s: element %d is %s, expected %s", label, i - 1,
                                    tostring(got[i]), tostring(want[i]))
    end
  end
  return out
end

local function append(all, more)
  for _, m in ipairs(more) do all[#all + 1] = m end
end

-- Runs check(rank, size) on size ranks; every rank returns its list of differences.
local function expect_no_differences(size, check)
  local results = dist.spawn(size, function(rank) return check(rank, size) end)
  for r = 1, size do assert.are.same({}, results[r], "rank " .. (r - 1)) end
end

for size = 1, 4 do
  describe("on " .. size .. " rank" .. (size > 1 and "s" or ""), function()
    it("all_reduce applies sum, max and min to every dtype, and avg to the floating ones", function()
      expect_no_differences(size, function(rank)
        local found = {}
        for _, dtype in ipairs(DTYPES) do
          for _, op in ipairs(ops_for(dtype)) do
            for _, n in ipairs(sizes_for(dtype)) do
              local t = tensor_of(values(rank, n), dtype)
              dist.all_reduce(t, op)
              local want = {}
              for i = 1, n do want[i] = reduced(op, size, dtype, i - 1) end
              append(found, differences(dtype .. " " .. op .. " n=" .. n, t:table(), want))
            end
          end
        end
        return found
      end)
    end)

    it("all_gather_into_tensor concatenates in rank order, also in place", function()
      expect_no_differences(size, function(rank)
        local found = {}
        for _, dtype in ipairs(DTYPES) do
          for _, n in ipairs(sizes_for(dtype)) do
            local want = {}
            for r = 0, size - 1 do append(want, values(r, n)) end
            local out = ms.zeros(size * n, {dtype = dtype})
            dist.all_gather_into_tensor(out, tensor_of(values(rank, n), dtype))
            append(found, differences(dtype .. " n=" .. n, out:table(), want))
            local in_place = ms.zeros(size * n, {dtype = dtype})
            local mine = in_place:narrow(0, rank * n, n)
            mine:copy_(tensor_of(values(rank, n), dtype))
            dist.all_gather_into_tensor(in_place, mine)
            append(found, differences(dtype .. " in place n=" .. n, in_place:table(), want))
          end
        end
        return found
      end)
    end)

    it("reduce_scatter_tensor reduces each rank's block, also in place", function()
      expect_no_differences(size, function(rank)
        local found = {}
        for _, dtype in ipairs(DTYPES) do
          for _, op in ipairs(ops_for(dtype)) do
            for _, n in ipairs(sizes_for(dtype)) do
              local input = tensor_of(values(rank, size * n), dtype)
              local out = ms.zeros(n, {dtype = dtype})
              dist.reduce_scatter_tensor(out, input, op)
              local want = {}
              for i = 1, n do want[i] = reduced(op, size, dtype, rank * n + i - 1) end
              append(found, differences(dtype .. " " .. op .. " n=" .. n, out:table(), want))
              local block = input:narrow(0, rank * n, n)
              dist.reduce_scatter_tensor(block, input, op)
              append(found, differences(dtype .. " " .. op .. " in place", block:table(), want))
            end
          end
        end
        return found
      end)
    end)

    it("broadcast copies the source rank's tensor everywhere", function()
      expect_no_differences(size, function(rank)
        local found = {}
        for _, dtype in ipairs(DTYPES) do
          for _, n in ipairs(sizes_for(dtype)) do
            for src = 0, size - 1 do
              local t = tensor_of(values(rank, n), dtype)
              dist.broadcast(t, src)
              append(found, differences(dtype .. " n=" .. n .. " from " .. src, t:table(),
                                        values(src, n)))
            end
          end
        end
        dist.barrier()
        return found
      end)
    end)

    it("reports its rank and world size", function()
      local results = dist.spawn(size, function(rank, world_size)
        return {rank = dist.get_rank(), size = dist.get_world_size(), given = world_size,
                expected_rank = rank, backend = dist.get_backend()}
      end)
      for r = 1, size do
        assert.are.equal(r - 1, results[r].rank)
        assert.are.equal(r - 1, results[r].expected_rank)
        assert.are.equal(size, results[r].size)
        assert.are.equal(size, results[r].given)
        assert.is_truthy(results[r].backend == "local" or results[r].backend == "mpi")
      end
    end)
  end)
end

before_each(global_state.save)
after_each(global_state.restore)

describe("small segment chunks", function()
  it("carry every collective through many ring steps", function()
    local ffi = require "ffi"
    if not pcall(function() return ffi.C.setenv end) then
      ffi.cdef "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);"
    end
    ffi.C.setenv("MOONSHARD_COMM_CHUNK_KB", "16", 1)
    local ok, results = pcall(dist.spawn, 3, function(rank)
      local found, size = {}, 3
      for _, dtype in ipairs({"f32", "bf16", "i64"}) do
        for _, n in ipairs({1001, 70001}) do
          local label = dtype .. " n=" .. n
          for _, op in ipairs({"sum", "max"}) do
            local t = tensor_of(values(rank, n), dtype)
            dist.all_reduce(t, op)
            local want = {}
            for i = 1, n do want[i] = reduced(op, size, dtype, i - 1) end
            append(found, differences(label .. " all_reduce " .. op, t:table(), want))
          end
          local gathered, want = ms.zeros(size * n, {dtype = dtype}), {}
          dist.all_gather_into_tensor(gathered, tensor_of(values(rank, n), dtype))
          for r = 0, size - 1 do append(want, values(r, n)) end
          append(found, differences(label .. " all_gather", gathered:table(), want))
          local out = ms.zeros(n, {dtype = dtype})
          local op = FLOATING[dtype] and "avg" or "sum"
          dist.reduce_scatter_tensor(out, tensor_of(values(rank, size * n), dtype), op)
          want = {}
          for i = 1, n do want[i] = reduced(op, size, dtype, rank * n + i - 1) end
          append(found, differences(label .. " reduce_scatter", out:table(), want))
          local t = tensor_of(values(rank, n), dtype)
          dist.broadcast(t, 2)
          append(found, differences(label .. " broadcast", t:table(), values(2, n)))
        end
      end
      return found
    end)
    ffi.C.unsetenv("MOONSHARD_COMM_CHUNK_KB")
    assert(ok, results)
    for r = 1, 3 do assert.are.same({}, results[r], "rank " .. (r - 1)) end
  end)
end)

describe("results", function()
  it("are bitwise identical on every rank for inexact float sums", function()
    local results = dist.spawn(3, function(rank)
      ms.manual_seed(rank + 1)
      local out = {}
      for _, dtype in ipairs({"f32", "bf16", "f16"}) do
        local t = (ms.randn(50001) * 100):to(dtype)
        dist.all_reduce(t, "sum")
        out[dtype] = t
      end
      return out
    end)
    for _, dtype in ipairs({"f32", "bf16", "f16"}) do
      assert.is_true(ms.equal(results[1][dtype], results[2][dtype]))
      assert.is_true(ms.equal(results[1][dtype], results[3][dtype]))
    end
  end)
end)

describe("sub-groups", function()
  it("run collectives among their members and tell non-members apart", function()
    local results = dist.spawn(4, function(rank)
      local evens, odds = dist.new_group({0, 2}), dist.new_group({1, 3})
      local upper = dist.new_group({3, 1, 2})
      local mine = rank % 2 == 0 and evens or odds
      local t = ms.full({5}, rank + 1)
      dist.all_reduce(t, "sum", {group = mine})
      local b = ms.full({3}, rank)
      if upper:rank() >= 0 then dist.broadcast(b, 3, {group = upper}) end
      local gathered = ms.zeros(4)
      dist.all_gather_into_tensor(gathered, ms.full({2}, rank), {group = mine})
      return {sum = t:table()[1], group_rank = mine:rank(), upper_rank = upper:rank(),
              upper_ranks = upper:ranks(), b = b:table()[1], gathered = gathered:table(),
              size = dist.get_world_size(mine)}
    end)
    for r = 0, 3 do
      local got = results[r + 1]
      assert.are.equal(r % 2 == 0 and 4 or 6, got.sum)
      assert.are.equal(math.floor(r / 2), got.group_rank)
      assert.are.equal(2, got.size)
      assert.are.same({1, 2, 3}, got.upper_ranks)
      assert.are.equal(r == 0 and -1 or r - 1, got.upper_rank)
      assert.are.equal(r == 0 and 0 or 3, got.b)
      local first = r % 2
      assert.are.same({first, first, first + 2, first + 2}, got.gathered)
    end
  end)

  it("run every collective on their members' data, in group order", function()
    local results = dist.spawn(4, function(rank)
      local found = {}
      for _, members in ipairs({{0, 2}, {1, 3}, {1, 2, 3}, {3}}) do
        local group = dist.new_group(members)
        local me = group:rank()
        if me >= 0 then
          local opts, m = {group = group}, #members
          for _, dtype in ipairs({"f32", "bf16", "i64"}) do
            for _, n in ipairs({1, 7, LARGE[dtype] or 1001}) do
              local label = table.concat(members, ",") .. " " .. dtype .. " n=" .. n
              local function over_members(i, op)
                local sum, most = 0, -math.huge
                for _, r in ipairs(members) do
                  sum = sum + value(r, i)
                  most = math.max(most, value(r, i))
                end
                if op == "max" then return most end
                if op == "avg" then return sum / m end
                return sum
              end
              for _, op in ipairs(FLOATING[dtype] and {"sum", "avg", "max"} or {"sum", "max"}) do
                local t = tensor_of(values(rank, n), dtype)
                dist.all_reduce(t, op, opts)
                local want = {}
                for i = 1, n do want[i] = over_members(i - 1, op) end
                append(found, differences(label .. " all_reduce " .. op, t:table(), want))
              end
              local gathered, want = ms.zeros(m * n, {dtype = dtype}), {}
              dist.all_gather_into_tensor(gathered, tensor_of(values(rank, n), dtype), opts)
              for _, r in ipairs(members) do append(want, values(r, n)) end
              append(found, differences(label .. " all_gather", gathered:table(), want))
              local scattered = ms.zeros(n, {dtype = dtype})
              dist.reduce_scatter_tensor(scattered, tensor_of(values(rank, m * n), dtype), opts)
              want = {}
              for i = 1, n do want[i] = over_members(me * n + i - 1, "sum") end
              append(found, differences(label .. " reduce_scatter", scattered:table(), want))
              local src = members[m]
              local t = tensor_of(values(rank, n), dtype)
              dist.broadcast(t, src, opts)
              append(found, differences(label .. " broadcast", t:table(), values(src, n)))
            end
          end
          dist.barrier(opts)
        end
      end
      return found
    end)
    for r = 1, 4 do assert.are.same({}, results[r], "rank " .. (r - 1)) end
  end)

  it("refuse collectives from non-members and ranks outside the world", function()
    local results = dist.spawn(2, function(rank)
      local solo = dist.new_group({0})
      local ok, err = pcall(dist.all_reduce, ms.zeros(2), "sum", {group = solo})
      local bad_ok, bad_err = pcall(dist.new_group, {0, 5})
      return {ok = ok, err = err, bad_ok = bad_ok, bad_err = bad_err, rank = rank}
    end)
    assert.is_true(results[1].ok)
    assert.is_false(results[2].ok)
    assert.matches("not a member", results[2].err)
    assert.is_false(results[1].bad_ok)
    assert.matches("rank 5 is not in the world", results[1].bad_err)
  end)
end)

describe("arguments", function()
  it("are checked before any rank waits", function()
    local results = dist.spawn(2, function()
      local errors = {}
      local function try(...)
        local ok, err = pcall(...)
        errors[#errors + 1] = ok and "no error" or err
      end
      try(dist.all_reduce, ms.zeros(4), "mean")
      try(dist.all_reduce, ms.zeros(2, 3):t(), "sum")
      try(dist.all_gather_into_tensor, ms.zeros(5), ms.zeros(2))
      try(dist.reduce_scatter_tensor, ms.zeros(2), ms.zeros(4, {dtype = "f64"}), "sum")
      try(dist.broadcast, ms.zeros(2), 7)
      try(dist.all_reduce, {1, 2}, "sum")
      try(dist.reduce_scatter_tensor, ms.zeros(2), ms.zeros(5), "sum")
      try(dist.all_gather_into_tensor, ms.zeros(4, {dtype = "i32"}), ms.zeros(2))
      dist.barrier()
      return errors
    end)
    local errors = results[1]
    assert.matches("unknown op 'mean'", errors[1])
    assert.matches("contiguous", errors[2])
    assert.matches("expected 2 ranks %* 2", errors[3])
    assert.matches("f32 but input is f64", errors[4])
    assert.matches("src 7 is not a member", errors[5])
    assert.matches("must be a tensor", errors[6])
    assert.matches("input has 5 elements, expected 2 ranks %* 2", errors[7])
    assert.matches("output is i32 but input is f32", errors[8])
  end)
end)
