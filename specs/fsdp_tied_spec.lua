-- Tied weights (an output projection sharing the embedding, as GPT-2's): listed once by
-- named_parameters, under both names by state_dict, one shard and one summed gradient in
-- one FSDP unit (parity with the unsharded model over several steps), an error across
-- units (the DCP round trip is in dcp_tied_spec.lua).
local ms = require "moonshard"
local parity = require "specs.support.parity"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local STEPS, TOLERANCE = 4, 1e-9

local Tied = nn.Module:extend("TiedModel")
function Tied:__init()
  self.embed = nn.Embedding(parity.VOCAB, parity.DIM)
  self.blocks = nn.ModuleList({parity.Block(parity.DIM, parity.HIDDEN), parity.Block(parity.DIM, parity.HIDDEN)})
  self.head = nn.Linear(parity.DIM, parity.VOCAB, {bias = false})
  self.head.weight = self.embed.weight
end
function Tied:forward(tokens)
  local x = self.embed(tokens)
  for _, block in self.blocks:ipairs() do x = block(x) end
  return self.head(x)
end

local function loss_of(model, tokens, targets)
  return nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
end

local function flat(t) return t:reshape(-1):table() end

-- Train STEPS steps of Adam on the global batch (sharded: each rank its slice).
local function train(model, rank, size)
  local opt = optim.Adam(model:parameters(), {lr = 0.01})
  local per_rank = parity.GLOBAL_BATCH / size
  local losses = {}
  for step = 1, STEPS do
    local tokens, targets = parity.batch(step)
    opt:zero_grad()
    local loss = loss_of(model, tokens:narrow(0, rank * per_rank, per_rank), targets:narrow(0, rank * per_rank, per_rank))
    loss:backward()
    local global = loss:detach():clone()
    if size > 1 then dist.all_reduce(global, "avg") end
    losses[step] = global:item()
    opt:step()
  end
  return losses
end


-- Under mpirun the ranks are this process: collect what the tests left, so later spec
-- files measure memory from a clean pool.
after_each(function() collectgarbage(); collectgarbage() end)
describe("tied weights without FSDP", function()
  it("are one parameter: listed once, under both names in the state dict", function()
    local model = Tied()
    local names = {}
    for name in model:named_parameters() do names[#names + 1] = name end
    assert.are.equal(13, #names) -- 14 names, one of them a second name of embed.weight
    assert.are.equal("embed.weight", names[1])
    assert.is_nil(table.concat(names, ","):find("head.weight", 1, true))
    assert.are.equal(model.embed.weight, model.head.weight)
    local sd = model:state_dict()
    assert.is_not_nil(sd["embed.weight"])
    assert.is_not_nil(sd["head.weight"])
    assert.are.equal(sd["embed.weight"]:data_ptr(), sd["head.weight"]:data_ptr())
  end)
end)

describe("tied weights under FSDP", function()
  local reference
  setup(function()
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    local model = Tied()
    local losses = train(model, 0, 1)
    local params = {}
    for name, p in model:named_parameters() do params[name] = flat(p) end
    reference = {losses = losses, params = params}
    ms.set_default_dtype("f32")
  end)

  for _, world in ipairs({1, 2, 4}) do
    it(("keep one shard with the summed gradient of both uses, matching unsharded training on %d rank(s)"):format(world),
       function()
      local runs = dist.spawn(world, function(rank, size)
        ms.set_default_dtype("f64")
        ms.manual_seed(0)
        local model = fsdp.FSDP(Tied(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
        local count = #model:parameters()
        local same = model.head.weight == model.embed.weight
        local losses = train(model, rank, size)
        local params, names = {}, {}
        for name, p in model:named_parameters() do
          params[name] = flat(p:full_tensor())
          names[#names + 1] = name
        end
        local sd = model:state_dict()
        return {losses = losses, params = params, count = count, same = same, names = names,
                both = sd["head.weight"] ~= nil and sd["embed.weight"] ~= nil}
      end)
      for rank, run in ipairs(runs) do
        assert.is_true(run.same, "rank " .. (rank - 1))
        assert.are.equal(13, run.count)
        assert.is_true(run.both)
        for step = 1, STEPS do
          assert.is_true(parity.max_relative_error({run.losses[step]}, {reference.losses[step]}) < TOLERANCE,
                         ("rank %d step %d: %.12g vs %.12g"):format(rank - 1, step, run.losses[step], reference.losses[step]))
        end
        for name, values in pairs(reference.params) do
          local err = parity.max_relative_error(run.params[name], values)
          assert.is_true(err < TOLERANCE, ("rank %d %s differs by %.3g"):format(rank - 1, name, err))
        end
      end
    end)
  end

  it("raises naming both names when the tie crosses two units, leaving the model unwrapped", function()
    local r = dist.spawn(2, function()
      local model = Tied()
      collectgarbage(); collectgarbage()
      local before = ms.memory_stats("cpu").allocated
      local ok, err = pcall(fsdp.FSDP, model, {auto_wrap_policy = fsdp.wrap_policy({nn.Embedding})})
      return {ok = ok, err = err, unit = rawget(model.embed, "_fsdp_unit") ~= nil,
              leaked = ms.memory_stats("cpu").allocated - before, plain = ms.is_tensor(model.head.weight)}
    end)[1]
    assert.is_false(r.ok)
    assert.are.equal("moonshard: FSDP: 'embed.weight' and 'head.weight' are one tied parameter in two FSDP " ..
                     "units ('embed' and the root); wrap the modules that share it in one unit", r.err)
    assert.is_false(r.unit)
    assert.are.equal(0, r.leaked)
    assert.is_true(r.plain)
  end)
end)
