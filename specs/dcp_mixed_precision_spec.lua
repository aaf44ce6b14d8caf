-- A DCP checkpoint of an FSDP model trained with mixed precision holds the f32 masters
-- (parameters and optimizer state) and loads into an unwrapped f32 model.
local ms = require "moonshard"
local parity = require "support.parity"
local stores = require "support.store_dirs"
local nn, optim, dist, fsdp, dcp = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.dcp

local function flat(t) return t:reshape(-1):table() end

local function loss_of(model, tokens, targets)
  return nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
end

describe("DCP with FSDP mixed precision", function()
  local dir
  before_each(stores.before(function(path) dir = path end))
  after_each(stores.after)

  it("a DCP checkpoint holds the f32 masters and loads into an unwrapped f32 model", function()
    local results = dist.spawn(2, function(rank, size)
      ms.manual_seed(0)
      local model = fsdp.FSDP(parity.Model(), {mixed_precision = {param_dtype = "f64"},
                                               auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
      local opt = optim.Adam(model:parameters(), {lr = 0.01})
      local tokens, targets = parity.batch(1)
      local per_rank = parity.GLOBAL_BATCH / size
      loss_of(model, tokens:narrow(0, rank * per_rank, per_rank), targets:narrow(0, rank * per_rank, per_rank)):backward()
      opt:step()
      dcp.save({model = model:state_dict(), optim = fsdp.optim_state_dict(model, opt)}, dir, {step = 1})
      local values = {}
      for name, p in model:named_parameters() do values[name] = flat(p:full_tensor()) end
      return values
    end)
    local store = dcp.open(dir)
    for _, e in ipairs(store:entries(1)) do
      if e.kind == "tensor" and not e.fqn:match("step$") then assert.equal("f32", e.dtype, e.fqn) end
    end
    store:close()
    ms.manual_seed(1)
    local plain = parity.Model()
    local sd = plain:state_dict()
    dcp.load({model = sd}, dir, {strict = false})
    for name, p in plain:named_parameters() do assert.same(results[1][name], flat(p), name) end
  end)
end)
