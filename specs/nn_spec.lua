-- nn from Lua: module registration and PyTorch names, traversal, state dicts, train/eval,
-- apply; default initialisations checked statistically; forwards of Linear, LayerNorm,
-- Embedding, CausalSelfAttention and the losses against computations written here in Lua.
local ms = require "moonshard"
local nn = ms.nn
local F = nn.F
local gradcheck = require "support.gradcheck"
local global_state = require "support.global_state"

local flat = gradcheck.flat

local function collect(iterator)
  local names, values = {}, {}
  for name, value in iterator do
    names[#names + 1] = name
    values[#values + 1] = value
  end
  return names, values
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function raises(name, needles, fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "nothing was raised")
  err = tostring(err)
  local prefix = "moonshard: " .. name .. ":"
  assert.are.equal(prefix, err:sub(1, #prefix), err)
  for _, needle in ipairs(needles or {}) do assert.is_truthy(err:find(needle, 1, true), err) end
end

local function assert_close(expected, actual, tol, what)
  assert.are.equal(#expected, #actual, "element count")
  for i = 1, #expected do
    assert.is_true(math.abs(expected[i] - actual[i]) <= tol * (1 + math.abs(expected[i])),
                   string.format("%s element %d: %.12g, expected %.12g", what or "", i - 1, actual[i], expected[i]))
  end
end

-- Set a parameter to values from the spec's own stream (no moonshard RNG involved).
local function fill(p, low, high, seed)
  local values = gradcheck.values(p:numel(), low, high, seed)
  ms.no_grad(function() p:copy_(ms.tensor(values, {dtype = p:dtype()}):view(p:shape())) end)
  return values
end

local function moments(values)
  local sum, squares = 0, 0
  for _, v in ipairs(values) do sum, squares = sum + v, squares + v * v end
  local mean = sum / #values
  return mean, squares / #values - mean * mean
end

-- A model whose attributes are assigned out of alphabetical order.
local Block = nn.Module:extend("Block")
function Block:__init()
  self.proj = nn.Linear(4, 6)
  self.ffn = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
  self.norm = nn.LayerNorm(6)
end
function Block:forward(x) return self.norm(self.ffn(self.proj(x))) end

local block_parameters = {
  "proj.weight", "proj.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias",
  "norm.weight", "norm.bias",
}

before_each(global_state.save)
after_each(global_state.restore)

describe("nn", function()
  describe("Module registration and names", function()
    it("names parameters in registration order with PyTorch's dotted names", function()
      assert.are.same(block_parameters, (collect(Block():named_parameters())))
    end)

    it("names the children of a Sequential 0, 1, 2, ...", function()
      local seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
      assert.are.same({"0.weight", "0.bias", "2.weight", "2.bias"}, (collect(seq:named_parameters())))
      assert.are.same({"0", "1", "2"}, (collect(seq:named_children())))
    end)

    it("lists named_modules depth first from the root, which is named ''", function()
      local names, modules = collect(Block():named_modules())
      assert.are.same({"", "proj", "ffn", "ffn.0", "ffn.1", "ffn.2", "norm"}, names)
      assert.are.equal("Block", modules[1].__name)
      assert.are.equal("GELU", modules[5].__name)
    end)

    it("children gives the direct children in order", function()
      local m = Block()
      local children = {}
      for child in m:children() do children[#children + 1] = child end
      assert.are.same({m.proj, m.ffn, m.norm}, children)
    end)

    it("parameters() is the array of named_parameters' values", function()
      local m = Block()
      local _, values = collect(m:named_parameters())
      local params = m:parameters()
      assert.are.equal(#block_parameters, #params)
      for i = 1, #params do assert.are.equal(values[i], params[i]) end
      assert.is_true(params[1].requires_grad)
    end)

    it("lists a parameter shared by two modules once, under its first name", function()
      local a, b = nn.Linear(3, 3), nn.Linear(3, 3)
      b.weight = a.weight
      local seq = nn.Sequential(a, b)
      assert.are.same({"0.weight", "0.bias", "1.bias"}, (collect(seq:named_parameters())))
      assert.are.equal(3, #seq:parameters())
      assert.are.same({"0.bias", "0.weight", "1.bias", "1.weight"}, sorted_keys(seq:state_dict()))
    end)

    it("reassigning an attribute keeps its place in the order", function()
      local m = Block()
      m.proj = nn.Linear(4, 6, {bias = false})
      local names = collect(m:named_parameters())
      assert.are.same({"proj.weight", "ffn.0.weight"}, {names[1], names[2]})
    end)

    it("keeps buffers out of the parameters but in the state dict unless not persistent", function()
      local m = nn.Linear(2, 2)
      m:register_buffer("running", ms.zeros(2))
      m:register_buffer("scratch", ms.zeros(2), false)
      assert.are.same({"weight", "bias"}, (collect(m:named_parameters())))
      assert.are.same({"bias", "running", "weight"}, sorted_keys(m:state_dict()))
    end)
  end)

  describe("state dicts", function()
    it("state_dict is keyed by the parameter names and holds detached values", function()
      local m = Block()
      local sd = m:state_dict()
      local expected = {unpack(block_parameters)}
      table.sort(expected)
      assert.are.same(expected, sorted_keys(sd))
      assert.is_true(ms.equal(sd["ffn.2.weight"], m.ffn[3].weight))
      assert.is_falsy(sd["ffn.2.weight"].requires_grad)
    end)

    it("load_state_dict copies every value into the model", function()
      local source, target = Block(), Block()
      assert.is_false(ms.equal(source.proj.weight, target.proj.weight))
      local result = target:load_state_dict(source:state_dict())
      for name, p in target:named_parameters() do
        assert.is_true(ms.equal(source:state_dict()[name], p), name)
      end
      assert.are.same({}, result.missing_keys)
      assert.are.same({}, result.unexpected_keys)
    end)

    it("strict loading names the missing and the unexpected keys", function()
      local sd = Block():state_dict()
      sd["norm.bias"] = nil
      sd["head.weight"] = ms.zeros(2)
      raises("load_state_dict", {"missing keys: norm.bias", "unexpected keys: head.weight"}, function()
        Block():load_state_dict(sd)
      end)
    end)

    it("load_state_dict copies nothing when one value is wrong", function()
      local source, target = Block(), Block()
      local sd = source:state_dict()
      sd["norm.bias"] = ms.zeros(7)
      local before = target:state_dict()
      raises("load_state_dict", {"size mismatch for 'norm.bias'"}, function() target:load_state_dict(sd) end)
      for name, value in pairs(target:state_dict()) do assert.is_true(ms.equal(before[name], value), name) end
    end)

    -- PyTorch 2.15: a buffer registered in two modules, loaded with a different value under each
    -- name, ends with the later-registered name's value (under both names)
    it("a tensor with two names takes the value under its last registered name", function()
      local Shared = nn.Module:extend("Shared")
      function Shared:__init()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        local s = ms.zeros(2)
        self.a:register_buffer("s", s)
        self.b:register_buffer("s", s)
      end
      for _ = 1, 4 do
        local m = Shared()
        local sd = m:state_dict()
        sd["a.s"], sd["b.s"] = ms.full({2}, 1), ms.full({2}, 2)
        m:load_state_dict(sd)
        assert.are.same({2, 2}, m.a.s:table())
        assert.are.same({2, 2}, m.b.s:table())
      end
    end)

    it("runs state-dict hooks around state_dict and load_state_dict, as PyTorch's", function()
      local m = nn.Linear(2, 2)
      local calls = {}
      local pre = m:register_state_dict_pre_hook(function(_, prefix) calls[#calls + 1] = "pre " .. prefix end)
      local post = m:register_state_dict_post_hook(function(_, sd, prefix)
        calls[#calls + 1] = "post " .. prefix
        sd[prefix .. "extra"] = ms.zeros(1)
      end)
      local sd = m:state_dict({prefix = "p."})
      assert.are.same({"pre p.", "post p."}, calls)
      assert.is_not_nil(sd["p.extra"])
      assert.is_not_nil(sd["p.weight"])
      post.remove()
      pre.remove()
      local replace = m:register_state_dict_post_hook(function() return {only = ms.zeros(1)} end)
      local keys = {}
      for k in pairs(m:state_dict()) do keys[#keys + 1] = k end
      assert.are.same({"only"}, keys)
      replace.remove()
      assert.is_nil(m:state_dict().only)
      m:register_load_state_dict_pre_hook(function(_, incoming, strict)
        assert.is_true(strict)
        local out = {}
        for k, v in pairs(incoming) do out[(k:gsub("^old%.", ""))] = v end
        return out
      end)
      local seen
      m:register_load_state_dict_post_hook(function(_, result) seen = result end)
      local result = m:load_state_dict({["old.weight"] = ms.ones(2, 2), ["old.bias"] = ms.ones(2)})
      assert.are.equal(result, seen)
      assert.are.same({missing_keys = {}, unexpected_keys = {}}, seen)
      assert.are.same({1, 1, 1, 1}, flat(m.weight))
    end)

    it("leaves non-persistent buffers out of loading as out of state_dict", function()
      local m = nn.Linear(2, 2)
      m:register_buffer("scratch", ms.zeros(3), false)
      local sd = m:state_dict()
      assert.is_nil(sd.scratch)
      assert.are.same({missing_keys = {}, unexpected_keys = {}}, m:load_state_dict(sd))
    end)

    it("lists keys sorted and cuts long lists short, as FSDP and dcp do", function()
      local sd = {}
      for i = 12, 1, -1 do sd[("extra%02d"):format(i)] = ms.zeros(1) end
      local ok, err = pcall(function() nn.Linear(2, 2):load_state_dict(sd) end)
      assert.is_false(ok)
      assert.are.equal("moonshard: load_state_dict: missing keys: bias, weight; unexpected keys: extra01, extra02, " ..
                       "extra03, extra04, extra05, extra06, extra07, extra08, extra09, extra10 and 2 more", err)
    end)

    it("non-strict loading reports the missing and unexpected keys and loads the rest", function()
      local source, target = Block(), Block()
      local sd = source:state_dict()
      sd["proj.bias"] = nil
      sd["extra"] = ms.zeros(1)
      local before = flat(target.proj.bias)
      local result = target:load_state_dict(sd, {strict = false})
      assert.are.same({"proj.bias"}, result.missing_keys)
      assert.are.same({"extra"}, result.unexpected_keys)
      assert.are.same(before, flat(target.proj.bias))
      assert.is_true(ms.equal(source.proj.weight, target.proj.weight))
    end)

    it("names the key and both shapes on a size mismatch", function()
      local sd = Block():state_dict()
      sd["proj.weight"] = ms.zeros(6, 5)
      raises("load_state_dict", {"proj.weight", "[6, 5]", "[6, 4]"}, function() Block():load_state_dict(sd) end)
    end)

    it("rejects a value that is not a tensor", function()
      local sd = Block():state_dict()
      sd["proj.bias"] = {1, 2, 3, 4, 5, 6}
      raises("load_state_dict", {"proj.bias"}, function() Block():load_state_dict(sd) end)
    end)
  end)

  describe("is_instance_of", function()
    it("follows the class chain, as isinstance", function()
      local Base = nn.Module:extend("Base")
      local Derived = Base:extend("Derived")
      local d, b = Derived(), Base()
      assert.is_true(d:is_instance_of(Derived))
      assert.is_true(d:is_instance_of(Base))
      assert.is_true(d:is_instance_of(nn.Module))
      assert.is_false(b:is_instance_of(Derived))
      assert.is_false(nn.Linear(1, 1):is_instance_of(Base))
    end)

    it("is untouched by instance fields named like the class-chain helpers", function()
      local Classifier = nn.Module:extend("Classifier")
      function Classifier:__init() self.classes, self.class_chain = 10, "mine" end
      local c = Classifier()
      assert.is_true(c:is_instance_of(Classifier))
      assert.are.same({Classifier, nn.Module}, nn.Module.class_chain(c))
    end)

    it("gives the REPL's completion the methods of every class in the chain", function()
      local complete = require "moonshard.repl.complete"
      local Base = nn.Module:extend("Base")
      function Base:base_only() end
      local Derived = Base:extend("Derived")
      function Derived:derived_only() end
      local env = {m = Derived()}
      assert.are.same({"m:base_only"}, complete.candidates(env, "m:base_"))
      assert.are.same({"m:derived_only"}, complete.candidates(env, "m:derived_"))
      assert.are.same({"m:is_instance_of"}, complete.candidates(env, "m:is_inst"))
    end)
  end)

  describe("no_sync", function()
    it("runs fn through the handler a wrapper registered and sets nothing else on the instance", function()
      local m = nn.Linear(2, 2)
      local keys_before = {}
      for k in pairs(m) do keys_before[#keys_before + 1] = k end
      raises("no_sync", {"Linear", "does not synchronise"}, function() m:no_sync(function() end) end)
      local seen = {}
      local handle = m:register_no_sync_handler(setmetatable({}, {__call = function(_, module, fn, ...)
        seen[#seen + 1] = module
        return fn(...)
      end}))
      assert.are.same({3, 4}, {m:no_sync(function(a, b) return a + 1, b + 1 end, 2, 3)})
      assert.are.equal(m, seen[1])
      handle.remove()
      raises("no_sync", {"does not synchronise"}, function() m:no_sync(function() end) end)
      local keys_after = {}
      for k in pairs(m) do keys_after[#keys_after + 1] = k end
      table.sort(keys_before); table.sort(keys_after)
      assert.are.same(keys_before, keys_after)
      raises("register_no_sync_handler", {"callable"}, function() m:register_no_sync_handler(42) end)
    end)
  end)

  describe("zero_grad, train, eval and apply", function()
    it("zero_grad drops every parameter's gradient", function()
      local m = Block()
      m(ms.randn(3, 4)):sum():backward()
      for name, p in m:named_parameters() do assert.is_not_nil(p.grad, name) end
      m:zero_grad()
      for name, p in m:named_parameters() do assert.is_nil(p.grad, name) end
    end)

    it("zero_grad(false) keeps zero gradients", function()
      local m = nn.Linear(3, 2)
      m(ms.randn(4, 3)):sum():backward()
      m:zero_grad(false)
      assert.are.same({0, 0}, flat(m.bias.grad))
    end)

    it("train and eval set the mode of every submodule", function()
      local m = Block()
      assert.is_true(m.training)
      m:eval()
      for name, sub in m:named_modules() do assert.is_false(sub.training, name) end
      m:train()
      for name, sub in m:named_modules() do assert.is_true(sub.training, name) end
    end)

    it("Dropout zeroes and rescales in training and passes the input through in eval", function()
      local seq = nn.Sequential(nn.Dropout(0.5))
      local x = ms.ones(2000, {dtype = "f64"})
      ms.manual_seed(0)
      local dropped, kept = 0, 0
      for _, v in ipairs(flat(seq(x))) do
        if v == 0 then dropped = dropped + 1 elseif v == 2 then kept = kept + 1 end
      end
      assert.are.equal(2000, dropped + kept)
      assert.is_true(math.abs(dropped - 1000) < 100, tostring(dropped))
      seq:eval()
      assert.is_true(ms.equal(x, seq(x)))
    end)

    it("apply calls fn on every module, children before their parent", function()
      local m = Block()
      local visited = {}
      local names = {}
      for name, sub in m:named_modules() do names[sub] = name end
      assert.are.equal(m, m:apply(function(sub) visited[#visited + 1] = names[sub] end))
      assert.are.same({"proj", "ffn.0", "ffn.1", "ffn.2", "ffn", "norm", ""}, visited)
    end)

    it("apply can re-initialise every Linear", function()
      local m = Block()
      m:apply(function(sub) if sub.__name == "Linear" then nn.init.zeros_(sub.weight) end end)
      assert.are.equal(0, m.ffn[1].weight:abs():sum():item())
      assert.are.equal(0, m.proj.weight:abs():sum():item())
    end)
  end)

  describe("default initialisation", function()
    -- kaiming_uniform_(a = sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias uses the same bound.
    it("Linear draws weight and bias uniformly within 1/sqrt(in_features)", function()
      ms.manual_seed(0)
      local m = nn.Linear(400, 300)
      local bound = 1 / math.sqrt(400)
      for _, case in ipairs({{"weight", flat(m.weight)}, {"bias", flat(m.bias)}}) do
        local name, values = case[1], case[2]
        local low, high = math.huge, -math.huge
        for _, v in ipairs(values) do low, high = math.min(low, v), math.max(high, v) end
        assert.is_true(low >= -bound and high <= bound, name .. " leaves the bound")
        local reach = name == "weight" and 0.999 or 0.9
        assert.is_true(low < -reach * bound and high > reach * bound, name .. " does not fill the bound")
        local mean, variance = moments(values)
        local spread = name == "weight" and 0.02 or 0.15
        assert.is_true(math.abs(mean) < spread * bound, name .. " mean " .. mean)
        assert.is_true(math.abs(variance / (bound * bound / 3) - 1) < spread * 2, name .. " variance " .. variance)
      end
    end)

    it("Linear's init depends on in_features, not out_features", function()
      local wide = flat(nn.Linear(16, 500).weight)
      local low, high = math.huge, -math.huge
      for _, v in ipairs(wide) do low, high = math.min(low, v), math.max(high, v) end
      assert.is_true(low >= -0.25 and high <= 0.25 and high > 0.24)
    end)

    it("kaiming_uniform_ takes PyTorch's mode and nonlinearity", function()
      local function extent(t)
        local high = 0
        for _, v in ipairs(flat(t)) do high = math.max(high, math.abs(v)) end
        return high
      end
      local w = ms.empty(200, 50)
      nn.init.kaiming_uniform_(w, {mode = "fan_out", nonlinearity = "relu"})
      local bound = math.sqrt(2) * math.sqrt(3 / 200)
      assert.is_true(extent(w) <= bound and extent(w) > 0.99 * bound)
      nn.init.kaiming_uniform_(w)
      bound = math.sqrt(2) * math.sqrt(3 / 50) -- leaky_relu with a = 0
      assert.is_true(extent(w) <= bound and extent(w) > 0.99 * bound)
      raises("kaiming_uniform_", {"fan_avg"}, function() nn.init.kaiming_uniform_(w, {mode = "fan_avg"}) end)
      raises("kaiming_uniform_", {"gain"}, function() nn.init.kaiming_uniform_(w, {gain = 2}) end)
      raises("calculate_gain", {"selu"}, function() nn.init.kaiming_uniform_(w, {nonlinearity = "selu"}) end)
    end)

    it("Linear without bias has only a weight", function()
      assert.are.same({"weight"}, (collect(nn.Linear(3, 2, {bias = false}):named_parameters())))
    end)

    it("LayerNorm starts with weight 1 and bias 0", function()
      local m = nn.LayerNorm(5)
      assert.are.same({1, 1, 1, 1, 1}, flat(m.weight))
      assert.are.same({0, 0, 0, 0, 0}, flat(m.bias))
      assert.are.same({}, (collect(nn.LayerNorm(5, {elementwise_affine = false}):named_parameters())))
    end)

    it("Embedding draws its weight from N(0, 1)", function()
      ms.manual_seed(1)
      local values = flat(nn.Embedding(500, 64, {dtype = "f64"}).weight)
      local mean, variance = moments(values)
      assert.is_true(math.abs(mean) < 0.02, "mean " .. mean)
      assert.is_true(math.abs(variance - 1) < 0.03, "variance " .. variance)
    end)

    it("the same seed gives the same model", function()
      ms.manual_seed(7)
      local a = Block()
      ms.manual_seed(7)
      local b = Block()
      for name, p in a:named_parameters() do assert.is_true(ms.equal(p, b:state_dict()[name]), name) end
    end)
  end)

  describe("forwards against plain Lua", function()
    it("Linear computes x W^T + b", function()
      local m = nn.Linear(3, 2, {dtype = "f64"})
      local w, b = fill(m.weight, -1, 1, 1), fill(m.bias, -1, 1, 2)
      local x = gradcheck.values(12, -2, 2, 3)
      local expected = {}
      for row = 0, 3 do
        for o = 0, 1 do
          local acc = b[o + 1]
          for i = 0, 2 do acc = acc + x[row * 3 + i + 1] * w[o * 3 + i + 1] end
          expected[#expected + 1] = acc
        end
      end
      assert_close(expected, flat(m(gradcheck.tensor({4, 3}, x))), 1e-12)
    end)

    it("Linear in f32 matches the same computation to f32 precision", function()
      local m = nn.Linear(64, 8)
      local w, b = fill(m.weight, -1, 1, 4), fill(m.bias, -1, 1, 5)
      local x = gradcheck.values(64, -1, 1, 6)
      local expected = {}
      for o = 0, 7 do
        local acc = b[o + 1]
        for i = 0, 63 do acc = acc + x[i + 1] * w[o * 64 + i + 1] end
        expected[o + 1] = acc
      end
      assert_close(expected, flat(m(ms.tensor({x}))), 1e-5)
    end)

    it("LayerNorm normalises the last dim with the biased variance, then scales and shifts", function()
      local m = nn.LayerNorm(4, {dtype = "f64", eps = 1e-5})
      local w, b = fill(m.weight, 0.5, 1.5, 7), fill(m.bias, -1, 1, 8)
      local x = gradcheck.values(12, -3, 3, 9)
      local expected = {}
      for row = 0, 2 do
        local mean, var = 0, 0
        for i = 1, 4 do mean = mean + x[row * 4 + i] / 4 end
        for i = 1, 4 do var = var + (x[row * 4 + i] - mean) ^ 2 / 4 end
        for i = 1, 4 do
          expected[#expected + 1] = (x[row * 4 + i] - mean) / math.sqrt(var + 1e-5) * w[i] + b[i]
        end
      end
      assert_close(expected, flat(m(gradcheck.tensor({3, 4}, x))), 1e-12)
    end)

    it("Embedding gathers the rows named by the indices", function()
      local m = nn.Embedding(5, 3, {dtype = "f64"})
      local w = fill(m.weight, -1, 1, 10)
      local out = m(ms.tensor({{4, 0}, {2, 4}}, {dtype = "i64"}))
      assert.are.same({2, 2, 3}, out:shape())
      local expected = {}
      for _, row in ipairs({4, 0, 2, 4}) do
        for j = 1, 3 do expected[#expected + 1] = w[row * 3 + j] end
      end
      assert.are.same(expected, flat(out))
    end)

    it("ReLU and GELU apply their formulas element by element", function()
      local x = gradcheck.values(9, -3, 3, 11)
      local t = gradcheck.tensor({9}, x)
      local relu, gelu, gelu_tanh = flat(nn.ReLU()(t)), flat(nn.GELU()(t)), flat(nn.GELU({approximate = "tanh"})(t))
      local erf = require("support.reference_math").erf
      for i, v in ipairs(x) do
        assert.are.equal(math.max(v, 0), relu[i])
        assert.is_true(math.abs(gelu[i] - 0.5 * v * (1 + erf(v / math.sqrt(2)))) < 1e-12, tostring(v))
        local inner = math.sqrt(2 / math.pi) * (v + 0.044715 * v ^ 3)
        assert.is_true(math.abs(gelu_tanh[i] - 0.5 * v * (1 + math.tanh(inner))) < 1e-12, tostring(v))
      end
    end)

    it("CausalSelfAttention matches attention computed in Lua loops", function()
      local batch, time, embd, heads = 2, 4, 6, 2
      local head_dim = embd / heads
      local m = nn.CausalSelfAttention(embd, heads, {dtype = "f64"})
      local w_attn, b_attn = fill(m.c_attn.weight, -0.5, 0.5, 12), fill(m.c_attn.bias, -0.2, 0.2, 13)
      local w_proj, b_proj = fill(m.c_proj.weight, -0.5, 0.5, 14), fill(m.c_proj.bias, -0.2, 0.2, 15)
      local x = gradcheck.values(batch * time * embd, -1, 1, 16)

      local function linear(input, w, b, n_in, n_out)
        local out = {}
        for o = 1, n_out do
          local acc = b[o]
          for i = 1, n_in do acc = acc + input[i] * w[(o - 1) * n_in + i] end
          out[o] = acc
        end
        return out
      end

      local expected = {}
      for bi = 0, batch - 1 do
        local qkv = {}
        for t = 1, time do
          local row = {}
          for c = 1, embd do row[c] = x[(bi * time + t - 1) * embd + c] end
          qkv[t] = linear(row, w_attn, b_attn, embd, 3 * embd)
        end
        local y = {}
        for t = 1, time do y[t] = {} end
        for h = 0, heads - 1 do
          for t = 1, time do
            local scores, top = {}, -math.huge
            for s = 1, t do -- the causal mask: position t sees positions 1..t only
              local dot = 0
              for d = 1, head_dim do
                dot = dot + qkv[t][h * head_dim + d] * qkv[s][embd + h * head_dim + d]
              end
              scores[s] = dot / math.sqrt(head_dim)
              top = math.max(top, scores[s])
            end
            local total = 0
            for s = 1, t do scores[s] = math.exp(scores[s] - top); total = total + scores[s] end
            for d = 1, head_dim do
              local acc = 0
              for s = 1, t do acc = acc + scores[s] / total * qkv[s][2 * embd + h * head_dim + d] end
              y[t][h * head_dim + d] = acc
            end
          end
        end
        for t = 1, time do
          for _, v in ipairs(linear(y[t], w_proj, b_proj, embd, embd)) do expected[#expected + 1] = v end
        end
      end

      local out = m(gradcheck.tensor({batch, time, embd}, x))
      assert.are.same({batch, time, embd}, out:shape())
      assert_close(expected, flat(out), 1e-12)
    end)

    it("CausalSelfAttention's output at a position ignores later positions", function()
      ms.manual_seed(3)
      local m = nn.CausalSelfAttention(8, 2, {dtype = "f64"})
      local x = ms.randn(1, 5, 8, {dtype = "f64"})
      local changed = x:clone()
      ms.no_grad(function() changed:narrow(1, 4, 1):fill_(9) end)
      local a, b = m(x), m(changed)
      assert.is_true(ms.equal(a:narrow(1, 0, 4), b:narrow(1, 0, 4)))
      assert.is_false(ms.equal(a:narrow(1, 4, 1), b:narrow(1, 4, 1)))
    end)
  end)

  describe("containers", function()
    it("ModuleList indexes from 1 in Lua, names from 0, appends and iterates", function()
      local list = nn.ModuleList({nn.Linear(2, 2), nn.ReLU()})
      list:append(nn.Linear(2, 1))
      assert.are.equal(3, list:len())
      assert.are.equal("ReLU", list[2].__name)
      assert.are.equal(list:get(3), list[3])
      local seen = {}
      for i, sub in list:ipairs() do seen[i] = sub.__name end
      assert.are.same({"Linear", "ReLU", "Linear"}, seen)
      assert.are.same({"0.weight", "0.bias", "2.weight", "2.bias"}, (collect(list:named_parameters())))
    end)

    it("ModuleList has no forward and rejects what is not a module", function()
      raises("ModuleList", {"forward"}, function() nn.ModuleList({nn.ReLU()})(ms.zeros(1)) end)
      raises("ModuleList", {"element 2"}, function() nn.ModuleList({nn.ReLU(), 5}) end)
      raises("ModuleList", {"out of range"}, function() nn.ModuleList({nn.ReLU()}):get(2) end)
    end)

    it("Sequential runs its children in order", function()
      local seq = nn.Sequential(nn.Linear(3, 4, {dtype = "f64"}), nn.ReLU(), nn.Linear(4, 2, {dtype = "f64"}))
      local x = ms.randn(5, 3, {dtype = "f64"})
      local expected = seq[3](seq[2](seq[1](x)))
      assert.is_true(ms.equal(expected, seq(x)))
    end)
  end)

  describe("losses", function()
    local logits = {{1.0, -0.5, 2.0}, {0.1, 0.2, -1.0}, {-2.0, 3.0, 0.5}, {0.0, 0.0, 0.0}}
    local classes = {2, 0, 1, 1}

    local function cross_entropy_reference(ignore_index)
      local total, count = 0, 0
      for i, row in ipairs(logits) do
        if classes[i] ~= ignore_index then
          local top = math.max(unpack(row))
          local sum = 0
          for _, v in ipairs(row) do sum = sum + math.exp(v - top) end
          total = total - (row[classes[i] + 1] - top - math.log(sum))
          count = count + 1
        end
      end
      return total, count
    end

    it("CrossEntropyLoss is the mean negative log-likelihood of the log-softmax", function()
      local input = ms.tensor(logits, {dtype = "f64"})
      local target = ms.tensor(classes, {dtype = "i64"})
      local total, count = cross_entropy_reference()
      local loss = nn.CrossEntropyLoss()(input, target)
      assert.is_true(math.abs(loss:item() - total / count) < 1e-12)
      assert.are.equal(F.cross_entropy(input, target):item(), loss:item())
      local summed = nn.CrossEntropyLoss({reduction = "sum"})(input, target)
      assert.is_true(math.abs(summed:item() - total) < 1e-12)
    end)

    it("CrossEntropyLoss leaves out targets equal to ignore_index", function()
      local input = ms.tensor(logits, {dtype = "f64"})
      local target = ms.tensor(classes, {dtype = "i64"})
      local total, count = cross_entropy_reference(1)
      local loss = nn.CrossEntropyLoss({ignore_index = 1})(input, target)
      assert.are.equal(2, count)
      assert.is_true(math.abs(loss:item() - total / count) < 1e-12)
      assert.are.equal(F.cross_entropy(input, target, {ignore_index = 1}):item(), loss:item())
    end)

    it("MSELoss is the mean (or sum, or each) of the squared differences", function()
      local a, b = {1.5, -2.0, 0.25, 3.0}, {1.0, 1.0, -0.75, 3.5}
      local input, target = ms.tensor(a, {dtype = "f64"}), ms.tensor(b, {dtype = "f64"})
      local squares, total = {}, 0
      for i = 1, 4 do squares[i] = (a[i] - b[i]) ^ 2; total = total + squares[i] end
      assert.are.equal(total / 4, nn.MSELoss()(input, target):item())
      assert.are.equal(total, nn.MSELoss({reduction = "sum"})(input, target):item())
      assert.are.same(squares, flat(nn.MSELoss({reduction = "none"})(input, target)))
      assert.are.equal(F.mse_loss(input, target):item(), nn.MSELoss()(input, target):item())
    end)
  end)

  describe("bad input", function()
    it("a Linear applied to an input of the wrong width names both shapes", function()
      raises("linear", {"[2, 5]", "[4, 3]"}, function() nn.Linear(3, 4)(ms.zeros(2, 5)) end)
    end)
    it("Linear sizes that are not non-negative integers", function()
      raises("Linear", {"in_features"}, function() nn.Linear(-1, 3) end)
      raises("Linear", {"out_features"}, function() nn.Linear(3, 2.5) end)
    end)
    it("CausalSelfAttention with n_embd not divisible by n_head, or an input of another width", function()
      raises("CausalSelfAttention", {"divisible"}, function() nn.CausalSelfAttention(6, 4) end)
      raises("CausalSelfAttention", {"[B, T, 6]"}, function() nn.CausalSelfAttention(6, 2)(ms.zeros(1, 3, 4)) end)
    end)
    it("a Dropout probability outside [0, 1]", function()
      raises("Dropout", {"1.5"}, function() nn.Dropout(1.5) end)
    end)
    it("an option a module or function does not have", function()
      raises("CrossEntropyLoss", {"label_smooth"}, function() nn.CrossEntropyLoss({label_smooth = 0.1}) end)
      raises("Linear", {"bais"}, function() nn.Linear(2, 2, {bais = false}) end)
      raises("LayerNorm", {"epsilon"}, function() nn.LayerNorm(2, {epsilon = 1e-6}) end)
      raises("scaled_dot_product_attention", {"causal"}, function()
        local q = ms.zeros(1, 2, 2)
        F.scaled_dot_product_attention(q, q, q, {causal = true})
      end)
      raises("cross_entropy", {"weight"}, function()
        F.cross_entropy(ms.zeros(2, 3), ms.tensor({0, 1}, {dtype = "i64"}), {weight = ms.ones(3)})
      end)
    end)
    it("a module without forward", function()
      local Empty = nn.Module:extend("Empty")
      raises("Empty", {"forward"}, function() Empty()(ms.zeros(1)) end)
    end)
    it("train with a mode that is not a boolean", function()
      raises("train", {"boolean"}, function() nn.Linear(2, 2):train("yes") end)
    end)
    it("attention without a key or value, and a layer_norm eps that is not a number", function()
      raises("scaled_dot_product_attention", {"key"}, function() F.scaled_dot_product_attention(ms.zeros(1, 2, 2)) end)
      raises("layer_norm", {"eps"}, function() F.layer_norm(ms.zeros(2, 3), {3}, nil, nil, "small") end)
    end)
    it("initialisers given something that is not a tensor or bounds that are not numbers", function()
      raises("uniform_", {"tensor"}, function() nn.init.uniform_(5, 0, 1) end)
      raises("normal_", {"numbers"}, function() nn.init.normal_(ms.zeros(2), "zero", 1) end)
    end)
    it("load_state_dict with something that is not a table", function()
      raises("load_state_dict", {"string"}, function() nn.Linear(2, 2):load_state_dict("weights") end)
    end)
  end)
end)
