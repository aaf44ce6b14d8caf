-- Activation checkpointing composed with FSDP on 2 ranks: checkpointed blocks inside FSDP
-- units (wrapped before or after FSDP), a checkpoint around the whole FSDP model, and
-- activation offload, each training bitwise like the same FSDP model without checkpointing.
local ms = require "moonshard"
local ac, dist, fsdp, optim = ms.ac, ms.dist, ms.fsdp, ms.optim

local models = require "support.ac_models"
local global_state = require "support.global_state"

local DIM, BATCH, STEPS = models.DIM, 8, 2
local Block, Model, each_block = models.Block, models.Model, models.each_block

local function reentrant(m) return ac.checkpoint_wrapper(m, {checkpoint_impl = "reentrant"}) end
local function selective(m) return ac.checkpoint_wrapper(m, {policy = ac.default_policy}) end

-- {name, wrap before FSDP, wrap after FSDP, call}
local variants = {
  {"FSDP of checkpointed blocks (no_reentrant)", each_block(ac.checkpoint_wrapper)},
  {"FSDP of checkpointed blocks (reentrant)", each_block(reentrant)},
  {"FSDP of selectively checkpointed blocks", each_block(selective)},
  {"FSDP of offloaded blocks", each_block(ac.offload_wrapper)},
  {"checkpoint wrappers applied to FSDP blocks", nil, each_block(ac.checkpoint_wrapper)},
  {"reentrant wrappers applied to FSDP blocks", nil, each_block(reentrant)},
  {"checkpoint around the FSDP model", nil, nil, function(model, x) return ac.checkpoint(model, x) end},
  {"reentrant checkpoint around the FSDP model", nil, nil, function(model, x)
    return ac.checkpoint(model, x, {use_reentrant = true})
  end},
  {"reentrant checkpoint around an FSDP model of checkpointed blocks", each_block(ac.checkpoint_wrapper), nil,
   function(model, x) return ac.checkpoint(model, x, {use_reentrant = true}) end},
  {"save_on_cpu around the FSDP model", nil, nil, function(model, x)
    return ac.save_on_cpu(function() return model(x) end)
  end},
}

local function local_of(t) return ms.is_tensor(t) and t or t:to_local() end

-- Train STEPS steps on this rank's part of the batch; returns every loss, output, local
-- gradient and local parameter shard, and the sorted parameter and state-dict names.
local function train(rank, strategy, variant)
  ms.manual_seed(0)
  local model = Model()
  if variant and variant[2] then variant[2](model) end
  fsdp.FSDP(model, {sharding_strategy = strategy, auto_wrap_policy = fsdp.wrap_policy({Block})})
  if variant and variant[3] then variant[3](model) end
  local opt = optim.SGD(model:parameters(), {lr = 0.1, momentum = 0.9})
  local record = {}
  for step = 1, STEPS do
    ms.manual_seed(10 * step + rank)
    local x = ms.randn(BATCH, DIM, {requires_grad = true})
    opt:zero_grad()
    local call = variant and variant[4]
    local out = call and call(model, x) or model(x)
    local loss = (out * out):mean()
    loss:backward()
    for _, t in ipairs({loss:detach(), out:detach(), x.grad}) do record[#record + 1] = ms.keep(t) end
    for _, p in ipairs(model:parameters()) do record[#record + 1] = ms.keep(local_of(p.grad):clone()) end
    opt:step()
  end
  for _, p in ipairs(model:parameters()) do record[#record + 1] = ms.keep(local_of(p):clone()) end
  local names = {}
  for name in model:named_parameters() do names[#names + 1] = name end
  for key in pairs(model:state_dict()) do names[#names + 1] = "state_dict:" .. key end
  table.sort(names)
  return record, names
end

before_each(global_state.save)
after_each(global_state.restore)

describe("activation checkpointing with FSDP on 2 ranks", function()
  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
    for _, variant in ipairs(variants) do
      -- FULL_SHARD exercises every gather and reshard path; the other strategies are slow-tagged
      local tag = strategy == "FULL_SHARD" and "" or " #slow"
      it(strategy .. ": " .. variant[1] .. tag, function()
        local results = dist.spawn(2, function(rank)
          local expected, expected_names = train(rank, strategy, nil)
          ac.reset_stats()
          local got, names = train(rank, strategy, variant)
          assert.same(expected_names, names)
          assert.equal(#expected, #got)
          for i = 1, #expected do
            assert.is_true(ms.equal(expected[i], got[i]), ("rank %d: tensor %d differs"):format(rank, i))
          end
          return ac.stats()
        end)
        for _, counted in ipairs(results) do
          assert.is_true(counted.recomputed + counted.offload_regions > 0)
        end
      end)
    end
  end
end)
