-- ms.data: DistributedSampler splits an epoch as PyTorch's does (padding, drop_last), and a
-- DataLoader saved mid-epoch in a real dcp store and resumed in new processes sees exactly
-- the batches of the uninterrupted run on 1 and 2 ranks; resumed on another world size, the
-- epoch still hands out every sample once. Also collate, drop_last and bad input.
local ms = require "moonshard"
local store_dirs = require "support.store_dirs"
local data, dist, dcp = ms.data, ms.dist, ms.dcp

local BATCH = 2

-- A loader over samples 0 .. n-1 (each item is its own id as an f64 tensor).
local function loader(n, opts)
  local sampler = data.DistributedSampler(n, {seed = 17, drop_last = opts and opts.drop_last})
  return data.DataLoader(ms.arange(0, n, 1, {dtype = "f64"}), {batch_size = BATCH, sampler = sampler}), sampler
end

local function ids(batch)
  local out = {}
  for i, v in ipairs(batch:table()) do out[i] = math.floor(v) end
  return out
end

-- Batches of epochs first..last as arrays of ids; with stop = {epoch =, after =} the run
-- ends after that many batches of that epoch.
local function run(l, sampler, first, last, stop)
  local seen = {}
  for epoch = first, last do
    sampler:set_epoch(epoch)
    local count = 0
    for batch in l:iter() do
      seen[#seen + 1] = {epoch = epoch, ids = ids(batch)}
      count = count + 1
      if stop and stop.epoch == epoch and stop.after == count then return seen end
    end
  end
  return seen
end

local function concat(a, b)
  local out = {unpack(a)}
  for _, v in ipairs(b) do out[#out + 1] = v end
  return out
end

describe("DistributedSampler", function()
  it("splits an epoch as PyTorch's does without shuffling, padding from the start or dropping the tail", function()
    local padded, dropped = {}, {}
    for r = 0, 2 do
      padded[r + 1] = data.DistributedSampler(10, {num_replicas = 3, rank = r, shuffle = false}):indices()
      dropped[r + 1] = data.DistributedSampler(10, {num_replicas = 3, rank = r, shuffle = false, drop_last = true}):indices()
    end
    -- torch.utils.data.DistributedSampler(range(10), num_replicas=3, rank=r, shuffle=False[, drop_last=True])
    assert.are.same({{0, 3, 6, 9}, {1, 4, 7, 0}, {2, 5, 8, 1}}, padded)
    assert.are.same({{0, 3, 6}, {1, 4, 7}, {2, 5, 8}}, dropped)
    assert.are.same({0}, data.DistributedSampler(2, {num_replicas = 5, rank = 4, shuffle = false}):indices())
    assert.equal(4, data.DistributedSampler(10, {num_replicas = 3, rank = 0}):len())
    assert.equal(3, data.DistributedSampler(10, {num_replicas = 3, rank = 0, drop_last = true}):len())
  end)

  it("shuffles with seed + epoch: one permutation for every rank, another each epoch", function()
    local function order(seed, epoch)
      local s = data.DistributedSampler(50, {num_replicas = 1, rank = 0, seed = seed})
      s:set_epoch(epoch)
      return s:indices()
    end
    local a = order(3, 0)
    local sorted = {unpack(a)}
    table.sort(sorted)
    for i = 1, 50 do assert.equal(i - 1, sorted[i]) end
    assert.are.same(a, order(3, 0))
    assert.are_not.same(a, order(3, 1))
    assert.are_not.same(a, order(4, 0))
    local union = {}
    for r = 0, 3 do
      local s = data.DistributedSampler(50, {num_replicas = 4, rank = r, seed = 3})
      for i, v in ipairs(s:indices()) do union[(i - 1) * 4 + r + 1] = v end
    end
    for i = 1, 50 do assert.equal(a[i], union[i]) end
  end)

  it("names a rank outside the replicas and other bad options", function()
    local function err(...) return select(2, pcall(data.DistributedSampler, ...)) end
    assert.matches("moonshard: DistributedSampler: rank must be an integer in %[0, 2%) %(num_replicas = 2%), got 2",
                   err(10, {num_replicas = 2, rank = 2}))
    assert.matches("rank must be an integer in %[0, 1%)", err(10, {rank = -1}))
    assert.matches("num_replicas must be an integer >= 1, got 0", err(10, {num_replicas = 0}))
    assert.matches("unknown option 'shufle'", err(10, {shufle = true}))
    assert.matches("expected a dataset", err("ten"))
    local s = data.DistributedSampler(10)
    assert.matches("the state dict is for a dataset of 12 samples, this sampler has 10",
                   select(2, pcall(s.load_state_dict, s, {epoch = 0, consumed = 4, seed = 0, n = 12})))
  end)
end)

describe("DataLoader", function()
  it("collates tensors, numbers and tables, and drops a short last batch when asked", function()
    local items = {}
    for i = 0, 6 do items[i + 1] = {x = ms.full({2}, i), y = i, name = "s" .. i} end
    local l = data.DataLoader(items, {batch_size = 3})
    assert.equal(3, l:len())
    local batches = {}
    for b in l:iter() do batches[#batches + 1] = b end
    assert.equal(3, #batches)
    assert.are.same({{0, 0}, {1, 1}, {2, 2}}, batches[1].x:table())
    assert.equal("i64", batches[1].y:dtype())
    assert.are.same({6}, batches[3].y:table())
    assert.are.same({"s0", "s1", "s2"}, batches[1].name)
    local dropping = data.DataLoader(items, {batch_size = 3, drop_last = true})
    local count = 0
    for _ in dropping:iter() do count = count + 1 end
    assert.equal(2, count)
    assert.equal(2, dropping:len())
    local custom = data.DataLoader({10, 20, 30}, {batch_size = 2, collate_fn = function(xs) return #xs end})
    local sizes = {}
    for b in custom:iter() do sizes[#sizes + 1] = b end
    assert.are.same({2, 1}, sizes)
  end)

  local function epoch_of(loader)
    local order = {}
    for b in loader:iter() do for _, v in ipairs(b:table()) do order[#order + 1] = v end end
    return table.concat(order, ",")
  end

  it("saved during the last, short batch, resumes at the end of the epoch; after the loop, at the next", function()
    local ds = {}
    for i = 1, 10 do ds[i] = i - 1 end
    local loader, during = data.DataLoader(ds, {batch_size = 4}), nil
    for _ in loader:iter() do during = loader:state_dict() end
    local resumed = data.DataLoader(ds, {batch_size = 4})
    resumed:load_state_dict(during)
    assert.are.equal("", epoch_of(resumed)) -- the epoch's batches were all taken
    assert.are.equal("0,1,2,3,4,5,6,7,8,9", epoch_of(resumed)) -- then the next epoch
    local after = data.DataLoader(ds, {batch_size = 4})
    after:load_state_dict(loader:state_dict())
    assert.are.equal("0,1,2,3,4,5,6,7,8,9", epoch_of(after))
  end)

  -- PyTorch's shuffling DataLoader draws a new order every epoch from the global generator
  it("with shuffle draws a new order each epoch, decided by ms.manual_seed", function()
    local ds = {}
    for i = 1, 10 do ds[i] = i - 1 end
    ms.manual_seed(123)
    local a = data.DataLoader(ds, {batch_size = 4, shuffle = true})
    local first, second = epoch_of(a), epoch_of(a)
    assert.are_not.equal(first, second)
    ms.manual_seed(123)
    local again = data.DataLoader(ds, {batch_size = 4, shuffle = true})
    assert.are.equal(first, epoch_of(again))
    assert.are.equal(second, epoch_of(again))
    ms.manual_seed(7)
    assert.are_not.equal(first, epoch_of(data.DataLoader(ds, {batch_size = 4, shuffle = true})))
    -- resumed between the epochs, the next epoch's order
    local resumed = data.DataLoader(ds, {batch_size = 4, shuffle = true, seed = 5})
    local reference = data.DataLoader(ds, {batch_size = 4, shuffle = true, seed = 5})
    epoch_of(reference)
    resumed:load_state_dict(reference:state_dict())
    assert.are.equal(epoch_of(reference), epoch_of(resumed))
  end)

  it("names a nil item and a sampler index outside the dataset, as PyTorch raises", function()
    local holes = {len = function() return 5 end, get = function(_, i) if i ~= 2 then return i end end}
    local ok, err = pcall(function() for _ in data.DataLoader(holes, {batch_size = 2}):iter() do end end)
    assert.is_false(ok)
    assert.matches("DataLoader: dataset item 2 is nil", err)
    local long = data.DistributedSampler(20, {num_replicas = 1, rank = 0, shuffle = false})
    ok, err = pcall(function() for _ in data.DataLoader({1, 2, 3}, {batch_size = 2, sampler = long}):iter() do end end)
    assert.is_false(ok)
    assert.matches("DataLoader: the sampler gave index 3, outside the dataset of 3 items", err)
  end)

  it("names bad options", function()
    local function err(...) return select(2, pcall(data.DataLoader, ...)) end
    assert.matches("DataLoader: batch_size must be an integer >= 1, got 0", err({1, 2}, {batch_size = 0}))
    assert.matches("DataLoader: sampler must be an object with iter%(%)", err({1, 2}, {sampler = 3}))
    assert.matches("DataLoader: collate_fn must be callable", err({1, 2}, {collate_fn = "stack"}))
    assert.matches("DataLoader: expected a dataset", err(7))
  end)

  describe("resumed mid-epoch from a dcp store", function()
    local dir
    before_each(store_dirs.before(function(path) dir = path end))
    after_each(store_dirs.after)

    for _, size in ipairs({1, 2}) do
      it("sees exactly the uninterrupted run's batches on " .. size .. " rank(s)", function()
        local n = 23
        local uninterrupted = dist.spawn(size, function()
          local l, sampler = loader(n)
          return run(l, sampler, 0, 2)
        end)
        local first = dist.spawn(size, function()
          local l, sampler = loader(n)
          local seen = run(l, sampler, 0, 2, {epoch = 1, after = 2})
          dcp.save({loader = l, epoch = 1}, dir)
          return seen
        end)
        local second = dist.spawn(size, function()
          local l, sampler = loader(n)
          local sd = {loader = l, epoch = 0}
          dcp.load(sd, dir)
          assert.equal(l, sd.loader)
          return run(l, sampler, sd.epoch, 2)
        end)
        for r = 1, size do
          assert.is_true(#first[r] < #uninterrupted[r])
          assert.are.same(uninterrupted[r], concat(first[r], second[r]), "rank " .. (r - 1))
        end
      end)
    end

    for _, case in ipairs({{n = 24, padding = 0}, {n = 23, padding = 1}}) do
      it(("hands out each sample of the epoch once after resuming 2 ranks on 3 (%d samples)"):format(case.n), function()
        local first = dist.spawn(2, function()
          local l, sampler = loader(case.n)
          local seen = run(l, sampler, 0, 0, {epoch = 0, after = 3})
          dcp.save({loader = l}, dir)
          return seen
        end)
        local second = dist.spawn(3, function()
          local l, sampler = loader(case.n)
          dcp.load({loader = l}, dir)
          return run(l, sampler, 0, 0)
        end)
        local count, total = {}, 0
        for _, runs in ipairs({first, second}) do
          for _, rank_batches in ipairs(runs) do
            for _, b in ipairs(rank_batches) do
              for _, id in ipairs(b.ids) do
                count[id] = (count[id] or 0) + 1
                total = total + 1
              end
            end
          end
        end
        for id = 0, case.n - 1 do assert.is_true(count[id] ~= nil, "sample " .. id .. " was never seen") end
        assert.equal(case.n + case.padding, total) -- padding repeats samples as PyTorch's does
        local twice = 0
        for _, c in pairs(count) do if c > 1 then twice = twice + c - 1 end end
        assert.equal(case.padding, twice)
      end)
    end
  end)
end)
