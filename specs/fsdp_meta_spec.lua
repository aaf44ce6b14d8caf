-- Deferred initialisation: models built on the meta device hold no storage, and FSDP
-- materialises only each rank's shard, bitwise the rows a full construction with the same
-- seed gives, on 1 to 4 ranks, within the rank's share plus one unit (pool statistics).
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn, dist, fsdp = ms.nn, ms.dist, ms.fsdp

-- Uneven sizes (7, 13 rows) so that 3 and 4 ranks hold different row counts.
local Block = nn.Module:extend("MetaBlock")
function Block:__init(dim)
  self.norm = nn.LayerNorm(dim)
  self.fc1 = nn.Linear(dim, 13)
  self.fc2 = nn.Linear(13, dim)
end
function Block:forward(x) return x + self.fc2(nn.F.gelu(self.fc1(self.norm(x)))) end

local Model = nn.Module:extend("MetaModel")
function Model:__init(opts)
  self.embed = nn.Embedding(11, 7, opts)
  self.blocks = nn.ModuleList({Block(7), Block(7)})
  self.head = nn.Linear(7, 11, opts)
end
function Model:forward(tokens)
  local x = self.embed(tokens)
  for _, block in self.blocks:ipairs() do x = block(x) end
  return self.head(x)
end

-- This rank's rows of every parameter of a fully built model, by name.
local function expected_rows(world, rank)
  ms.manual_seed(1234)
  local full = Model()
  local rows = {}
  for name, p in full:named_parameters() do
    local n = p:size(0)
    local chunk = math.ceil(n / world)
    local start = math.min(n, rank * chunk)
    local length = math.max(0, math.min(n, start + chunk) - start)
    rows[name] = length > 0 and p:narrow(0, start, length):clone() or nil
  end
  return rows, ms.get_rng_state().offset
end

local function flat_of(t) return t:reshape(-1):table() end

-- Under mpirun the ranks are this process: collect what the tests left, so later spec
-- files measure memory from a clean pool.
after_each(function() collectgarbage(); collectgarbage() end)
before_each(global_state.save)
after_each(global_state.restore)

describe("meta device", function()
  it("builds modules without allocating, says 'meta', and raises naming the op and tensor", function()
    local before = ms.memory_stats("cpu")
    local model = ms.device("meta", function() return Model() end)
    local linear = nn.Linear(4, 3, {device = "meta"})
    local after = ms.memory_stats("cpu")
    assert.are.equal(before.allocs, after.allocs)
    assert.are.equal("meta", model.head.weight:device())
    assert.are.equal("meta", linear.bias:device())
    assert.are.same({11, 7}, model.head.weight:shape())
    assert.has_error(function() model(ms.tensor({{1, 2}}, {dtype = "i64"})) end,
      "moonshard: embedding: tensor 'weight' [11, 7] f32 is on the meta device and has no data " ..
      "(materialise it first: fsdp.FSDP with param_init_fn, or module:to_empty() and an initialiser)")
    local ok, err = pcall(function() return linear.weight * 2 end)
    assert.is_false(ok)
    assert.matches("moonshard: mul: tensor 'weight' %[3, 4%] f32 is on the meta device", err)
    assert.are.equal("cpu", ms.zeros(2):device()) -- the default device comes back
  end)

  it("runs any callable: a function, a Module class, a table with __call", function()
    local block = ms.device("meta", Block, 7)
    assert.are.equal("meta", block.fc1.weight:device())
    local maker = setmetatable({}, {__call = function(_, n) return nn.Linear(n, 2) end})
    assert.are.equal("meta", ms.device("meta", maker, 3).weight:device())
    local ok, err = pcall(ms.device, "meta", {})
    assert.is_false(ok)
    assert.are.equal("moonshard: device: expected a function (or callable table) to run, got table", err)
    assert.are.equal("cpu", ms.zeros(2):device())
  end)

  it("advances the RNG like a full construction and to_empty + reset_parameters replays it", function()
    local rows, offset = expected_rows(1, 0)
    ms.manual_seed(1234)
    local model = ms.device("meta", function() return Model() end)
    assert.are.equal(offset, ms.get_rng_state().offset)
    model:to_empty()
    for _, m in model:named_modules() do if m.reset_parameters then m:reset_parameters() end end
    for name, p in model:named_parameters() do assert.is_true(ms.equal(rows[name], p), name) end
  end)
end)

