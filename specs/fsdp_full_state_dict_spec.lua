-- FULL_STATE_DICT with rank0_only and offload_to_cpu gathers one parameter at a time:
-- the compute pool never holds more than one unit at full size on any rank, rank 0 keeps
-- the whole model in the host pool and the other ranks keep nothing (exact statistics).
local ms = require "moonshard"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local WORLD, LAYERS, DIM, F32 = 4, 6, 256, 4
local UNIT_BYTES = DIM * (DIM + 1) * F32            -- one Linear(DIM, DIM) at full size
local SHARD_BYTES = DIM / WORLD * (DIM + 1) * F32   -- its shard (the all-gather's send buffer)
local MODEL_BYTES = LAYERS * UNIT_BYTES

local function build()
  local layers = {}
  for i = 1, LAYERS do layers[i] = nn.Linear(DIM, DIM) end
  return nn.Sequential(layers)
end


-- Under mpirun the ranks are this process: collect what the tests left, so later spec
-- files measure memory from a clean pool.
after_each(function() collectgarbage(); collectgarbage() end)
describe("FULL_STATE_DICT with rank0_only and offload_to_cpu", function()
  it("stays within one unit of compute memory and puts the model in rank 0's host pool", function()
    local results = dist.spawn(WORLD, function(rank)
      ms.manual_seed(5)
      local reference = build() -- the same values, never sharded
      ms.manual_seed(5)
      local model = fsdp.FSDP(build(), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT", {rank0_only = true, offload_to_cpu = true})
      collectgarbage(); collectgarbage() -- under mpirun, what earlier spec files left in this process
      local cpu_base, host_base = ms.memory_stats("cpu").allocated, ms.memory_stats("host").allocated
      ms.reset_peak_memory_stats("cpu")
      local sd = model:state_dict()
      local out = {cpu_peak = ms.memory_stats("cpu").peak - cpu_base,
                   cpu_after = ms.memory_stats("cpu").allocated - cpu_base,
                   host = ms.memory_stats("host").allocated - host_base, keys = 0, equal = true, devices = {}}
      local expected = reference:state_dict()
      for name, value in pairs(sd) do
        out.keys = out.keys + 1
        out.devices[value:device()] = true
        out.equal = out.equal and ms.equal(value:to("cpu"), expected[name])
      end
      -- for contrast: a full state dict on every rank in the compute pool
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT")
      ms.reset_peak_memory_stats("cpu")
      local whole = model:state_dict()
      out.plain_peak = ms.memory_stats("cpu").peak - cpu_base
      whole = nil
      return out
    end)
    for rank, r in ipairs(results) do
      local label = "rank " .. (rank - 1)
      assert.is_true(r.cpu_peak <= UNIT_BYTES + SHARD_BYTES, label .. " compute peak " .. r.cpu_peak)
      assert.are.equal(0, r.cpu_after, label)
      assert.is_true(r.plain_peak >= MODEL_BYTES, label .. " plain full state dict peak " .. r.plain_peak)
      if rank == 1 then
        assert.are.equal(2 * LAYERS, r.keys)
        assert.are.equal(MODEL_BYTES, r.host)
        assert.are.same({host = true}, r.devices)
        assert.is_true(r.equal)
      else
        assert.are.equal(0, r.keys, label)
        assert.are.equal(0, r.host, label)
      end
    end
  end)

  it("also applies to the optimizer state dict through optim_state_dict_config", function()
    local results = dist.spawn(WORLD, function()
      ms.manual_seed(5)
      local model = fsdp.FSDP(build(), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
      local opt = optim.Adam(model:parameters(), {lr = 0.01})
      model(ms.randn(2, DIM)):sum():backward()
      opt:step()
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT", nil, {rank0_only = true, offload_to_cpu = true})
      local osd = fsdp.optim_state_dict(model, opt)
      local tensors, devices, shapes = 0, {}, {}
      for fqn, state in pairs(osd.state) do
        for key, value in pairs(state) do
          if ms.is_tensor(value) then
            tensors = tensors + 1
            devices[value:device()] = true
            shapes[fqn .. "." .. key] = tostring(value:shape())
          end
        end
      end
      return {tensors = tensors, devices = devices, shape = shapes["0.weight.exp_avg"]}
    end)
    assert.are.equal(2 * 2 * LAYERS, results[1].tensors) -- exp_avg and exp_avg_sq of each parameter
    assert.are.same({host = true}, results[1].devices)
    assert.are.equal(("[%d, %d]"):format(DIM, DIM), results[1].shape)
    for rank = 2, WORLD do assert.are.equal(0, results[rank].tensors, "rank " .. (rank - 1)) end
  end)
end)
