-- Device meshes: layouts, groups per mesh dim by number or name, local ranks, equality,
-- and the replicate and shard groups HYBRID_SHARD uses. Runs as is and under mpirun -n 4.
local ms = require "moonshard"
local dist = ms.dist

describe("init_device_mesh", function()
  it("lays 4 ranks out as 2 x 2 with replicate and shard groups", function()
    local results = dist.spawn(4, function(rank)
      local mesh = dist.init_device_mesh({2, 2}, {mesh_dim_names = {"replicate", "shard"}})
      local shard = ms.full({1}, rank)
      dist.all_reduce(shard, "sum", {group = mesh:get_group("shard")})
      local replicate = ms.full({1}, rank)
      dist.all_reduce(replicate, "sum", {group = mesh:get_group(0)})
      return {ndim = mesh:ndim(), size = mesh:size(), sizes = {mesh:size(0), mesh:size("shard")},
              coordinate = mesh:get_coordinate(),
              local_ranks = {mesh:get_local_rank("replicate"), mesh:get_local_rank(1)},
              shard_ranks = mesh:get_group(1):ranks(), replicate_ranks = mesh:get_group("replicate"):ranks(),
              shard_sum = shard:item(), replicate_sum = replicate:item(),
              text = tostring(mesh), names = mesh.mesh_dim_names, rank = mesh:get_rank(),
              sub = tostring(mesh.shard), sub_size = mesh.shard:size()}
    end)
    for r = 0, 3 do
      local got = results[r + 1]
      local row, column = math.floor(r / 2), r % 2
      assert.are.equal(2, got.ndim)
      assert.are.equal(4, got.size)
      assert.are.same({2, 2}, got.sizes)
      assert.are.same({row, column}, got.coordinate)
      assert.are.same({row, column}, got.local_ranks)
      assert.are.same({2 * row, 2 * row + 1}, got.shard_ranks)
      assert.are.same({column, column + 2}, got.replicate_ranks)
      assert.are.equal(4 * row + 1, got.shard_sum)
      assert.are.equal(2 * column + 2, got.replicate_sum)
      assert.are.equal("DeviceMesh('cpu', [[0, 1], [2, 3]], mesh_dim_names=('replicate', 'shard'))", got.text)
      assert.are.same({"replicate", "shard"}, got.names)
      assert.are.equal(r, got.rank)
      assert.are.equal(2, got.sub_size)
      assert.are.equal(string.format("DeviceMesh('cpu', [%d, %d], mesh_dim_names=('shard'))", 2 * row, 2 * row + 1), got.sub)
    end
  end)

  it("makes 1-D meshes whose one group is the world", function()
    local results = dist.spawn(3, function(rank)
      local mesh = dist.init_device_mesh("cpu", {3})
      local t = ms.full({2}, rank)
      dist.all_reduce(t, "max", {group = mesh:get_group()})
      return {ranks = mesh:get_group():ranks(), size = mesh:size(0), local_rank = mesh:get_local_rank(),
              max = t:table()[1], names = mesh.mesh_dim_names == nil}
    end)
    for r = 0, 2 do
      assert.are.same({0, 1, 2}, results[r + 1].ranks)
      assert.are.equal(3, results[r + 1].size)
      assert.are.equal(r, results[r + 1].local_rank)
      assert.are.equal(2, results[r + 1].max)
      assert.is_true(results[r + 1].names)
    end
  end)

  it("handles degenerate dims: 4 x 1 and 1 x 4", function()
    local results = dist.spawn(4, function(rank)
      local tall = dist.init_device_mesh({4, 1}, {mesh_dim_names = {"replicate", "shard"}})
      local wide = dist.init_device_mesh({1, 4}, {mesh_dim_names = {"replicate", "shard"}})
      return {tall_shard = tall:get_group("shard"):ranks(), tall_replicate = tall:get_group("replicate"):ranks(),
              wide_shard = wide:get_group("shard"):ranks(), wide_local = wide:get_local_rank("shard"),
              rank = rank}
    end)
    for r = 0, 3 do
      assert.are.same({r}, results[r + 1].tall_shard)
      assert.are.same({0, 1, 2, 3}, results[r + 1].tall_replicate)
      assert.are.same({0, 1, 2, 3}, results[r + 1].wide_shard)
      assert.are.equal(r, results[r + 1].wide_local)
    end
  end)

  it("compares meshes by layout and names", function()
    local results = dist.spawn(4, function()
      local names = {mesh_dim_names = {"replicate", "shard"}}
      local a, b = dist.init_device_mesh({2, 2}, names), dist.init_device_mesh({2, 2}, names)
      local flat = dist.init_device_mesh({4})
      local unnamed = dist.init_device_mesh({2, 2})
      return {same = a == b, flat = a == flat, unnamed = a == unnamed}
    end)
    for r = 1, 4 do
      assert.is_true(results[r].same)
      assert.is_false(results[r].flat)
      assert.is_false(results[r].unnamed)
    end
  end)

  it("explains bad shapes and unknown dims", function()
    local results = dist.spawn(2, function()
      local errors = {}
      local function try(fn)
        local ok, err = pcall(fn)
        errors[#errors + 1] = ok and "no error" or err
      end
      try(function() dist.init_device_mesh({3}) end)
      try(function() dist.init_device_mesh({2}, {mesh_dim_names = {"a", "b"}}) end)
      try(function() dist.init_device_mesh("cuda", {2}) end)
      local mesh = dist.init_device_mesh({2, 1}, {mesh_dim_names = {"replicate", "shard"}})
      try(function() mesh:get_group("tensor") end)
      try(function() mesh:get_group(2) end)
      try(function() mesh:get_group() end)
      return errors
    end)
    local errors = results[1]
    assert.matches("holds 3 ranks but the world has 2", errors[1])
    assert.matches("one name per mesh dim", errors[2])
    assert.matches("device type 'cuda'", errors[3])
    assert.matches("no mesh dim named 'tensor' %(dims: replicate, shard%)", errors[4])
    assert.matches("mesh dim 2 outside %[0, 2%)", errors[5])
    assert.matches("a 2%-D mesh needs a mesh dim", errors[6])
  end)
end)