describe("FSDP deferred initialisation", function()
  for world = 1, 4 do
    it(("gives shards bitwise equal to a full construction on %d rank(s)"):format(world), function()
      local results = dist.spawn(world, function(rank)
        local rows, offset = expected_rows(world, rank)
        ms.manual_seed(1234)
        local model = ms.device("meta", function() return Model() end)
        fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({Block})})
        local mismatches, count = {}, 0
        for name, p in model:named_parameters() do
          count = count + 1
          local shard = p:to_local()
          if rows[name] == nil then
            if shard:numel() ~= 0 then mismatches[#mismatches + 1] = name .. " should be empty" end
          elseif not ms.equal(rows[name], shard) then
            mismatches[#mismatches + 1] = name
          end
        end
        return {mismatches = mismatches, count = count, same_rng = offset == ms.get_rng_state().offset}
      end)
      for rank, r in ipairs(results) do
        assert.are.same({}, r.mismatches, "rank " .. (rank - 1))
        assert.are.equal(15, r.count)
        assert.is_true(r.same_rng)
      end
    end)
  end

  it("runs param_init_fn on each module with meta parameters and replays its draws", function()
    local results = dist.spawn(2, function(rank)
      -- the custom scheme a full construction applies after the layers' own initialisation
      local function scheme(m)
        if m.__name == "Linear" then nn.init.normal_(m.weight, 0, 0.02); nn.init.zeros_(m.bias) end
      end
      ms.manual_seed(7)
      local full = Model()
      full:apply(scheme)
      ms.manual_seed(7)
      local model = ms.device("meta", function()
        local m = Model()
        m:apply(scheme)
        return m
      end)
      local called = {}
      fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({Block}), param_init_fn = function(m)
        called[#called + 1] = m.__name
        if m.reset_parameters then m:reset_parameters() end
        scheme(m)
      end})
      local bad = {}
      local full_params = {}
      for name, p in full:named_parameters() do full_params[name] = p end
      for name, p in model:named_parameters() do
        local want = ms.distribute_tensor(full_params[name], p.device_mesh, p.placements, {src_data_rank = false}):to_local()
        if not ms.equal(want, p:to_local()) then bad[#bad + 1] = name end
      end
      return {bad = bad, called = called}
    end)
    for _, r in ipairs(results) do
      assert.are.same({}, r.bad)
      -- two blocks (LayerNorm, Linear, Linear) and the root's Embedding and Linear
      assert.are.same({"LayerNorm", "Linear", "Linear", "LayerNorm", "Linear", "Linear", "Embedding", "Linear"}, r.called)
    end
  end)

  it("takes any callable as param_init_fn and auto_wrap_policy", function()
    local r = dist.spawn(1, function()
      local calls = 0
      local init = setmetatable({}, {__call = function(_, m) calls = calls + 1; m:reset_parameters() end})
      local policy = setmetatable({}, {__call = function(_, m) return m.__name == "Linear" end})
      local model = fsdp.FSDP(ms.device("meta", function() return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)) end),
                              {param_init_fn = init, auto_wrap_policy = policy})
      return {calls = calls, device = model[1].weight:to_local():device(), unit = fsdp.unit_of(model[1]) ~= nil}
    end)[1]
    assert.are.same({calls = 2, device = "cpu", unit = true}, r)
  end)

  it("peaks at the rank's share plus the largest unit while building and wrapping on 4 ranks", function()
    local DIM, LAYERS = 256, 6
    local function build()
      local layers = {}
      for i = 1, LAYERS do layers[i] = nn.Linear(DIM, DIM) end
      return nn.Sequential(layers)
    end
    local results = dist.spawn(4, function()
      collectgarbage(); collectgarbage()
      local base = ms.memory_stats("cpu").allocated
      ms.reset_peak_memory_stats("cpu")
      local model = ms.device("meta", build)
      fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
      local deferred_peak = ms.memory_stats("cpu").peak - base
      local share = 0
      for _, p in model:named_parameters() do share = share + p:to_local():nbytes() end
      -- the same model built whole first, for contrast
      local base_full = ms.memory_stats("cpu").allocated
      ms.reset_peak_memory_stats("cpu")
      fsdp.FSDP(build(), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
      return {deferred = deferred_peak, share = share, full = ms.memory_stats("cpu").peak - base_full}
    end)
    local unit = DIM * (DIM + 1) * 4
    for rank, r in ipairs(results) do
      assert.are.equal(LAYERS * 64 * (DIM + 1) * 4, r.share)
      assert.is_true(r.deferred <= r.share + unit, ("rank %d: deferred peak %d > share %d + unit %d"):format(
        rank - 1, r.deferred, r.share, unit))
      assert.is_true(r.full >= LAYERS * unit, "rank " .. (rank - 1) .. " full construction peak " .. r.full)
    end
  end)

  it("lets nn.init draw a sharded parameter's rows only, as a whole draw would", function()
    local results = dist.spawn(3, function()
      ms.manual_seed(0)
      local model = fsdp.FSDP(nn.Linear(5, 7))
      ms.manual_seed(42)
      nn.init.normal_(model.weight, 1, 2)
      nn.init.constant_(model.bias, 0.5)
      ms.manual_seed(42)
      local whole = ms.empty(7, 5)
      nn.init.normal_(whole, 1, 2)
      local p = model.weight
      local want = ms.distribute_tensor(whole, p.device_mesh, p.placements, {src_data_rank = false}):to_local()
      local bias = model.bias:to_local()
      return ms.equal(want, p:to_local()) and (bias:numel() == 0 or ms.equal(bias, ms.full(bias:shape(), 0.5)))
    end)
    assert.are.same({true, true, true}, results)
  end)
end)

