-- DTensor on forked ranks: sharding on dim 0 with ceil-sized chunks, to_local, full_tensor,
-- the global shape and redistribute between Shard(0) and Replicate on 1-D and 2-D meshes.
local ms = require "moonshard"
local dist = ms.dist
local DTensor = require "moonshard.dtensor"

-- Rows [start, start + length) that rank r of a group of size g holds of n rows.
local function expected_rows(n, g, r)
  local chunk = math.ceil(n / g)
  local start = math.min(r * chunk, n)
  return start, math.min(chunk, n - start)
end

-- A [rows, 3] tensor whose element (i, j) is 10 * i + j.
local function numbered(rows)
  local values = {}
  for i = 1, rows do values[i] = {10 * (i - 1), 10 * (i - 1) + 1, 10 * (i - 1) + 2} end
  return ms.tensor(values, {dtype = "f64"})
end

local function first_column(t)
  local out = {}
  for i, row in ipairs(t:table()) do out[i] = row[1] end
  return out
end

local function rows_from(start, length)
  local out = {}
  for i = 1, length do out[i] = 10 * (start + i - 1) end
  return out
end

describe("DTensor", function()
  it("shards rows in ceil-sized chunks, leaving later ranks fewer or none", function()
    local results = dist.spawn(4, function(rank)
      local mesh = dist.init_device_mesh({4})
      local d = DTensor.distribute(numbered(5), mesh, {ms.Shard(0)})
      return {local_rows = d:to_local():size(0), column = d:to_local():numel() > 0 and first_column(d:to_local()) or {},
              shape = {unpack(d:shape())}, rank = rank}
    end)
    for r = 0, 3 do
      local start, length = expected_rows(5, 4, r)
      assert.equal(length, results[r + 1].local_rows)
      assert.same(rows_from(start, length), results[r + 1].column)
      assert.same({5, 3}, results[r + 1].shape)
    end
    assert.equal(0, results[4].local_rows)
  end)

  it("full_tensor gathers the original on every rank of a 1-D mesh", function()
    local results = dist.spawn(3, function()
      local mesh = dist.init_device_mesh({3})
      local full = numbered(7)
      local d = DTensor.distribute(full, mesh, {ms.Shard(0)})
      return ms.equal(d:full_tensor(), full)
    end)
    assert.same({true, true, true}, results)
  end)

  it("redistributes Shard(0) to Replicate and back on a 1-D mesh", function()
    local results = dist.spawn(3, function(rank)
      local mesh = dist.init_device_mesh({3})
      local full = numbered(8)
      local sharded = DTensor.distribute(full, mesh, {ms.Shard(0)})
      local replicated = sharded:redistribute(mesh, {ms.Replicate()})
      local again = replicated:redistribute(mesh, {ms.Shard(0)})
      return {replicated_whole = ms.equal(replicated:to_local(), full),
              placement = tostring(replicated.placements[1]),
              again_rows = first_column(again:to_local()), rank = rank}
    end)
    for r = 0, 2 do
      local start, length = expected_rows(8, 3, r)
      assert.is_true(results[r + 1].replicated_whole)
      assert.equal("Replicate()", results[r + 1].placement)
      assert.same(rows_from(start, length), results[r + 1].again_rows)
    end
  end)

  it("on a 2x2 mesh shards over the shard dim and replicates over the other", function()
    local results = dist.spawn(4, function(rank)
      local mesh = dist.init_device_mesh({2, 2}, {mesh_dim_names = {"replicate", "shard"}})
      local full = numbered(5)
      local d = DTensor.distribute(full, mesh, {ms.Replicate(), ms.Shard(0)})
      local whole = d:redistribute(mesh, {ms.Replicate(), ms.Replicate()})
      local on_replicate_dim = d:redistribute(mesh, {ms.Shard(0), ms.Replicate()})
      return {rows = first_column(d:to_local()), shard_rank = mesh:get_local_rank("shard"),
              replicate_rank = mesh:get_local_rank("replicate"),
              full = ms.equal(d:full_tensor(), full), whole = ms.equal(whole:to_local(), full),
              other_rows = first_column(on_replicate_dim:to_local())}
    end)
    for r = 0, 3 do
      local res = results[r + 1]
      assert.equal(r % 2, res.shard_rank)
      assert.equal(math.floor(r / 2), res.replicate_rank)
      assert.same(rows_from(expected_rows(5, 2, res.shard_rank)), res.rows)
      assert.same(rows_from(expected_rows(5, 2, res.replicate_rank)), res.other_rows)
      assert.is_true(res.full)
      assert.is_true(res.whole)
    end
  end)

  it("compares placements and meshes with == and prints them like PyTorch", function()
    assert.is_true(ms.Shard(0) == ms.Shard(0))
    assert.is_false(ms.Shard(0) == ms.Replicate())
    assert.equal("Shard(0)", tostring(ms.Shard(0)))
    assert.equal("Replicate()", tostring(ms.Replicate()))
    local results = dist.spawn(2, function()
      local a = dist.init_device_mesh({2})
      local b = dist.init_device_mesh({2})
      local d = DTensor.distribute(numbered(3), a, {ms.Shard(0)})
      return {same = a == b, mesh_kept = d.device_mesh == b}
    end)
    assert.same({same = true, mesh_kept = true}, results[1])
  end)

  it("refuses placements that do not match the mesh", function()
    local results = dist.spawn(2, function()
      local mesh = dist.init_device_mesh({2})
      local ok, err = pcall(DTensor.distribute, numbered(3), mesh, {ms.Shard(0), ms.Replicate()})
      return {ok = ok, err = tostring(err)}
    end)
    assert.is_false(results[1].ok)
    assert.matches("2 placements for a 1%-D mesh", results[1].err)
  end)
end)
