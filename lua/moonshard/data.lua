-- Data loading with PyTorch's names: DistributedSampler (each rank its share of an epoch's
-- order, resumable mid-epoch on any world size) and DataLoader (batches through a collate_fn).
local ffi = require "ffi"
local bit = require "bit"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local shape_ops = require "moonshard.ops.shape"
local random = require "moonshard.random"

local fail = C.fail

local M = {}

local function dist() return require "moonshard.dist" end

local function check_count(what, key, value, minimum)
  if type(value) ~= "number" or value % 1 ~= 0 or value < minimum then
    fail(what, "%s must be an integer >= %d, got %s", key, minimum, tostring(value))
  end
end

local function check_options(what, opts, allowed)
  if opts == nil then return {} end
  if type(opts) ~= "table" then fail(what, "options must be a table, got %s", type(opts)) end
  for key in pairs(opts) do
    if not allowed[key] then fail(what, "unknown option '%s'", tostring(key)) end
  end
  return opts
end

-- ---- datasets ----

-- A dataset is a tensor (items along dim 0), an array (item i is dataset[i + 1]) or an
-- object with len() and get(i); indices are 0-based as in PyTorch.
local function dataset_length(dataset, what)
  if Tensor.is_tensor(dataset) then return dataset:size(0) end
  if type(dataset) == "table" then
    if type(dataset.len) == "function" then return dataset:len() end
    if getmetatable(dataset) == nil then return #dataset end
  end
  fail(what, "expected a dataset (a tensor, an array, or an object with len() and get(i)), got %s", type(dataset))
end

local function dataset_item(dataset, i)
  if Tensor.is_tensor(dataset) then return dataset:select(0, i) end
  if type(dataset.get) == "function" then return dataset:get(i) end
  return dataset[i + 1]
end

-- ---- the permutation ----

-- SplitMix64 seeded with seed + epoch drives a Fisher-Yates shuffle: every process draws
-- the same order for the same (seed, epoch). (PyTorch draws torch.randperm with its own
-- generator; the order differs, the semantics do not.)
local function permutation(n, seed)
  local state = ffi.new("uint64_t[1]", seed)
  local function next_u64()
    state[0] = state[0] + 0x9E3779B97F4A7C15ULL
    local z = state[0]
    z = bit.bxor(z, bit.rshift(z, 30)) * 0xBF58476D1CE4E5B9ULL
    z = bit.bxor(z, bit.rshift(z, 27)) * 0x94D049BB133111EBULL
    return bit.bxor(z, bit.rshift(z, 31))
  end
  local order = {}
  for i = 1, n do order[i] = i - 1 end
  for i = n, 2, -1 do
    local j = tonumber(next_u64() % i) + 1
    order[i], order[j] = order[j], order[i]
  end
  return order
end

-- ---- DistributedSampler ----

local DistributedSampler = {}
DistributedSampler.__index = DistributedSampler
DistributedSampler.__name = "DistributedSampler"

local sampler_options = {num_replicas = true, rank = true, shuffle = true, seed = true, drop_last = true}

-- DistributedSampler(n | dataset, {num_replicas, rank, shuffle = true, seed = 0, drop_last = false})
-- num_replicas and rank default to the process group's world size and rank (1 and 0 outside one).
function M.DistributedSampler(dataset, opts)
  local what = "DistributedSampler"
  opts = check_options(what, opts, sampler_options)
  local n = type(dataset) == "number" and dataset or dataset_length(dataset, what)
  check_count(what, "the dataset size", n, 0)
  local initialized = dist().is_initialized()
  local replicas = opts.num_replicas or (initialized and dist().get_world_size() or 1)
  local rank = opts.rank or (initialized and dist().get_rank() or 0)
  check_count(what, "num_replicas", replicas, 1)
  if type(rank) ~= "number" or rank % 1 ~= 0 or rank < 0 or rank >= replicas then
    fail(what, "rank must be an integer in [0, %d) (num_replicas = %d), got %s", replicas, replicas, tostring(rank))
  end
  local seed = opts.seed or 0
  check_count(what, "seed", seed, 0)
  local shuffle = opts.shuffle ~= false
  local drop_last = opts.drop_last == true
  return setmetatable({n = n, num_replicas = replicas, rank = rank, shuffle = shuffle, seed = seed,
                       drop_last = drop_last, epoch = 0, consumed = 0}, DistributedSampler)
end