describe("FSDP deferred initialisation of tied parameters", function()
  -- GPT-2's tie, made after construction: both layers drew, the tie keeps wte's tensor.
  -- head_first registers the head before the embedding; bias gives the head an untied bias.
  local TiedLM = nn.Module:extend("MetaTiedLM")
  function TiedLM:__init(cfg)
    if cfg.head_first then self.lm_head = nn.Linear(7, 11, {bias = cfg.bias}) end
    self.wte = nn.Embedding(11, 7)
    self.block = Block(7)
    if not cfg.head_first then self.lm_head = nn.Linear(7, 11, {bias = cfg.bias}) end
    self.lm_head.weight = self.wte.weight
    if cfg.scheme then self:apply(cfg.scheme) end
  end
  -- GPT-2's scheme, applied after construction (both names of the tie draw once each)
  local function gpt2_scheme(m)
    if m.__name == "Linear" then
      nn.init.normal_(m.weight, 0, 0.02)
      if m.bias then nn.init.zeros_(m.bias) end
    elseif m.__name == "Embedding" then
      nn.init.normal_(m.weight, 0, 0.02)
    end
  end

  -- Per rank: names whose shard differs from the full construction's, whether the RNG offset
  -- after the meta build and the wrap equals the full construction's, and whether the tie holds.
  local function compare(world, cfg, param_init_fn)
    return dist.spawn(world, function()
      ms.manual_seed(99)
      local full = TiedLM(cfg)
      local full_offset = ms.get_rng_state().offset
      ms.manual_seed(99)
      local model = ms.device("meta", function() return TiedLM(cfg) end)
      fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({Block}), param_init_fn = param_init_fn})
      local sd, bad = full:state_dict(), {}
      for name, p in pairs(model:state_dict()) do
        local want = ms.distribute_tensor(sd[name], p.device_mesh, p.placements, {src_data_rank = false}):to_local()
        if not ms.equal(want, p:to_local()) then bad[#bad + 1] = name end
      end
      table.sort(bad)
      return {bad = bad, same_rng = full_offset == ms.get_rng_state().offset,
              tied = model.wte.weight == model.lm_head.weight}
    end)
  end

  for world = 1, 4 do
    it(("gives the full construction's values and RNG state by default on %d rank(s)"):format(world), function()
      for _, cfg in ipairs({{bias = false}, {bias = true}, {bias = true, head_first = true}}) do
        for rank, r in ipairs(compare(world, cfg)) do
          local what = ("rank %d, bias %s, head first %s"):format(rank - 1, tostring(cfg.bias), tostring(cfg.head_first))
          assert.are.same({}, r.bad, what)
          assert.is_true(r.same_rng, what)
          assert.is_true(r.tied, what)
        end
      end
    end)
  end

  it("replays a construction scheme applied after the tie through a param_init_fn making the same calls", function()
    local function init(m)
      if m.reset_parameters then m:reset_parameters() end
      gpt2_scheme(m)
    end
    for _, cfg in ipairs({{bias = true, scheme = gpt2_scheme}, {bias = true, head_first = true, scheme = gpt2_scheme}}) do
      for rank, r in ipairs(compare(2, cfg, init)) do
        assert.are.same({}, r.bad, "rank " .. (rank - 1))
        assert.is_true(r.same_rng, "rank " .. (rank - 1))
      end
    end
  end)
