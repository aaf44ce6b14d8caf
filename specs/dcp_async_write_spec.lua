-- Training goes on right after dcp.async_save: every saved tensor (contiguous shards of
-- several sizes, a view that starts and ends inside pages, a replicated tensor, small ones)
-- is overwritten by ms ops and by a collective at once, round after round, and each
-- committed step holds the values of its call. At 1 GiB on 2 and 4 ranks (#slow), and
-- small enough for every run (also under ASan).
local ms = require "moonshard"
local dist, dcp = ms.dist, ms.dcp
local store_dirs = require "support.store_dirs"

local COLS = 1024 -- f32 rows of 4 KiB

-- This rank's state: sharded tensors totalling about mib MiB over the world, a replicated
-- tensor that is a view inside a larger buffer, and small tensors. Returns the state dict
-- and the list of this rank's tensors to write (with the buffer the view lives in).
local function state(mib, rank, world)
  local mesh = dist.init_device_mesh({world})
  local sd, tensors = {model = {}}, {}
  local rows_total = mib * 2 ^ 20 / (COLS * 4)
  local shares = {0.4, 0.25, 0.2, 0.1, 0.05} -- large, medium and small shards
  for i, share in ipairs(shares) do
    local rows = world * math.max(1, math.floor(rows_total * share / world))
    local full = ms.empty(rows, COLS)
    local d = ms.distribute_tensor(full, mesh, {ms.Shard(0)})
    full:free()
    sd.model[("layer%d.weight"):format(i)] = d
    tensors[#tensors + 1] = d:to_local()
  end
  local buffer = ms.empty(3 * 2 ^ 20 / 4 + 1000)
  sd.model.view = buffer:narrow(0, 333, 3 * 2 ^ 20 / 4 + 17 - 333) -- starts and ends inside pages
  tensors[#tensors + 1] = sd.model.view
  for i = 1, 8 do
    sd.model[("bias%d"):format(i)] = ms.empty(97 * i)
    tensors[#tensors + 1] = sd.model[("bias%d"):format(i)]
  end
  return sd, tensors, buffer
end

local function value(round, i) return round * 100 + i end

-- rounds of: fill, async_save, overwrite everything at once (ops and an all_reduce), wait,
-- load the step back and compare. Returns the number of tensors checked.
local function run(mib, world, rounds, dir)
  return dist.spawn(world, function(rank)
    local sd, tensors, buffer = state(mib, rank, world)
    local checked = 0
    for round = 1, rounds do
      for i, t in ipairs(tensors) do t:fill_(value(round, i)) end
      local h = dcp.async_save(sd, dir, {step = round, keep_last = 2})
      buffer:fill_(-7)
      for _, t in ipairs(tensors) do t:mul_(3) end
      dist.all_reduce(tensors[1])
      dist.all_reduce(tensors[#tensors])
      h:wait()
      for _, t in ipairs(tensors) do t:fill_(0) end
      dcp.load(sd, dir, {step = round})
      for i, t in ipairs(tensors) do
        local want = value(round, i)
        local low, high = t:min():item(), t:max():item()
        assert(low == want and high == want,
               ("rank %d round %d tensor %d: stored [%g, %g], saved %g"):format(rank, round, i, low, high, want))
        checked = checked + 1
      end
    end
    return checked
  end)
end

describe("writes right after dcp.async_save", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("leave every step with the values of its call (64 MiB, 2 ranks)", function()
    local checked = run(64, 2, 3, dir)
    assert.same({3 * 14, 3 * 14}, checked)
  end)

  for _, world in ipairs({2, 4}) do
    it(("leave every step with the values of its call (1 GiB, %d ranks) #slow"):format(world), function()
      local checked = run(1024, world, 4, dir)
      for r = 1, world do assert.equal(4 * 14, checked[r]) end
    end)
  end
end)