-- Samples this rank draws in a whole epoch (PyTorch's len(sampler)).
function DistributedSampler:len()
  local n, r = self.n, self.num_replicas
  if self.drop_last then return math.floor(n / r) end
  return math.ceil(n / r)
end

-- Sets the epoch (the shuffle's seed is seed + epoch); a new epoch starts at its beginning.
function DistributedSampler:set_epoch(epoch)
  check_count("DistributedSampler.set_epoch", "epoch", epoch, 0)
  if epoch ~= self.epoch then self.consumed = 0 end
  self.epoch = epoch
end

-- The epoch's order over the whole dataset (0-based indices).
function DistributedSampler:order()
  if self.shuffle then return permutation(self.n, self.seed + self.epoch) end
  local order = {}
  for i = 1, self.n do order[i] = i - 1 end
  return order
end

-- This rank's indices for the rest of the epoch. The epoch's order minus the `consumed`
-- positions already handed out (by all ranks together), padded by repeating the order from
-- its start (or cut, with drop_last) to a multiple of num_replicas, taken every
-- num_replicas-th from rank: PyTorch's split when nothing was consumed yet.
function DistributedSampler:indices()
  local order, r = self:order(), self.num_replicas
  local first = math.min(self.consumed, self.n)
  local remaining = self.n - first
  local per_rank = self.drop_last and math.floor(remaining / r) or math.ceil(remaining / r)
  local list = {}
  for i = first + 1, math.min(self.n, first + per_rank * r) do list[#list + 1] = order[i] end
  local k = 0
  while #list < per_rank * r do
    list[#list + 1] = order[k % self.n + 1]
    k = k + 1
  end
  local mine = {}
  for i = self.rank + 1, #list, r do mine[#mine + 1] = list[i] end
  return mine
end

-- The epoch is over: the next iteration starts an epoch from its beginning (the next epoch
-- when the sampler is a shuffling DataLoader's own, which moves on by itself as PyTorch's
-- RandomSampler draws a new order each time).
function DistributedSampler:finish_epoch()
  self.consumed = 0
  if self.advance_epoch then self.epoch = self.epoch + 1 end
end

-- An iterator over this rank's indices for the rest of the epoch; each index handed out
-- counts num_replicas positions consumed. When it is exhausted the epoch is over
-- (finish_epoch), unless the caller ends it itself (keep_position: a DataLoader ends it when
-- its last batch has been taken, not when it reads past the end to fill that batch).
function DistributedSampler:iter(keep_position)
  local mine = self:indices()
  local start, i, ended = self.consumed, 0, false
  return function()
    if ended then return nil end
    i = i + 1
    if i > #mine then
      ended = true
      if not keep_position then self:finish_epoch() end
      return nil
    end
    self.consumed = start + i * self.num_replicas
    return mine[i]
  end
end

-- {epoch =, consumed =, seed =, n =}: the same on every rank (consumed counts positions of
-- the epoch's order handed out to all ranks together), so it loads on any world size.
function DistributedSampler:state_dict()
  return {epoch = self.epoch, consumed = self.consumed, seed = self.seed, n = self.n}
end

function DistributedSampler:load_state_dict(sd)
  local what = "DistributedSampler.load_state_dict"
  if type(sd) ~= "table" then fail(what, "expected a state dict table, got %s", type(sd)) end
  for _, key in ipairs({"epoch", "consumed", "seed", "n"}) do
    check_count(what, key, sd[key], 0)
  end
  if sd.n ~= self.n then
    fail(what, "the state dict is for a dataset of %d samples, this sampler has %d", sd.n, self.n)
  end
  self.epoch, self.consumed, self.seed = sd.epoch, sd.consumed, sd.seed
end

function DistributedSampler:__tostring()
  return string.format("DistributedSampler(n=%d, num_replicas=%d, rank=%d, epoch=%d, consumed=%d)",
                       self.n, self.num_replicas, self.rank, self.epoch, self.consumed)
end

-- ---- collate ----

local function all_integers(items)
  for _, v in ipairs(items) do if v % 1 ~= 0 then return false end end
  return true
end

-- Tensors stack along a new dim 0, numbers become an i64 tensor (all integers) or an f64
-- one, tables collate key by key, anything else is returned as an array.
function M.default_collate(items)
  local first = items[1]
  if Tensor.is_tensor(first) then return shape_ops.stack(items, 0) end
  if type(first) == "number" then
    return Tensor.from_table(items, {dtype = all_integers(items) and "i64" or "f64"})
  end
  if type(first) == "table" and getmetatable(first) == nil then
    local out = {}
    for key in pairs(first) do
      local column = {}
      for i, item in ipairs(items) do
        if type(item) ~= "table" or item[key] == nil then
          fail("default_collate", "item %d has no '%s' (items of a batch must have the same keys)", i - 1, tostring(key))
        end
        column[i] = item[key]
      end
      out[key] = M.default_collate(column)
    end
    return out
  end
  return items
end

-- ---- DataLoader ----

local DataLoader = {}
DataLoader.__index = DataLoader
DataLoader.__name = "DataLoader"

local loader_options = {batch_size = true, sampler = true, collate_fn = true, drop_last = true, shuffle = true,
                        seed = true}

-- DataLoader(dataset, {batch_size = 1, sampler, collate_fn = default_collate, drop_last = false,
--                      shuffle = false, seed = 0}); without a sampler it reads the whole dataset
-- (shuffled with shuffle = true) through a one-replica DistributedSampler.
function M.DataLoader(dataset, opts)
  local what = "DataLoader"
  opts = check_options(what, opts, loader_options)
  local n = dataset_length(dataset, what)
  local batch_size = opts.batch_size or 1
  check_count(what, "batch_size", batch_size, 1)
  local sampler = opts.sampler
  if sampler == nil then
    local seed = opts.seed
    if seed == nil and opts.shuffle then -- from the process's generator, so ms.manual_seed decides it
      local stream, offset = random.take(4)
      seed = (stream * 1000003 + offset) % 2147483647
    end
    sampler = M.DistributedSampler(n, {num_replicas = 1, rank = 0, shuffle = opts.shuffle == true, seed = seed})
    sampler.advance_epoch = opts.shuffle == true
  elseif type(sampler) ~= "table" or type(sampler.iter) ~= "function" then
    fail(what, "sampler must be an object with iter() (such as a DistributedSampler), got %s", type(sampler))
  elseif opts.shuffle then
    fail(what, "shuffle and sampler are exclusive (the sampler decides the order)")
  end
  local collate = opts.collate_fn or M.default_collate
  if not C.is_callable(collate) then fail(what, "collate_fn must be callable, got %s", type(collate)) end
  return setmetatable({dataset = dataset, batch_size = batch_size, sampler = sampler, collate_fn = collate,
                       drop_last = opts.drop_last == true}, DataLoader)
end

-- Batches in a whole epoch (PyTorch's len(loader)).
function DataLoader:len()
  local samples = self.sampler:len()
  if self.drop_last then return math.floor(samples / self.batch_size) end
  return math.ceil(samples / self.batch_size)
end

-- for batch in loader:iter() do ... end: the batches of the rest of the epoch. The epoch
-- ends (state_dict then points at the next one) when the loop has taken the last batch.
function DataLoader:iter()
  local sampler, n = self.sampler, dataset_length(self.dataset, "DataLoader")
  local next_index = sampler:iter(true)
  local done, ended = false, false
  local function finish()
    if not ended then
      ended = true
      if type(sampler.finish_epoch) == "function" then sampler:finish_epoch() end
    end
    return nil
  end
  return function()
    if done then return finish() end
    local items = {}
    while #items < self.batch_size do
      local i = next_index()
      if i == nil then
        done = true
        break
      end
      if type(i) ~= "number" or i % 1 ~= 0 or i < 0 or i >= n then
        fail("DataLoader", "the sampler gave index %s, outside the dataset of %d items", tostring(i), n)
      end
      local item = dataset_item(self.dataset, i)
      if item == nil then fail("DataLoader", "dataset item %d is nil", i) end
      items[#items + 1] = item
    end
    if #items == 0 or (done and self.drop_last and #items < self.batch_size) then return finish() end
    return self.collate_fn(items)
  end
end

-- The loader's position is its sampler's: saved and restored through it.
function DataLoader:state_dict()
  if type(self.sampler.state_dict) ~= "function" then
    fail("DataLoader.state_dict", "the sampler has no state_dict()")
  end
  return self.sampler:state_dict()
end

function DataLoader:load_state_dict(sd)
  if type(self.sampler.load_state_dict) ~= "function" then
    fail("DataLoader.load_state_dict", "the sampler has no load_state_dict()")
  end
  self.sampler:load_state_dict(sd)
end

return M