end)

describe("FSDP deferred initialisation errors", function()
  local Raw = nn.Module:extend("RawParams")
  function Raw:__init()
    self.inner = nn.Linear(3, 4)
    self.scale = nn.Parameter(ms.empty(4))
  end

  it("names a meta parameter left uninitialised and leaves the module as it was", function()
    local r = dist.spawn(1, function()
      local model = ms.device("meta", function() return Raw() end)
      collectgarbage(); collectgarbage()
      local before = ms.memory_stats("cpu").allocated
      local ok, err = pcall(fsdp.FSDP, model)
      local state = {ok = ok, err = err, leaked = ms.memory_stats("cpu").allocated - before,
                     unit = fsdp.unit_of(model) ~= nil, scale = model.scale:device(),
                     weight = model.inner.weight:device()}
      -- a working init wraps the same module afterwards
      fsdp.FSDP(model, {param_init_fn = function(m)
        if m.reset_parameters then m:reset_parameters() else nn.init.ones_(m.scale) end
      end})
      state.scale_after = ms.equal(model.scale:to_local(), ms.ones(4))
      local ok2, err2 = pcall(fsdp.FSDP, ms.device("meta", function() return Raw() end), {param_init_fn = "reset"})
      state.bad_fn = err2
      return state
    end)[1]
    assert.is_false(r.ok)
    assert.are.equal("moonshard: FSDP: parameter 'scale' was built on the meta device and is still uninitialised " ..
      "after param_init_fn ran on its module (RawParams has no reset_parameters, or it does not write the " ..
      "parameter); give FSDP a param_init_fn that initialises it", r.err)
    assert.are.equal(0, r.leaked)
    assert.is_false(r.unit)
    assert.are.equal("meta", r.scale)
    assert.are.equal("meta", r.weight)
    assert.is_true(r.scale_after)
    assert.are.equal("moonshard: FSDP: param_init_fn must be a function(module), got string", r.bad_fn)
  end)
end)

