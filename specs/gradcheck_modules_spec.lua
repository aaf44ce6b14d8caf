-- Gradient checks in f64 for the nn modules: the gradients of a module's output with respect
-- to its inputs and to every one of its parameters agree with central finite differences.
local ms = require "moonshard"
local nn = ms.nn
local gradcheck = require "support.gradcheck"
local global_state = require "support.global_state"

-- The module and attribute that hold the parameter called name ("ffn.0.weight").
local function owner_of(module, name)
  local owner = module
  for part in name:gmatch("([^.]+)%.") do owner = owner._modules[part] end
  return owner, name:match("([^.]+)$")
end

-- Check module(inputs...) against finite differences in its inputs and in each parameter.
-- The parameters are swapped for f64 leaves the checker perturbs, so the module's own
-- forward runs on every evaluation; they are put back afterwards.
-- opts.before runs before every forward (reseeding dropout); opts.reduce maps the output.
local function passes(module, inputs, opts)
  opts = opts or {}
  local names, originals = {}, {}
  for name, p in module:named_parameters() do
    names[#names + 1] = name
    originals[#originals + 1] = p
  end
  assert.is_true(#names > 0 or #inputs > 0)
  local ninputs = #inputs
  local args = {}
  for i = 1, ninputs do args[i] = inputs[i] end
  for i, p in ipairs(originals) do
    assert.are.equal("f64", p:dtype(), names[i])
    args[ninputs + i] = gradcheck.tensor(p:shape(), gradcheck.flat(p), {requires_grad = true})
  end
  local function install(values)
    for i, name in ipairs(names) do
      local owner, attr = owner_of(module, name)
      owner._parameters[attr] = values[i]
    end
  end
  local function forward(...)
    local all = {...}
    local params = {}
    for i = 1, #names do params[i] = all[ninputs + i] end
    install(params)
    if opts.before then opts.before() end
    local out = module(unpack(all, 1, ninputs))
    return opts.reduce and opts.reduce(out) or out
  end
  local ok, message = gradcheck.check(forward, args, opts)
  install(originals)
  assert.is_true(ok, message)
  for i, name in ipairs(names) do
    assert.is_not_nil(args[ninputs + i].grad, name .. " got no gradient")
  end
end

local function leaf(shape, seed, opts)
  opts = opts or {}
  return gradcheck.input(shape, {seed = seed, low = opts.low, high = opts.high, margin = opts.margin})
end

local function f64(options)
  options = options or {}
  options.dtype = "f64"
  return options
end

local function reseeded(seed) return function() ms.manual_seed(seed) end end

before_each(global_state.save)
after_each(global_state.restore)

describe("gradcheck of modules", function()
  describe("Linear", function()
    it("matches finite differences in the input, the weight and the bias", function()
      ms.manual_seed(1)
      passes(nn.Linear(3, 4, f64()), {leaf({2, 3}, 1)})
    end)
    it("matches finite differences without a bias, for a 3-D input", function()
      ms.manual_seed(2)
      passes(nn.Linear(3, 2, f64({bias = false})), {leaf({2, 2, 3}, 2)})
    end)
    it("matches finite differences after :double() of an f32 layer", function()
      ms.manual_seed(3)
      passes(nn.Linear(2, 3):double(), {leaf({4, 2}, 3)})
    end)
  end)

  describe("LayerNorm", function()
    it("matches finite differences in the input, the weight and the bias", function()
      local m = nn.LayerNorm(4, f64())
      ms.no_grad(function()
        m.weight:copy_(gradcheck.tensor({4}, {0.5, 1.5, -0.7, 1.1}))
        m.bias:copy_(gradcheck.tensor({4}, {0.1, -0.2, 0.3, 0}))
      end)
      passes(m, {leaf({3, 4}, 4)})
    end)
    it("matches finite differences over two normalized dims", function()
      passes(nn.LayerNorm({2, 3}, f64()), {leaf({2, 2, 3}, 5)})
    end)
    it("matches finite differences without affine parameters", function()
      passes(nn.LayerNorm(5, f64({elementwise_affine = false})), {leaf({2, 5}, 6)})
    end)
  end)

  describe("Embedding", function()
    it("matches finite differences in the weight, with repeated indices", function()
      ms.manual_seed(4)
      passes(nn.Embedding(5, 3, f64()), {ms.tensor({{1, 4, 1}, {0, 1, 3}}, {dtype = "i64"})})
    end)
  end)

  describe("activations", function()
    it("ReLU matches finite differences away from zero", function()
      passes(nn.ReLU(), {leaf({3, 4}, 7, {margin = 0.1})})
    end)
    it("GELU matches finite differences", function()
      passes(nn.GELU(), {leaf({3, 4}, 8, {low = -3, high = 3})})
    end)
    it("GELU with the tanh approximation matches finite differences", function()
      passes(nn.GELU({approximate = "tanh"}), {leaf({3, 4}, 9, {low = -3, high = 3})})
    end)
    it("Tanh matches finite differences", function()
      passes(nn.Tanh(), {leaf({3, 4}, 19, {low = -2, high = 2})})
    end)
  end)

  describe("Dropout", function()
    it("matches finite differences in training when every evaluation replays the seed", function()
      passes(nn.Dropout(0.3), {leaf({4, 5}, 10)}, {before = reseeded(77)})
    end)
    it("is the identity in eval", function()
      passes(nn.Dropout(0.3):eval(), {leaf({4, 5}, 11)})
    end)
  end)

  describe("Sequential", function()
    it("matches finite differences through Linear, GELU, Dropout, Linear and LayerNorm", function()
      ms.manual_seed(5)
      local seq = nn.Sequential(nn.Linear(3, 5, f64()), nn.GELU(), nn.Dropout(0.2), nn.Linear(5, 4, f64()),
                                nn.LayerNorm(4, f64()))
      passes(seq, {leaf({2, 3}, 12)}, {before = reseeded(78)})
    end)
  end)

  describe("CausalSelfAttention", function()
    it("matches finite differences in the input and every projection", function()
      ms.manual_seed(6)
      passes(nn.CausalSelfAttention(4, 2, f64()), {leaf({2, 3, 4}, 13)})
    end)
    it("matches finite differences with attention and residual dropout replayed", function()
      ms.manual_seed(7)
      passes(nn.CausalSelfAttention(4, 2, f64({dropout = 0.25})), {leaf({1, 3, 4}, 14)},
             {before = reseeded(79)})
    end)
  end)

  describe("losses", function()
    for _, reduction in ipairs({"mean", "sum", "none"}) do
      it("MSELoss with reduction " .. reduction .. " matches finite differences in input and target", function()
        passes(nn.MSELoss({reduction = reduction}), {leaf({2, 3}, 15), leaf({2, 3}, 16)})
      end)
      it("CrossEntropyLoss with reduction " .. reduction .. " matches finite differences", function()
        local target = ms.tensor({2, 0, 1}, {dtype = "i64"})
        passes(nn.CrossEntropyLoss({reduction = reduction}), {leaf({3, 4}, 17, {low = -2, high = 2}), target})
      end)
    end
    it("CrossEntropyLoss with ignore_index matches finite differences", function()
      local target = ms.tensor({2, 1, 1, 0}, {dtype = "i64"})
      passes(nn.CrossEntropyLoss({ignore_index = 1}), {leaf({4, 3}, 18), target})
    end)
  end)

  describe("a small language model", function()
    -- Embedding, attention, a residual MLP block and a loss, as examples/gpt.lua stacks them.
    local Tiny = nn.Module:extend("Tiny")
    function Tiny:__init()
      self.wte = nn.Embedding(6, 4, f64())
      self.ln = nn.LayerNorm(4, f64())
      self.attn = nn.CausalSelfAttention(4, 2, f64())
      self.mlp = nn.Sequential(nn.Linear(4, 8, f64()), nn.GELU({approximate = "tanh"}), nn.Linear(8, 4, f64()))
      self.head = nn.Linear(4, 6, f64({bias = false}))
      self.loss = nn.CrossEntropyLoss()
    end
    function Tiny:forward(tokens, targets)
      local x = self.wte(tokens)
      x = x + self.attn(self.ln(x))
      x = x + self.mlp(x)
      return self.loss(self.head(x):view(-1, 6), targets:view(-1))
    end

    it("matches finite differences in every parameter", function()
      ms.manual_seed(8)
      local tokens = ms.tensor({{1, 5, 2}}, {dtype = "i64"})
      local targets = ms.tensor({{5, 2, 0}}, {dtype = "i64"})
      passes(Tiny(), {tokens, targets})
    end)
  end)
end)
