-- A distributed checkpoint of a model with tied weights (GPT-2's output projection sharing
-- the embedding) stores both names and loads back into one storage, sharded or not.
local ms = require "moonshard"
local parity = require "specs.support.parity"
local store_dirs = require "specs.support.store_dirs"
local nn, dist, fsdp, dcp = ms.nn, ms.dist, ms.fsdp, ms.dcp

local Tied = nn.Module:extend("TiedModel")
function Tied:__init()
  self.embed = nn.Embedding(parity.VOCAB, parity.DIM)
  self.blocks = nn.ModuleList({parity.Block(parity.DIM, parity.HIDDEN)})
  self.head = nn.Linear(parity.DIM, parity.VOCAB, {bias = false})
  self.head.weight = self.embed.weight
end

describe("tied weights through a distributed checkpoint", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  it("keep one storage for both names when loaded into a sharded model", function()
    local results = dist.spawn(2, function()
      ms.manual_seed(0)
      local model = fsdp.FSDP(Tied(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
      local saved = model.embed.weight:full_tensor()
      dcp.save(model:state_dict(), dir, {step = 1})
      ms.manual_seed(99)
      local fresh = fsdp.FSDP(Tied(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
      local sd = fresh:state_dict()
      dcp.load(sd, dir)
      fresh:load_state_dict(sd)
      local head, embed = fresh.head.weight, fresh.embed.weight
      return {tied = head == embed, same_storage = head:to_local():data_ptr() == embed:to_local():data_ptr(),
              equal = ms.equal(embed:full_tensor(), saved)}
    end)
    for _, r in ipairs(results) do
      assert.is_true(r.tied)
      assert.is_true(r.same_storage)
      assert.is_true(r.equal)
    end
    local store = dcp.open(dir)
    local names = {}
    for _, entry in ipairs(store:entries(1)) do names[entry.fqn] = true end
    store:close()
    assert.is_true(names["head.weight"] and names["embed.weight"])
  end)

  it("keep one storage when an unsharded model loads the sharded checkpoint", function()
    dist.spawn(2, function()
      ms.manual_seed(0)
      dcp.save(fsdp.FSDP(Tied()):state_dict(), dir, {step = 1})
    end)
    ms.manual_seed(0)
    local want = Tied().embed.weight
    ms.manual_seed(5)
    local model = Tied()
    local sd = model:state_dict()
    dcp.load(sd, dir)
    assert.are.equal(model.head.weight, model.embed.weight)
    assert.are.equal(sd["head.weight"]:data_ptr(), sd["embed.weight"]:data_ptr())
    assert.is_true(ms.equal(want, model.head.weight))
  end)
end)