describe("FSDP deferred initialisation of a buffer shared by two modules", function()
  -- A Linear scaled by a buffer it is given (modules may share one), which reset_parameters
  -- draws as its construction did (ms.randn); counts adds 1 to it in each forward.
  local Scaled = nn.Module:extend("MetaScaled")
  function Scaled:__init(s, counts)
    self.fc = nn.Linear(3, 3)
    self:register_buffer("s", s)
    self.counts = counts
  end
  function Scaled:reset_parameters() nn.init.normal_(self.s) end
  function Scaled:forward(x)
    if self.counts then ms.no_grad(function() self.s:add_(1) end) end
    return self.fc(x) * self.s
  end

  -- A module with its own weight and a given buffer: with meta parameters of its own, its
  -- init runs before that of a buffer-only module registered earlier.
  local Direct = nn.Module:extend("MetaDirect")
  function Direct:__init(s)
    self.weight = nn.Parameter(ms.randn(3, 3))
    self:register_buffer("s", s)
  end
  function Direct:reset_parameters()
    nn.init.normal_(self.weight)
    nn.init.normal_(self.s)
  end
  function Direct:forward(x) return nn.F.linear(x, self.weight) * self.s end

  -- a and b share one buffer (a counts, b reads); direct makes b a Direct.
  local SharedNet = nn.Module:extend("MetaSharedNet")
  function SharedNet:__init(direct)
    local s = ms.randn(3)
    self.a = Scaled(s, true)
    self.b = direct and Direct(s) or Scaled(s, false)
    self.head = nn.Linear(3, 2)
  end
  function SharedNet:forward(x) return self.head(self.b(self.a(x))) end

  local layouts = {
    {strategy = "FULL_SHARD", world = 2}, {strategy = "SHARD_GRAD_OP", world = 2}, {strategy = "NO_SHARD", world = 2},
    {strategy = "HYBRID_SHARD", world = 4, mesh = {2, 2}},
  }
  for _, layout in ipairs(layouts) do
    it(("%s on %d ranks: stays one tensor holding the full construction's values (one unit, a unit per module)")
       :format(layout.strategy, layout.world), function()
      local results = dist.spawn(layout.world, function()
        ms.set_default_dtype("f64")
        local out, want = {}, {}
        for _, case in ipairs({{"root"}, {"module"}, {"root", true}, {"module", true}}) do
          local wrap, direct = case[1], case[2]
          local label = wrap .. (direct and ", b direct" or "")
          ms.manual_seed(5)
          local full = SharedNet(direct)
          local offset = ms.get_rng_state().offset
          want[label] = flat_of(full.a.s)
          ms.manual_seed(5)
          local model = ms.device("meta", function() return SharedNet(direct) end)
          local opts = {sharding_strategy = layout.strategy}
          if wrap == "module" then opts.auto_wrap_policy = fsdp.wrap_policy({Scaled, Direct}) end
          if layout.mesh then
            opts.device_mesh = dist.init_device_mesh(layout.mesh, {mesh_dim_names = {"replicate", "shard"}})
          end
          fsdp.FSDP(model, opts)
          local r = {same = rawequal(model.a.s, model.b.s), storage = model.a.s:data_ptr() == model.b.s:data_ptr(),
                     values = flat_of(model.b.s), same_rng = offset == ms.get_rng_state().offset}
          ms.no_grad(function() model.b.s:fill_(4) end)
          r.after = flat_of(model.a.s)
          out[label] = r
        end
        return {want = want, runs = out}
      end)
      for rank, res in ipairs(results) do
        for wrap, r in pairs(res.runs) do
          local label = ("rank %d, %s"):format(rank - 1, wrap)
          assert.is_true(r.same, label)
          assert.is_true(r.storage, label)
          assert.same(res.want[wrap], r.values, label)
          assert.is_true(r.same_rng, label)
          assert.same({4, 4, 4}, r.after, label)
        end
      end
    end)
  end

  it("trains as the full construction: the count made through a's name scales through b's", function()
    local results = dist.spawn(2, function(rank, size)
      ms.set_default_dtype("f64")
      local function train(wrap)
        ms.manual_seed(5)
        local model = wrap and ms.device("meta", function() return SharedNet() end) or SharedNet()
        ms.manual_seed(6)
        local x, y = ms.randn(4, 3), ms.randn(4, 2)
        if wrap then
          fsdp.FSDP(model, {auto_wrap_policy = wrap == "module" and fsdp.wrap_policy({Scaled}) or nil})
          local per_rank = 4 / size
          x, y = x:narrow(0, rank * per_rank, per_rank), y:narrow(0, rank * per_rank, per_rank)
        end
        local opt = ms.optim.SGD(model:parameters(), {lr = 0.1})
        local losses = {}
        for step = 1, 3 do
          opt:zero_grad()
          local loss = nn.F.mse_loss(model(x), y)
          loss:backward()
          opt:step()
          local global = loss:detach():clone()
          if wrap then dist.all_reduce(global, "avg") end
          losses[step] = global:item()
        end
        return {losses = losses, a = flat_of(model.a.s), b = flat_of(model.b.s)}
      end
      return {plain = train(nil), root = train("root"), module = train("module")}
    end)
    for rank, r in ipairs(results) do
      for _, wrap in ipairs({"root", "module"}) do
        local label = ("rank %d, %s"):format(rank - 1, wrap)
        local run = r[wrap]
        assert.same(r.plain.a, run.a, label)
        assert.same(r.plain.b, run.b, label)
        for step, loss in ipairs(r.plain.losses) do
          assert.is_true(math.abs(run.losses[step] - loss) <= 1e-12 * math.abs(loss),
                         ("%s step %d: loss %.17g vs %.17g"):format(label, step, run.losses[step], loss))
        end
      end
    end
  end)
end)
