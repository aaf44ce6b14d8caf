-- FSDP training cases a review found wrong, each against an independent computation (the
-- unwrapped model without checkpointing) and, where the contract says so, bitwise against
-- the same FSDP model without checkpointing.
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn, ac, dist, fsdp, optim = ms.nn, ms.ac, ms.dist, ms.fsdp, ms.optim

local DIM, HIDDEN, BATCH, STEPS = 4, 6, 6, 2

before_each(global_state.save)
after_each(global_state.restore)

local function flat(t) return (ms.is_dtensor(t) and t:full_tensor() or t):reshape(-1):table() end

local function max_diff(a, b)
  assert.equal(#a, #b)
  local worst = 0
  for i = 1, #a do
    local d = math.abs(a[i] - b[i])
    if d ~= d then return math.huge end
    if d > worst then worst = d end
  end
  return worst
end

local function same_bits(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

-- ---- reentrant checkpointing with a parameter used more than once ----

local Block = nn.Module:extend("ReviewBlock")
function Block:__init()
  self.fc1 = nn.Linear(DIM, HIDDEN)
  self.fc2 = nn.Linear(HIDDEN, DIM)
end
function Block:forward(x) return x + self.fc2(nn.F.gelu(self.fc1(x))) end

-- Block a runs twice: a(b(a(x))).
local Twice = nn.Module:extend("ReviewTwice")
function Twice:__init()
  self.a = Block()
  self.b = Block()
  self.head = nn.Linear(DIM, 1)
end
function Twice:forward(x) return self.head(self.a(self.b(self.a(x)))) end

-- GPT-style tie: the head's weight is the embedding's.
local VOCAB = 10
local Tied = nn.Module:extend("ReviewTied")
function Tied:__init()
  self.embed = nn.Embedding(VOCAB, DIM)
  self.mix = nn.Linear(DIM, DIM)
  self.head = nn.Linear(DIM, VOCAB, {bias = false})
  self.head.weight = self.embed.weight
end
function Tied:forward(t) return self.head(nn.F.gelu(self.mix(self.embed(t)))) end

-- The inputs require grad: a reentrant region whose inputs do not gives its parameters no
-- gradient (as PyTorch's).
local function twice_batch(step)
  ms.manual_seed(100 + step)
  return ms.randn(BATCH, DIM)
end

local function rows(x, rank, size)
  local per = BATCH / size
  local mine = x:narrow(0, rank * per, per):clone()
  mine.requires_grad = true
  return mine
end

local function tied_batch(step)
  local tokens, targets = {}, {}
  for i = 1, BATCH do
    tokens[i] = {(i * 3 + step) % VOCAB, (i * 7 + 2 * step) % VOCAB}
    targets[i] = {(i * 5 + step) % VOCAB, (i + 3 * step) % VOCAB}
  end
  return ms.tensor(tokens, {dtype = "i64"}), ms.tensor(targets, {dtype = "i64"})
end

local cases = {
  twice = {
    build = Twice,
    wrap_regions = function(m, impl)
      ac.checkpoint_wrapper(m.a, {checkpoint_impl = impl})
      ac.checkpoint_wrapper(m.b, {checkpoint_impl = impl})
    end,
    policy = function() return fsdp.wrap_policy({Block}) end,
    loss = function(m, step, rank, size)
      local out = m(rows(twice_batch(step), rank, size))
      return (out * out):mean()
    end,
  },
  tied = {
    build = Tied,
    wrap_regions = function(m, impl) ac.checkpoint_wrapper(m.head, {checkpoint_impl = impl}) end,
    policy = function() return nil end,
    loss = function(m, step, rank, size)
      local per = BATCH / size
      local tokens, targets = tied_batch(step)
      local logits = m(tokens:narrow(0, rank * per, per))
      return nn.F.cross_entropy(logits:view(-1, VOCAB), targets:narrow(0, rank * per, per):reshape(-1))
    end,
  },
}

-- Train STEPS SGD steps on this rank's rows; config: {case, impl (nil: no checkpointing),
-- strategy (nil: no FSDP), unit_per_block}. Returns each step's gradients and the final
-- parameters, whole, by name.
local function train(rank, size, config)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local case = cases[config.case]
  local model = case.build()
  if config.impl then case.wrap_regions(model, config.impl) end
  if config.strategy then
    fsdp.FSDP(model, {sharding_strategy = config.strategy,
                      auto_wrap_policy = config.unit_per_block and case.policy() or nil})
  end
  local opt = optim.SGD(model:parameters(), {lr = 0.1})
  local grads = {}
  for step = 1, STEPS do
    opt:zero_grad()
    case.loss(model, step, rank, size):backward()
    for name, p in model:named_parameters() do grads[step .. ":" .. name] = flat(p.grad) end
    opt:step()
  end
  local params = {}
  for name, p in model:named_parameters() do params[name] = flat(p) end
  return {grads = grads, params = params}
end

local function compare(expected, got, label, check)
  for _, key in ipairs({"grads", "params"}) do
    local count = 0
    for name, values in pairs(expected[key]) do
      count = count + 1
      assert.is_not_nil(got[key][name], label .. ": missing " .. name)
      check(values, got[key][name], ("%s: %s %s"):format(label, key, name))
    end
    for name in pairs(got[key]) do assert.is_not_nil(expected[key][name], label .. ": extra " .. name) end
    assert.is_true(count > 0)
  end
end

describe("reentrant checkpointing with FSDP when a parameter is used more than once", function()
  local reference = {}
  setup(function()
    for name in pairs(cases) do reference[name] = train(0, 1, {case = name}) end
    global_state.restore()
  end)

  local configs = {}
  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
    configs[#configs + 1] = {case = "twice", strategy = strategy, unit_per_block = true}
    configs[#configs + 1] = {case = "twice", strategy = strategy, unit_per_block = false}
  end
  configs[#configs + 1] = {case = "tied", strategy = "FULL_SHARD"}
  configs[#configs + 1] = {case = "tied", strategy = "NO_SHARD"}

  for _, config in ipairs(configs) do
    local label = ("%s, %s, %s"):format(config.case, config.strategy,
                                        config.unit_per_block and "a unit per block" or "one root unit")
    it(label .. ": trains as the unwrapped model and bitwise as FSDP without checkpointing", function()
      local results = dist.spawn(2, function(rank, size)
        local plain = train(rank, size, {case = config.case, strategy = config.strategy,
                                         unit_per_block = config.unit_per_block})
        local checkpointed = train(rank, size, {case = config.case, strategy = config.strategy,
                                                unit_per_block = config.unit_per_block, impl = "reentrant"})
        return {plain = plain, checkpointed = checkpointed}
      end)
      for rank, r in ipairs(results) do
        local tag = ("rank %d"):format(rank - 1)
        compare(reference[config.case], r.checkpointed, tag .. " vs unwrapped", function(want, got, what)
          assert.is_true(max_diff(want, got) < 1e-12, what .. (" differs by %g"):format(max_diff(want, got)))
        end)
        compare(r.plain, r.checkpointed, tag .. " vs FSDP without checkpointing", function(want, got, what)
          assert.is_true(same_bits(want, got), what .. " is not bitwise equal")
        end)
      end
    end)
  end

  it("nested: a reentrant checkpoint around the FSDP model whose reentrant blocks run twice", function()
    local results = dist.spawn(2, function(rank, size)
      ms.set_default_dtype("f64")
      local function run(impl)
        ms.manual_seed(0)
        local model = Twice()
        if impl then cases.twice.wrap_regions(model, impl) end
        fsdp.FSDP(model, {sharding_strategy = "FULL_SHARD", auto_wrap_policy = fsdp.wrap_policy({Block})})
        local x = rows(twice_batch(1), rank, size)
        local out = impl and ac.checkpoint(model, x, {use_reentrant = true}) or model(x)
        ;(out * out):mean():backward()
        local grads = {}
        for name, p in model:named_parameters() do grads[name] = flat(p.grad) end
        grads.x = flat(x.grad)
        return grads
      end
      return {plain = run(nil), checkpointed = run("reentrant")}
    end)
    for _, r in ipairs(results) do
      for name, values in pairs(r.plain) do
        assert.is_true(same_bits(values, r.checkpointed[name]), name .. " is not bitwise equal")
      end
    end
  end)
end)

-- ---- clip_grad_norm_ over units with different shard groups ----

local Clip = nn.Module:extend("ReviewClip")
function Clip:__init()
  self.a = nn.Linear(DIM, HIDDEN)
  self.b = nn.Linear(HIDDEN, 3)
  self.c = nn.Linear(3, 2)
end
function Clip:forward(x) return self.c(nn.F.gelu(self.b(nn.F.gelu(self.a(x))))) end

local CLIP_ROWS = 8

local function clip_batch()
  ms.manual_seed(7)
  return ms.randn(CLIP_ROWS, DIM)
end

-- The unwrapped model's gradients over the whole batch and its norm before clipping.
local function clip_reference(max_norm, norm_type)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local model = Clip()
  local out = model(clip_batch())
  ;(out * out):mean():backward()
  local norm = nn.utils.clip_grad_norm_(model:parameters(), max_norm, norm_type)
  local grads = {}
  for name, p in model:named_parameters() do grads[name] = flat(p.grad) end
  return norm, grads
end

-- FSDP units: a and b with child options, the root (holding c) with root options; the
-- options may name a mesh shape for the hybrid strategies.
local function options(spec)
  local opts = {sharding_strategy = spec.strategy}
  if spec.mesh then opts.device_mesh = dist.init_device_mesh(spec.mesh, {mesh_dim_names = {"replicate", "shard"}}) end
  return opts
end

local clip_configs = {
  {world = 2, root = {strategy = "NO_SHARD"}, child = {strategy = "FULL_SHARD"}},
  {world = 4, root = {strategy = "HYBRID_SHARD", mesh = {2, 2}}, child = {strategy = "FULL_SHARD"}},
  {world = 4, root = {strategy = "FULL_SHARD"}, child = {strategy = "HYBRID_SHARD", mesh = {2, 2}}},
}

describe("fsdp.clip_grad_norm_ when units shard over different groups", function()
  for _, config in ipairs(clip_configs) do
    local label = ("root %s, children %s, %d ranks"):format(config.root.strategy, config.child.strategy, config.world)
    it(label .. ": every rank gets the global norm and clips by it (norm_type 2 and inf)", function()
      local max_norm = 0.05
      for _, norm_type in ipairs({2, math.huge}) do
        local expected_norm, expected_grads = clip_reference(max_norm, norm_type)
        global_state.restore()
        assert.is_true(expected_norm > max_norm) -- so clipping scales
        local results = dist.spawn(config.world, function(rank, size)
          ms.set_default_dtype("f64")
          ms.manual_seed(0)
          local model = Clip()
          fsdp.FSDP(model.a, options(config.child))
          fsdp.FSDP(model.b, options(config.child))
          fsdp.FSDP(model, options(config.root))
          local per = CLIP_ROWS / size
          local out = model(clip_batch():narrow(0, rank * per, per))
          ;(out * out):mean():backward()
          local norm = fsdp.clip_grad_norm_(model, max_norm, norm_type)
          local grads = {}
          for name, p in model:named_parameters() do grads[name] = flat(p.grad) end
          return {norm = norm, grads = grads}
        end)
        for rank, r in ipairs(results) do
          local tag = ("rank %d, norm_type %s"):format(rank - 1, tostring(norm_type))
          assert.is_true(math.abs(r.norm - expected_norm) <= 1e-12 * expected_norm,
                         ("%s: norm %.17g, expected %.17g"):format(tag, r.norm, expected_norm))
          for name, values in pairs(expected_grads) do
            assert.is_true(max_diff(values, r.grads[name]) < 1e-12, ("%s: clipped %s"):format(tag, name))
          end
        end
      end
    end)
  end
end)

-- ---- zero_grad after no_sync ----

-- Gradients of nn.Linear(DIM, 3) under FSDP on 2 ranks after no_sync(backward of batch A),
-- then clear(model, opt), then a synchronised backward of batch B.
local function after_no_sync_and_clear(strategy, clear)
  local results = dist.spawn(2, function(rank, size)
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    local model = fsdp.FSDP(nn.Linear(DIM, 3), {sharding_strategy = strategy})
    local opt = optim.SGD(model:parameters(), {lr = 0.1})
    ms.manual_seed(20 + rank)
    local a, b = ms.randn(2, DIM), ms.randn(2, DIM)
    model:no_sync(function() model(a):sum():backward() end)
    clear(model, opt)
    local out = model(b)
    ;(out * out):sum():backward()
    local grads = {}
    for name, p in model:named_parameters() do grads[name] = flat(p.grad) end
    return {grads = grads, b = flat(b)}
  end)
  return results
end

-- The unwrapped model's gradients of the ranks' B batches (FSDP averages the ranks').
local function batch_b_reference(results)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  local model = nn.Linear(DIM, 3)
  for _, r in ipairs(results) do
    local b = ms.tensor(r.b):view(2, DIM)
    local out = model(b)
    ;((out * out):sum() * (1 / #results)):backward()
  end
  local grads = {}
  for name, p in model:named_parameters() do grads[name] = flat(p.grad) end
  return grads
end

describe("zero_grad after no_sync", function()
  local clears = {
    {"the optimizer's zero_grad()", function(_, opt) opt:zero_grad() end},
    {"the optimizer's zero_grad(false)", function(_, opt) opt:zero_grad(false) end},
    {"the module's zero_grad()", function(model) model:zero_grad() end},
    {"the module's zero_grad(false)", function(model) model:zero_grad(false) end},
  }
  for _, strategy in ipairs({"FULL_SHARD", "NO_SHARD"}) do
    for _, clear in ipairs(clears) do
      it(strategy .. ": " .. clear[1] .. " discards the gradients no_sync accumulated", function()
        local results = after_no_sync_and_clear(strategy, clear[2])
        local expected = batch_b_reference(results)
        global_state.restore()
        for rank, r in ipairs(results) do
          for name, values in pairs(expected) do
            assert.is_true(max_diff(values, r.grads[name]) < 1e-12,
                           ("rank %d: %s differs by %g"):format(rank - 1, name, max_diff(values, r.grads[name])))
          end
        end
      end)
    end
  end
end)

-- ---- sync_module_states with models built on the meta device ----

local Shifted = nn.Module:extend("ReviewShifted")
function Shifted:__init()
  self.fc = nn.Linear(DIM, HIDDEN)
  self:register_buffer("shift", ms.randn(HIDDEN))
end
function Shifted:reset_parameters() nn.init.normal_(self.shift) end
function Shifted:forward(x) return self.fc(x) + self.shift end

local Synced = nn.Module:extend("ReviewSynced")
function Synced:__init()
  self.a = Shifted()
  self.b = Shifted()
  self.head = nn.Linear(HIDDEN, 3)
end
function Synced:forward(x) return self.head(self.b.fc.weight:sum() * self.a(x)) end

-- Every parameter (whole) and buffer of model by name.
local function states(model)
  local out = {}
  for name, p in model:named_parameters() do out[name] = flat(p) end
  for name, b in model:named_buffers() do out["buffer:" .. name] = flat(b) end
  return out
end

describe("sync_module_states with models built on the meta device", function()
  local expected
  setup(function()
    ms.set_default_dtype("f64")
    ms.manual_seed(100)
    expected = states(Synced())
    global_state.restore()
  end)

  local builds = {
    {"every rank on the meta device", function() return true end},
    {"rank 0 real, the others on the meta device", function(rank) return rank ~= 0 end},
  }
  local layouts = {
    {strategy = "FULL_SHARD", world = 2},
    {strategy = "NO_SHARD", world = 2},
    {strategy = "HYBRID_SHARD", world = 4, mesh = {2, 2}},
  }
  for _, build in ipairs(builds) do
    for _, layout in ipairs(layouts) do
      it(("%s, %s on %d ranks: every rank ends with rank 0's values"):format(build[1], layout.strategy, layout.world), function()
        local results = dist.spawn(layout.world, function(rank)
          ms.set_default_dtype("f64")
          ms.manual_seed(100 + rank)
          local model = build[2](rank) and ms.device("meta", function() return Synced() end) or Synced()
          local opts = {sharding_strategy = layout.strategy, sync_module_states = true,
                        auto_wrap_policy = fsdp.wrap_policy({Shifted})}
          if layout.mesh then
            opts.device_mesh = dist.init_device_mesh(layout.mesh, {mesh_dim_names = {"replicate", "shard"}})
          end
          local before = ms.get_rng_state()
          fsdp.FSDP(model, opts)
          local after = ms.get_rng_state()
          return {states = states(model), rng_kept = before.seed == after.seed and before.offset == after.offset}
        end)
        for rank, r in ipairs(results) do
          assert.are.same(expected, r.states, "rank " .. (rank - 1))
          assert.is_true(r.rng_kept, "rank " .. (rank - 1) .. "'s random state changed")
        end
      end)
    end
  end

  it("refuses a model on the meta device on rank 0 and real on another rank, on every rank", function()
    local results = dist.spawn(2, function(rank)
      ms.set_default_dtype("f64")
      ms.manual_seed(100)
      local model = rank == 0 and ms.device("meta", function() return Synced() end) or Synced()
      local ok, err = pcall(fsdp.FSDP, model, {sync_module_states = true})
      return {ok = ok, err = tostring(err)}
    end)
    assert.is_false(results[1].ok)
    assert.is_false(results[2].ok)
    assert.matches("FSDP: sync_module_states: the ranks' models differ", results[1].err, 1, true)
    assert.matches("FSDP: sync_module_states: 'a.fc.weight' is on the meta device on the first rank and real here",
                   results[2].err, 1, true)
  end)
end)

-- ---- sync_module_states with a buffer shared by two modules ----

-- A Linear shifted by a buffer it is given (modules may share one), drawn by reset_parameters
-- as its construction drew it (ms.randn).
local ShiftedBy = nn.Module:extend("ReviewShiftedBy")
function ShiftedBy:__init(shift, dim)
  self.fc = nn.Linear(dim, HIDDEN)
  self:register_buffer("shift", shift)
end
function ShiftedBy:reset_parameters() nn.init.normal_(self.shift) end
function ShiftedBy:forward(x) return self.fc(x) + self.shift end

-- a and b hold one buffer under two names; mixed gives the root two parameters of different
-- dtypes, so wrapping the root fails after a and b were wrapped.
local SharedShift = nn.Module:extend("ReviewSharedShift")
function SharedShift:__init(mixed)
  local shift = ms.randn(HIDDEN)
  self.a = ShiftedBy(shift, DIM)
  self.b = ShiftedBy(shift, HIDDEN)
  if mixed then
    self.wide = nn.Parameter(ms.zeros(2, {dtype = "f64"}))
    self.narrow = nn.Parameter(ms.zeros(2, {dtype = "f32"}))
  end
end
function SharedShift:forward(x) return self.b(self.a(x)) end

describe("sync_module_states with a buffer shared by two modules", function()
  local expected
  setup(function()
    ms.set_default_dtype("f64")
    ms.manual_seed(100)
    local model = SharedShift()
    expected = {f64 = flat(model.a.shift), bf16 = flat(model.a.shift:to("bf16"):to("f64"))}
    global_state.restore()
  end)

  local builds = {
    {"every rank on the meta device", function() return true end},
    {"rank 0 real, the others on the meta device", function(rank) return rank ~= 0 end},
  }
  local layouts = {{strategy = "FULL_SHARD", world = 2}, {strategy = "HYBRID_SHARD", world = 4, mesh = {2, 2}}}
  for _, build in ipairs(builds) do
    for _, layout in ipairs(layouts) do
      it(("%s, %s on %d ranks: one tensor with rank 0's values, with and without buffer_dtype")
         :format(build[1], layout.strategy, layout.world), function()
        local results = dist.spawn(layout.world, function(rank)
          ms.set_default_dtype("f64")
          local out = {}
          for _, buffer_dtype in ipairs({"none", "bf16"}) do
            for _, wrap in ipairs({"root", "module"}) do
              ms.manual_seed(100 + rank)
              local model = build[2](rank) and ms.device("meta", function() return SharedShift() end) or SharedShift()
              local opts = {sharding_strategy = layout.strategy, sync_module_states = true}
              if wrap == "module" then opts.auto_wrap_policy = fsdp.wrap_policy({ShiftedBy}) end
              if buffer_dtype ~= "none" then opts.mixed_precision = {buffer_dtype = buffer_dtype} end
              if layout.mesh then
                opts.device_mesh = dist.init_device_mesh(layout.mesh, {mesh_dim_names = {"replicate", "shard"}})
              end
              fsdp.FSDP(model, opts)
              local r = {same = rawequal(model.a.shift, model.b.shift), dtype = model.b.shift:dtype(),
                         storage = model.a.shift:data_ptr() == model.b.shift:data_ptr(),
                         values = flat(model.b.shift:to("f64"))}
              ms.no_grad(function() model.a.shift:fill_(2) end)
              r.after = flat(model.b.shift:to("f64"))
              out[buffer_dtype .. " " .. wrap] = r
            end
          end
          return out
        end)
        for rank, res in ipairs(results) do
          for label, r in pairs(res) do
            local buffer_dtype = label:match("^%S+")
            label = ("rank %d, buffer_dtype %s"):format(rank - 1, label)
            assert.is_true(r.same, label)
            assert.is_true(r.storage, label)
            assert.equal(buffer_dtype == "none" and "f64" or buffer_dtype, r.dtype, label)
            assert.same(expected[buffer_dtype == "none" and "f64" or buffer_dtype], r.values, label)
            assert.same({2, 2, 2, 2, 2, 2}, r.after, label)
          end
        end
      end)
    end
  end

  it("a failed wrap puts the meta tensor back under both names on the ranks that gave it storage", function()
    local results = dist.spawn(2, function(rank)
      ms.set_default_dtype("f64")
      ms.manual_seed(100)
      local out = {}
      for _, buffer_dtype in ipairs({"none", "bf16"}) do
        local model = rank == 0 and SharedShift(true) or ms.device("meta", function() return SharedShift(true) end)
        local original = model.a.shift
        collectgarbage(); collectgarbage()
        local before = ms.memory_stats("cpu").allocated
        local opts = {sync_module_states = true, auto_wrap_policy = fsdp.wrap_policy({ShiftedBy})}
        if buffer_dtype ~= "none" then opts.mixed_precision = {buffer_dtype = buffer_dtype} end
        local ok, err = pcall(fsdp.FSDP, model, opts)
        collectgarbage(); collectgarbage()
        out[buffer_dtype] = {ok = ok, err = tostring(err), leaked = ms.memory_stats("cpu").allocated - before,
                             a = rawequal(model.a.shift, original), b = rawequal(model.b.shift, original),
                             device = model.b.shift:device(), sharded = ms.is_dtensor(model.b.fc.weight)}
      end
      return out
    end)
    for rank, res in ipairs(results) do
      for buffer_dtype, r in pairs(res) do
        local label = ("rank %d, buffer_dtype %s"):format(rank - 1, buffer_dtype)
        assert.is_false(r.ok, label)
        assert.matches("FSDP: parameters of one unit must share a dtype", r.err, 1, true)
        -- nothing made by the wrap stays allocated (a forked rank may also free what the
        -- parent left for the collector meanwhile, so the count can fall below the baseline)
        assert.is_true(r.leaked <= 0, label .. ": " .. r.leaked .. " bytes left allocated")
        assert.is_true(r.a, label)
        assert.is_true(r.b, label)
        assert.equal(rank == 1 and "cpu" or "meta", r.device, label)
        assert.is_false(r.sharded, label)
      end
    end
  end)
end)

-- ---- options and arguments ----

-- The message of the error fn raises, or nil.
local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then return nil end
  return tostring(err)
end

local function expect_error(expected, fn, ...)
  local err = error_of(fn, ...)
  assert.is_not_nil(err, "no error; expected " .. expected)
  assert.is_truthy(err:find(expected, 1, true), ("expected %q in %q"):format(expected, err))
end

local Pair = nn.Module:extend("ReviewPair")
function Pair:__init()
  self.fc1 = nn.Linear(DIM, HIDDEN)
  self.fc2 = nn.Linear(HIDDEN, 3)
end
function Pair:forward(x) return self.fc2(nn.F.relu(self.fc1(x))) end

describe("activation checkpointing options", function()
  it("checkpoint_wrapper names an unknown or misspelt option, a non-boolean flag and options that are not a table", function()
    expect_error("checkpoint_wrapper: unknown option 'use_reentrant' (expected checkpoint_impl, preserve_rng_state, " ..
                 "policy); checkpoint_impl = 'reentrant' or 'no_reentrant' chooses the implementation",
                 ac.checkpoint_wrapper, Pair(), {use_reentrant = true})
    expect_error("checkpoint_wrapper: unknown option 'polcy'", ac.checkpoint_wrapper, Pair(),
                 {polcy = function() return "save" end})
    expect_error("checkpoint_wrapper: preserve_rng_state must be true or false, got 'no'", ac.checkpoint_wrapper,
                 Pair(), {preserve_rng_state = "no"})
    expect_error("checkpoint_wrapper: options must be a table, got number", ac.checkpoint_wrapper, Pair(), 5)
  end)

  it("apply_activation_checkpointing names an unknown option and takes auto_wrap_policy before check_fn", function()
    expect_error("apply_activation_checkpointing: unknown option 'checkfn' (expected check_fn, " ..
                 "checkpoint_wrapper_fn, auto_wrap_policy)", ac.apply_activation_checkpointing, Pair(),
                 {checkfn = function() return false end})
    expect_error("apply_activation_checkpointing: auto_wrap_policy must be a function, got table",
                 ac.apply_activation_checkpointing, Pair(), {auto_wrap_policy = {nn.Linear}})
    local model = Pair()
    ac.apply_activation_checkpointing(model, {auto_wrap_policy = function(m) return m == model.fc2 end,
                                              check_fn = function() return true end})
    assert.is_nil(ac.wrapper_of(model.fc1))
    assert.are.equal("checkpoint_wrapper", ac.wrapper_of(model.fc2))
  end)

  it("ac.checkpoint refuses a last table whose only key is a misspelt option, and non-boolean flags", function()
    local x = ms.ones(2, {requires_grad = true})
    local seen
    expect_error("checkpoint: unknown option 'use_reentrnt' (did you mean use_reentrant?",
                 ac.checkpoint, function(a, b) seen = b; return a * 2 end, x, {use_reentrnt = true})
    assert.is_nil(seen)
    expect_error("checkpoint: use_reentrant must be true or false, got 'yes'",
                 ac.checkpoint, function(a) return a * 2 end, x, {use_reentrant = "yes"})
    -- a table of tensors is still an argument
    local out = ac.checkpoint(function(t) return t.x * 2 end, {x = x})
    assert.are.same({2, 2}, out:table())
  end)

  it("a reentrant region returning two tensors is refused instead of losing the second", function()
    local x = ms.randn(3, DIM, {requires_grad = true})
    local lin = nn.Linear(DIM, DIM)
    for _, grad_on in ipairs({true, false}) do
      expect_error("checkpoint: with use_reentrant the function must return one tensor, got 2 results", function()
        ms.set_grad_enabled(grad_on)
        return ac.checkpoint(function(z) return lin(z), z * 2 end, x, {use_reentrant = true})
      end)
    end
  end)
end)

describe("FSDP options and arguments", function()
  it("refuse bad values with errors naming the option or argument", function()
    local results = dist.spawn(2, function()
      local errors = {}
      local function note(fn, ...) errors[#errors + 1] = error_of(fn, ...) or "no error" end
      note(fsdp.FSDP, Pair(), {cpu_offload = {offload_params = "yes"}})
      note(fsdp.FSDP, Pair(), {device_mesh = "x"})
      note(fsdp.FSDP, Pair(), {device_mesh = {2}})
      note(fsdp.wrap_policy, nn.Linear)
      note(fsdp.wrap_policy, {"Linear"})
      local model = fsdp.FSDP(Pair(), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
      note(fsdp.summon_full_params, model)
      note(fsdp.summon_full_params, model, function() end, {with_grads = true})
      note(fsdp.summon_full_params, model, function() end, {rank0_ony = true})
      note(fsdp.summon_full_params, model, function() end, {writeback = "no"})
      note(fsdp.summon_full_params, model, function() end, {rank0_only = true})
      note(fsdp.summon_full_params, model, function() end, {offload_to_cpu = true})
      note(fsdp.optim_state_dict, model, nil)
      note(fsdp.optim_state_dict_to_load, model, nil, {})
      return errors
    end)
    local expected = {
      "FSDP: cpu_offload.offload_params must be true or false, got yes",
      "FSDP: device_mesh must be a DeviceMesh from dist.init_device_mesh, got 'x'",
      "FSDP: device_mesh must be a DeviceMesh from dist.init_device_mesh, got table",
      "wrap_policy: expected an array of module classes, got the class Linear (pass an array: {Linear})",
      "wrap_policy: element 1 is not a module class (nn.Linear, a class from nn.Module:extend), got 'Linear'",
      "summon_full_params: expected a function to run, got nil",
      "summon_full_params: with_grads = true is not supported",
      "summon_full_params: unknown option 'rank0_ony' (expected writeback, rank0_only, recurse, offload_to_cpu, with_grads)",
      "summon_full_params: writeback must be true or false, got no",
      "summon_full_params: rank0_only = true needs writeback = false",
      "summon_full_params: offload_to_cpu = true is not supported",
      "optim_state_dict: expected an optimizer (from ms.optim) as the second argument, got nil",
      "optim_state_dict_to_load: expected an optimizer (from ms.optim) as the second argument, got nil",
    }
    for _, errors in ipairs(results) do
      assert.are.equal(#expected, #errors)
      for i, want in ipairs(expected) do
        assert.is_truthy(errors[i]:find(want, 1, true), ("expected %q in %q"):format(want, errors[i]))
      end
    end
  end)

  it("summon_full_params with rank0_only shows the full parameters on the first rank only; recurse = false the root's only", function()
    local results = dist.spawn(2, function()
      ms.set_default_dtype("f64")
      ms.manual_seed(0)
      local model = fsdp.FSDP(Pair(), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
      local seen = {}
      fsdp.summon_full_params(model, function()
        seen.rank0_only = {ms.is_tensor(model.fc1.weight), model.fc1.weight:shape()[1]}
      end, {rank0_only = true, writeback = false})
      fsdp.summon_full_params(model, function()
        seen.recurse = ms.is_dtensor(model.fc1.weight)
      end, {recurse = false})
      seen.after = ms.is_dtensor(model.fc1.weight)
      return seen
    end)
    assert.are.same({true, HIDDEN}, results[1].rank0_only)
    assert.is_false(results[2].rank0_only[1])
    for _, r in ipairs(results) do
      assert.is_true(r.recurse)
      assert.is_true(r.after)
    end
  end)
end)
