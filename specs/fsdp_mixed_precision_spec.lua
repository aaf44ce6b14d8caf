-- FSDP mixed precision: f32 masters computed on in param_dtype. The mechanics are proved
-- with param_dtype f64 (bitwise against an unsharded f64 computation rounded to f32 where
-- FSDP rounds), the 16-bit all-gathers and reductions by their bytes and exact values, and
-- 16-bit training end to end where the runtime computes in bf16 / f16.
local ms = require "moonshard"
local parity = require "support.parity"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp, ac = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.ac

local STEPS = 3

local function flat(t) return t:reshape(-1):table() end

local function loss_of(model, tokens, targets)
  return nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
end

-- The unsharded computation FSDP's mixed precision stands for: f32 masters stepped by Adam
-- in f32; each step copies them into an f64 model and computes the loss and gradients
-- there. reduce = "f64": the global batch's gradient rounded to f32 once; "f32": each
-- rank's gradient rounded to f32, then averaged in f32 (summed in rank order, divided).
-- micro: micro-batches per step whose f64 gradients add up before the rounding.
local function reference(config)
  local world, reduce, micro = config.world, config.reduce or "f64", config.micro or 1
  ms.set_default_dtype("f32")
  ms.manual_seed(0)
  local master = parity.Model(config.hidden)
  ms.set_default_dtype("f64")
  local compute = parity.Model(config.hidden)
  ms.set_default_dtype("f32")
  local opt = optim.Adam(master:parameters(), {lr = 0.01})
  local masters, computes = {}, {}
  for name, p in master:named_parameters() do masters[name] = p end
  for name, p in compute:named_parameters() do computes[name] = p end
  local losses, norms = {}, {}
  for step = 1, STEPS do
    opt:zero_grad()
    compute:zero_grad()
    ms.no_grad(function() for name, p in pairs(computes) do p:copy_(masters[name]) end end)
    local rank_grads = {}
    local loss_sum = 0
    local per_rank = parity.GLOBAL_BATCH / world
    for r = 0, (reduce == "f32" and world or 1) - 1 do
      for m = 1, micro do
        local tokens, targets = parity.batch(step * 10 + m)
        if reduce == "f32" then
          tokens, targets = tokens:narrow(0, r * per_rank, per_rank), targets:narrow(0, r * per_rank, per_rank)
        end
        local loss = loss_of(compute, tokens, targets)
        loss:backward()
        loss_sum = loss_sum + loss:item()
      end
      local grads = {}
      for name, p in pairs(computes) do grads[name] = p.grad:to("f32") end
      rank_grads[r + 1] = grads
      compute:zero_grad()
    end
    losses[step] = loss_sum / #rank_grads / micro
    for name, p in pairs(masters) do
      local g = rank_grads[1][name]
      if #rank_grads > 1 then
        for r = 2, #rank_grads do g = g + rank_grads[r][name] end
        g = g / #rank_grads
      end
      p.grad = g
    end
    if config.clip then norms[step] = nn.utils.clip_grad_norm_(master:parameters(), config.clip) end
    if step < STEPS then opt:step() end
  end
  local params, grads = {}, {}
  for name, p in pairs(masters) do params[name], grads[name] = flat(p), flat(p.grad) end
  return {losses = losses, params = params, grads = grads, norms = norms}
end

-- The same training sharded on world ranks with mixed_precision = policy. config: strategy,
-- wrap ("root" | "layer" | "nested"), offload, mesh_shape, micro (the first micro - 1
-- micro-batches under no_sync), clip, checkpoint (activation checkpointing of the blocks).
local function sharded(config, policy)
  return dist.spawn(config.world, function(rank, size)
    ms.manual_seed(0)
    local model = parity.Model(config.hidden)
    local opts = {sharding_strategy = config.strategy, cpu_offload = {offload_params = config.offload or false},
                  mixed_precision = policy}
    if config.mesh_shape then
      opts.device_mesh = dist.init_device_mesh(config.mesh_shape, {mesh_dim_names = {"replicate", "shard"}})
    end
    local seen = {}
    for _, block in model.blocks:ipairs() do
      block.fc1:register_forward_hook(function(m) seen[m.weight:dtype()] = true end)
      if config.checkpoint then ac.checkpoint_wrapper(block) end
    end
    if config.wrap == "layer" then
      opts.auto_wrap_policy = fsdp.wrap_policy({parity.Block})
    elseif config.wrap == "nested" then
      for _, block in model.blocks:ipairs() do
        local inner = {sharding_strategy = config.strategy, device_mesh = opts.device_mesh,
                       cpu_offload = opts.cpu_offload, mixed_precision = policy}
        fsdp.FSDP(block.fc1, inner)
        fsdp.FSDP(block, inner)
      end
    end
    model = fsdp.FSDP(model, opts)
    local opt = optim.Adam(model:parameters(), {lr = 0.01})
    local per_rank = parity.GLOBAL_BATCH / size
    local losses, norms = {}, {}
    local recomputed = ac.stats().recomputed
    for step = 1, STEPS do
      opt:zero_grad()
      local micro = config.micro or 1
      local total = 0
      for m = 1, micro do
        local tokens, targets = parity.batch(step * 10 + m)
        local function run()
          local loss = loss_of(model, tokens:narrow(0, rank * per_rank, per_rank),
                               targets:narrow(0, rank * per_rank, per_rank))
          loss:backward()
          local global = loss:detach():clone()
          dist.all_reduce(global, "avg")
          total = total + global:item()
        end
        if m < micro then model:no_sync(run) else run() end
      end
      losses[step] = total / micro
      if config.clip then norms[step] = fsdp.clip_grad_norm_(model, config.clip) end
      if step < STEPS then opt:step() end
    end
    local params, grads, dtypes = {}, {}, {}
    for name, p in model:named_parameters() do
      params[name], grads[name] = flat(p:full_tensor()), flat(p.grad:full_tensor())
      dtypes[#dtypes + 1] = p:to_local():dtype() .. "/" .. p.grad:to_local():dtype()
      for _, value in pairs(opt.state[p] or {}) do
        if ms.is_dtensor(value) or type(value) == "table" and value.dtype then dtypes[#dtypes + 1] = value:dtype() end
      end
    end
    return {losses = losses, params = params, grads = grads, norms = norms, seen = seen, dtypes = dtypes,
            recomputed = ac.stats().recomputed - recomputed}
  end)
end

-- Bitwise equal parameters and gradients (f32 values); losses and norms within rtol.
local function expect_same(runs, ref, rtol)
  for rank, run in ipairs(runs) do
    for step, loss in ipairs(ref.losses) do
      assert.is_true(math.abs(run.losses[step] - loss) <= rtol * math.abs(loss),
                     ("rank %d step %d: loss %.17g vs %.17g"):format(rank - 1, step, run.losses[step], loss))
    end
    for step, norm in ipairs(ref.norms) do
      assert.is_true(math.abs(run.norms[step] - norm) <= 1e-6 * norm,
                     ("rank %d step %d: norm %.17g vs %.17g"):format(rank - 1, step, run.norms[step], norm))
    end
    for name, values in pairs(ref.params) do
      assert.same(values, run.params[name], ("rank %d parameter %s"):format(rank - 1, name))
      assert.same(ref.grads[name], run.grads[name], ("rank %d gradient %s"):format(rank - 1, name))
    end
    assert.same({f64 = true}, run.seen)
    for _, d in ipairs(run.dtypes) do assert.is_truthy(d == "f32/f32" or d == "f32", d) end
  end
end

local F64 = {param_dtype = "f64"}

before_each(global_state.save)
after_each(global_state.restore)

describe("FSDP mixed precision (param_dtype f64 over f32 masters)", function()
  local refs = {}
  local function ref(config)
    local key = ("%d/%s/%d/%s/%s"):format(config.world, config.reduce or "f64", config.micro or 1, tostring(config.clip),
                                        tostring(config.hidden))
    refs[key] = refs[key] or reference(config)
    return refs[key]
  end

  for _, strategy in ipairs({"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"}) do
    for _, world in ipairs({1, 2, 3}) do
      for _, wrap in ipairs({"root", "layer", "nested"}) do
        for _, offload in ipairs({false, true}) do
          it(("%s on %d ranks, %s wrapping, offload %s: bitwise the rounded f64 computation"):format(
               strategy, world, wrap, tostring(offload)), function()
            local config = {world = world, strategy = strategy, wrap = wrap, offload = offload}
            expect_same(sharded(config, F64), ref(config), 1e-13)
          end)
        end
      end
    end
  end

  for _, strategy in ipairs({"HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"}) do
    for _, mesh_shape in ipairs({{2, 2}, {1, 2}, {2, 1}}) do
      it(("%s on a %dx%d mesh, layer wrapping, offload on and off"):format(strategy, mesh_shape[1], mesh_shape[2]),
         function()
        for _, offload in ipairs({false, true}) do
          local config = {world = mesh_shape[1] * mesh_shape[2], strategy = strategy, wrap = "layer",
                          mesh_shape = mesh_shape, offload = offload}
          expect_same(sharded(config, F64), ref(config), 1e-13)
        end
      end)
    end
  end

  it("reduce_dtype f32: each rank's f64 gradient rounds to f32 before the average (2 ranks, bitwise)", function()
    local config = {world = 2, strategy = "FULL_SHARD", wrap = "layer", reduce = "f32"}
    local runs = sharded(config, {param_dtype = "f64", reduce_dtype = "f32"})
    expect_same(runs, ref(config), 1e-13)
    -- and it differs from reducing in f64, so the test sees the reduce dtype
    local f64 = ref({world = 2})
    local differs = false
    for name, values in pairs(f64.grads) do
      for i, v in ipairs(values) do if v ~= runs[1].grads[name][i] then differs = true end end
    end
    assert.is_true(differs)
  end)

  it("reduce_dtype f32 on 4 ranks and NO_SHARD's all-reduce", function()
    local config = {world = 4, strategy = "FULL_SHARD", wrap = "nested", reduce = "f32"}
    local runs = sharded(config, {param_dtype = "f64", reduce_dtype = "f32"})
    local r = ref(config)
    -- four f32 gradients sum in the backend's order (mpi's differs from rank order): within
    -- a few f32 roundings of the tensor's scale
    for _, run in ipairs(runs) do
      for name, values in pairs(r.grads) do
        local scale, worst = 0, 0
        for i, v in ipairs(values) do
          scale, worst = math.max(scale, math.abs(v)), math.max(worst, math.abs(run.grads[name][i] - v))
        end
        assert.is_true(worst <= 8 * 2 ^ -24 * scale, ("%s: %.3g of %.3g"):format(name, worst, scale))
      end
    end
    config = {world = 2, strategy = "NO_SHARD", wrap = "layer", reduce = "f32"}
    expect_same(sharded(config, {param_dtype = "f64", reduce_dtype = "f32"}), ref(config), 1e-13)
  end)

  it("direct parameters (wide blocks, see fsdp_direct_spec) gather in param_dtype and reduce in reduce_dtype",
     function()
    for _, strategy in ipairs({"FULL_SHARD", "NO_SHARD"}) do
      local config = {world = 2, strategy = strategy, wrap = "layer", reduce = "f32", hidden = 43692}
      expect_same(sharded(config, {param_dtype = "f64", reduce_dtype = "f32"}), ref(config), 1e-13)
    end
  end)

  it("no_sync accumulates the unsharded gradients in param_dtype", function()
    for _, strategy in ipairs({"FULL_SHARD", "NO_SHARD"}) do
      local config = {world = 2, strategy = strategy, wrap = "layer", micro = 3}
      expect_same(sharded(config, F64), ref(config), 1e-13)
    end
  end)

  it("clip_grad_norm_ clips the f32 gradients the reduction left on the shards", function()
    local config = {world = 3, strategy = "FULL_SHARD", wrap = "layer", clip = 0.05}
    local runs = sharded(config, F64)
    local r = ref(config)
    for _, run in ipairs(runs) do
      for step, norm in ipairs(r.norms) do
        assert.is_true(norm > 0.05) -- clipping did something
        assert.is_true(math.abs(run.norms[step] - norm) <= 1e-6 * norm)
      end
      for name, values in pairs(r.params) do
        assert.is_true(parity.max_relative_error(run.params[name], values) < 1e-5, name)
      end
    end
  end)

  it("activation checkpointing recomputes in param_dtype", function()
    for _, wrap in ipairs({"root", "layer"}) do
      local config = {world = 2, strategy = "FULL_SHARD", wrap = wrap, checkpoint = true}
      local runs = sharded(config, F64)
      expect_same(runs, ref(config), 1e-13)
      for _, run in ipairs(runs) do assert.is_true(run.recomputed >= 2 * STEPS) end
    end
  end)

  it("without a policy the same run is a different (f32) computation", function()
    local config = {world = 2, strategy = "FULL_SHARD", wrap = "layer"}
    local runs = sharded(config, nil)
    local r = ref(config)
    local differs = false
    for name, values in pairs(r.params) do
      for i, v in ipairs(values) do if v ~= runs[1].params[name][i] then differs = true end end
    end
    assert.is_true(differs)
    assert.same({f32 = true}, runs[1].seen)
  end)
end)

-- A module that records the dtypes it sees and computes nothing in them: the output is
-- its weight converted to f32 (a conversion, no arithmetic), so 16-bit policies run here
-- whether or not the runtime computes in bf16 / f16.
local Probe = nn.Module:extend("Probe")
function Probe:__init(rows, cols)
  self.weight = nn.Parameter(ms.randn(rows, cols))
  self.seen = {}
end
function Probe:forward(x)
  self.seen[#self.seen + 1] = {weight = self.weight:dtype(), input = x:dtype()}
  return self.weight:to("f32"):sum() + x:to("f32"):sum()
end

local Pair = nn.Module:extend("Pair")
function Pair:__init()
  self.a = Probe(7, 5)
  self.b = Probe(3, 5)
end
function Pair:forward(x) return self.a(x) + self.b(x) end

describe("FSDP mixed precision: 16-bit collectives", function()
  for _, dtype in ipairs({"bf16", "f16"}) do
    it(dtype .. " all-gathers and reduce-scatters move half the bytes of f32 and land f32 gradients", function()
      local results = dist.spawn(2, function()
        local function step(policy)
          ms.manual_seed(0)
          local model = fsdp.FSDP(Pair(), {mixed_precision = policy, auto_wrap_policy = fsdp.wrap_policy({Probe})})
          fsdp.reset_stats()
          local loss = model(ms.ones(2, 5))
          loss:backward()
          local out = {stats = fsdp.stats(), seen = model.a.seen[1], grads = {}, dtypes = {}}
          for name, p in model:named_parameters() do
            out.grads[name] = flat(p.grad:full_tensor())
            out.dtypes[name] = p:to_local():dtype() .. "/" .. p.grad:to_local():dtype()
          end
          return out
        end
        return {f32 = step(nil), half = step(fsdp.MixedPrecision{param_dtype = dtype}),
                reduce32 = step({param_dtype = dtype, reduce_dtype = "f32"})}
      end)
      for _, r in ipairs(results) do
        -- units: a (7 x 5), b (3 x 5), root (none); 2 ranks pad a to 8 rows, b to 4; each
        -- unit gathers for forward and again for backward
        local f32_gather = 2 * (8 * 5 + 4 * 5) * 4
        assert.equal(f32_gather, r.f32.stats.all_gather_bytes)
        assert.equal(f32_gather / 2, r.half.stats.all_gather_bytes)
        assert.equal(f32_gather / 4, r.half.stats.reduce_scatter_bytes)
        assert.equal(f32_gather / 2, r.reduce32.stats.all_gather_bytes)
        assert.equal(f32_gather / 2, r.reduce32.stats.reduce_scatter_bytes)
        assert.equal(f32_gather / 2, r.f32.stats.reduce_scatter_bytes)
        assert.same({weight = dtype, input = dtype}, r.half.seen)
        assert.same({weight = "f32", input = "f32"}, r.f32.seen)
        for _, run in ipairs({r.f32, r.half, r.reduce32}) do
          for name, g in pairs(run.grads) do
            for _, v in ipairs(g) do assert.equal(1, v, name) end
            assert.equal("f32/f32", run.dtypes[name])
          end
        end
      end
    end)
  end

  it("cast_forward_inputs and cast_root_forward_params as PyTorch's", function()
    local results = dist.spawn(2, function()
      local function seen(root_policy, inner_policy)
        ms.manual_seed(0)
        local model = Pair()
        fsdp.FSDP(model.a, {mixed_precision = inner_policy})
        fsdp.FSDP(model, {mixed_precision = root_policy})
        model(ms.ones(2, 5))
        return {a = model.a.seen[1], b = model.b.seen[1]}
      end
      return {
        default = seen({param_dtype = "bf16"}, {param_dtype = "bf16"}),
        no_root_cast = seen({param_dtype = "bf16", cast_root_forward_params = false}, {param_dtype = "bf16"}),
        inner_casts = seen({param_dtype = "f16", cast_root_forward_params = false},
                           {param_dtype = "bf16", cast_forward_inputs = true}),
        root_plain = seen(nil, {param_dtype = "f16", cast_forward_inputs = true}),
      }
    end)
    for _, r in ipairs(results) do
      assert.same({a = {weight = "bf16", input = "bf16"}, b = {weight = "bf16", input = "bf16"}}, r.default)
      assert.same({a = {weight = "bf16", input = "f32"}, b = {weight = "bf16", input = "f32"}}, r.no_root_cast)
      assert.same({a = {weight = "bf16", input = "bf16"}, b = {weight = "f16", input = "f32"}}, r.inner_casts)
      assert.same({a = {weight = "f16", input = "f16"}, b = {weight = "f32", input = "f32"}}, r.root_plain)
    end
  end)

  it("summon_full_params exposes the f32 masters and writes changes back", function()
    local results = dist.spawn(2, function()
      ms.manual_seed(0)
      local model = fsdp.FSDP(Pair(), {mixed_precision = {param_dtype = "bf16"}, auto_wrap_policy = fsdp.wrap_policy({Probe})})
      local before = flat(model.a.weight:full_tensor())
      local dtype
      fsdp.summon_full_params(model, function()
        dtype = model.a.weight:dtype()
        ms.no_grad(function() model.a.weight:mul_(0.5) end)
      end)
      return {dtype = dtype, before = before, after = flat(model.a.weight:full_tensor()),
              bytes = fsdp.stats().all_gather_bytes}
    end)
    for _, r in ipairs(results) do
      assert.equal("f32", r.dtype)
      for i, v in ipairs(r.before) do assert.equal(v * 0.5, r.after[i]) end -- f32 values, halved exactly
    end
  end)
end)

local Scaled = nn.Module:extend("Scaled")
function Scaled:__init()
  self.fc = nn.Linear(4, 3)
  self:register_buffer("scale", ms.tensor({1.1, 2.2, 3.3}))
  self:register_buffer("index", ms.tensor({0, 1, 2}, {dtype = "i64"}))
end
function Scaled:forward(x) return self.fc(x) * self.scale end

describe("FSDP mixed precision: buffers and state dicts", function()
  it("buffer_dtype casts floating buffers; full state dicts hold them in their own dtype", function()
    local results = dist.spawn(2, function()
      ms.manual_seed(0)
      local model = fsdp.FSDP(Scaled(), {mixed_precision = {param_dtype = "f64", buffer_dtype = "f64"}})
      local out = {scale = model.scale:dtype(), index = model.index:dtype()}
      local y = model(ms.ones(2, 4))
      out.y = y:dtype()
      out.sharded = {}
      for k, v in pairs(model:state_dict()) do out.sharded[k] = v:dtype() end
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT")
      local full = model:state_dict()
      out.full = {}
      for k, v in pairs(full) do out.full[k] = v:dtype() end
      out.full_scale = flat(full.scale)
      -- loading f32 values casts into the f64 buffer
      full.scale = ms.tensor({4, 5, 6})
      model:load_state_dict(full)
      out.loaded = flat(model.scale)
      return out
    end)
    local f32_scale = flat(ms.tensor({1.1, 2.2, 3.3}))
    for _, r in ipairs(results) do
      assert.equal("f64", r.scale)
      assert.equal("i64", r.index)
      assert.equal("f64", r.y)
      assert.same({["fc.weight"] = "f32", ["fc.bias"] = "f32", scale = "f64", index = "i64"}, r.sharded)
      assert.same({["fc.weight"] = "f32", ["fc.bias"] = "f32", scale = "f32", index = "i64"}, r.full)
      assert.same(f32_scale, r.full_scale)
      assert.same({4, 5, 6}, r.loaded)
    end
  end)

end)

-- Two Linears a and b (3 and 2 rows: uneven shards) holding one buffer under two names (the
-- same tensor registered in both); the forward counts its calls in it through a's name and
-- scales the output by it through b's (in the input's dtype). mixed gives the root two
-- parameters of different dtypes, so wrapping the root fails after a and b were wrapped.
local SharedBuffer = nn.Module:extend("MixedSharedBuffer")
function SharedBuffer:__init(mixed)
  self.a = nn.Linear(4, 3)
  self.b = nn.Linear(3, 2)
  local s = ms.zeros(2)
  self.a:register_buffer("s", s)
  self.b:register_buffer("s", s)
  if mixed then
    self.wide = nn.Parameter(ms.zeros(2, {dtype = "f64"}))
    self.narrow = nn.Parameter(ms.zeros(2, {dtype = "f32"}))
  end
end
function SharedBuffer:forward(x)
  ms.no_grad(function() self.a.s:add_(1) end)
  return self.b(self.a(x)) * self.b.s:to(x:dtype())
end

-- A meta build's param_init_fn: the layers' own initialisation and the buffer set to 1.
local function init_shared(m)
  if m.reset_parameters then m:reset_parameters() end
  if m.s then nn.init.ones_(m.s) end
end

local SHARED_LAYOUTS = {
  {strategy = "FULL_SHARD", world = 2}, {strategy = "SHARD_GRAD_OP", world = 2}, {strategy = "NO_SHARD", world = 2},
  {strategy = "HYBRID_SHARD", world = 4, mesh = {2, 2}},
}

describe("FSDP mixed precision: a buffer shared by two modules", function()
  for _, layout in ipairs(SHARED_LAYOUTS) do
    it(("%s on %d ranks: buffer_dtype keeps it one tensor (real and meta builds, one unit and a unit per Linear)")
       :format(layout.strategy, layout.world), function()
      local results = dist.spawn(layout.world, function()
        ms.set_default_dtype("f64")
        local out = {}
        for _, build in ipairs({"real", "meta"}) do
          for _, wrap in ipairs({"root", "layer"}) do
            ms.manual_seed(0)
            local model = build == "meta" and ms.device("meta", function() return SharedBuffer() end) or SharedBuffer()
            if build == "real" then ms.no_grad(function() model.a.s:copy_(ms.tensor({1, 1})) end) end
            local opts = {sharding_strategy = layout.strategy, mixed_precision = fsdp.MixedPrecision{buffer_dtype = "bf16"},
                          param_init_fn = init_shared}
            if wrap == "layer" then opts.auto_wrap_policy = fsdp.wrap_policy({nn.Linear}) end
            if layout.mesh then
              opts.device_mesh = dist.init_device_mesh(layout.mesh, {mesh_dim_names = {"replicate", "shard"}})
            end
            fsdp.FSDP(model, opts)
            local r = {same = rawequal(model.a.s, model.b.s), dtype = model.b.s:dtype(),
                       storage = model.a.s:data_ptr() == model.b.s:data_ptr(), before = flat(model.b.s)}
            ms.no_grad(function() model.a.s:add_(2) end)
            r.after = flat(model.b.s)
            fsdp.set_state_dict_type(model, "FULL_STATE_DICT")
            local sd = model:state_dict()
            r.full = {a = flat(sd["a.s"]), b = flat(sd["b.s"]), dtypes = sd["a.s"]:dtype() .. "/" .. sd["b.s"]:dtype()}
            out[build .. " " .. wrap] = r
          end
        end
        return out
      end)
      for rank, res in ipairs(results) do
        for label, r in pairs(res) do
          label = ("rank %d, %s"):format(rank - 1, label)
          assert.is_true(r.same, label)
          assert.is_true(r.storage, label)
          assert.equal("bf16", r.dtype, label)
          assert.same({1, 1}, r.before, label)
          assert.same({3, 3}, r.after, label)
          assert.same({a = {3, 3}, b = {3, 3}, dtypes = "f64/f64"}, r.full, label)
        end
      end
    end)
  end

  it("trains as the unwrapped model with buffer_dtype: the count made through one name scales through the other", function()
    local results = dist.spawn(2, function(rank, size)
      ms.set_default_dtype("f64")
      local function train(wrap)
        ms.manual_seed(3)
        local model = SharedBuffer()
        local x, y = ms.randn(4, 4), ms.randn(4, 2)
        if wrap then
          local opts = {mixed_precision = {buffer_dtype = "f32"}}
          if wrap == "layer" then opts.auto_wrap_policy = fsdp.wrap_policy({nn.Linear}) end
          fsdp.FSDP(model, opts)
          local per_rank = 4 / size
          x, y = x:narrow(0, rank * per_rank, per_rank), y:narrow(0, rank * per_rank, per_rank)
        end
        local opt = optim.SGD(model:parameters(), {lr = 0.1})
        local losses = {}
        for step = 1, STEPS do
          opt:zero_grad()
          local loss = nn.F.mse_loss(model(x), y)
          loss:backward()
          opt:step()
          local global = loss:detach():clone()
          if wrap then dist.all_reduce(global, "avg") end
          losses[step] = global:item()
        end
        return {losses = losses, a = flat(model.a.s:to("f64")), b = flat(model.b.s:to("f64")), dtype = model.b.s:dtype()}
      end
      return {plain = train(nil), root = train("root"), layer = train("layer")}
    end)
    for rank, r in ipairs(results) do
      assert.same({STEPS, STEPS}, r.plain.b)
      for _, wrap in ipairs({"root", "layer"}) do
        local label = ("rank %d, %s"):format(rank - 1, wrap)
        local run = r[wrap]
        assert.equal("f32", run.dtype, label)
        assert.same(r.plain.a, run.a, label)
        assert.same(r.plain.b, run.b, label)
        for step, loss in ipairs(r.plain.losses) do
          assert.is_true(math.abs(run.losses[step] - loss) <= 1e-12 * math.abs(loss),
                         ("%s step %d: loss %.17g vs %.17g"):format(label, step, run.losses[step], loss))
        end
      end
    end
  end)

  it("a failed wrap puts the original tensor back under both names and frees each cast once", function()
    local results = dist.spawn(2, function()
      ms.set_default_dtype("f64")
      local out = {}
      for _, build in ipairs({"real", "meta"}) do
        ms.manual_seed(0)
        local model = build == "meta" and ms.device("meta", function() return SharedBuffer(true) end) or SharedBuffer(true)
        local original = model.a.s
        collectgarbage(); collectgarbage()
        local before = ms.memory_stats("cpu").allocated
        local ok, err = pcall(fsdp.FSDP, model, {mixed_precision = {buffer_dtype = "bf16"}, param_init_fn = init_shared,
                                                 auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
        collectgarbage(); collectgarbage()
        out[build] = {ok = ok, err = tostring(err), leaked = ms.memory_stats("cpu").allocated - before,
                      a = rawequal(model.a.s, original), b = rawequal(model.b.s, original),
                      device = model.a.s:device(), dtype = model.a.s:dtype(), sharded = ms.is_dtensor(model.a.weight),
                      units = fsdp.unit_of(model.a) ~= nil or fsdp.unit_of(model.b) ~= nil}
      end
      return out
    end)
    for rank, res in ipairs(results) do
      for build, r in pairs(res) do
        local label = ("rank %d, %s build"):format(rank - 1, build)
        assert.is_false(r.ok, label)
        assert.matches("FSDP: parameters of one unit must share a dtype", r.err, 1, true)
        assert.equal(0, r.leaked, label)
        assert.is_true(r.a, label)
        assert.is_true(r.b, label)
        assert.equal(build == "meta" and "meta" or "cpu", r.device, label)
        assert.equal("f64", r.dtype, label)
        assert.is_false(r.sharded, label)
        assert.is_false(r.units, label)
      end
    end
  end)
end)

describe("FSDP mixed precision: bad input", function()
  it("rejects param_dtype that is not a float dtype and unknown keys, naming them", function()
    local cases = {
      {{param_dtype = "i32"}, "mixed_precision%.param_dtype must be a float dtype.*got i32"},
      {{param_dtype = "int64"}, "mixed_precision%.param_dtype must be a float dtype.*got int64"},
      {{param_dtype = "bf17"}, "mixed_precision%.param_dtype must be a float dtype.*got bf17"},
      {{param_dtype = 16}, "mixed_precision%.param_dtype must be a float dtype.*got 16"},
      {{reduce_dtype = "u8"}, "mixed_precision%.reduce_dtype must be a float dtype"},
      {{buffer_dtype = "bool"}, "mixed_precision%.buffer_dtype must be a float dtype"},
      {{param_dtype = "bf16", param_type = "f32"}, "unknown mixed_precision option 'param_type'"},
      {{cast_forward_inputs = "yes"}, "mixed_precision%.cast_forward_inputs must be true or false"},
      {{param_dtype = "bf16", keep_low_precision_grads = true}, "mixed_precision%.keep_low_precision_grads = true is not supported"},
      {"bf16", "mixed_precision must be a table"},
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(fsdp.MixedPrecision, case[1])
      assert.is_false(ok)
      assert.matches("^moonshard: MixedPrecision: " .. case[2], err)
      local results = dist.spawn(1, function()
        local model = nn.Linear(3, 2)
        local ok2, err2 = pcall(fsdp.FSDP, model, {mixed_precision = case[1]})
        return {ok = ok2, err = err2, dtype = model.weight:dtype(), sharded = ms.is_dtensor(model.weight)}
      end)
      assert.is_false(results[1].ok)
      assert.matches("^moonshard: FSDP: " .. case[2], results[1].err)
      assert.is_false(results[1].sharded)
    end
    local policy = {param_dtype = "bf16", reduce_dtype = "f32", buffer_dtype = "bf16", cast_forward_inputs = true}
    assert.equal(policy, fsdp.MixedPrecision(policy))
    assert.same({param_dtype = "bf16", reduce_dtype = "f32", buffer_dtype = "bf16", cast_forward_inputs = true},
                fsdp.MixedPrecision(policy))
  end)
end)

-- bf16 / f16 compute: runs once the runtime computes in 16 bits.
local function half_compute(dtype)
  local ok = pcall(function()
    local a = ms.randn(2, 2, {dtype = dtype})
    local w = ms.randn(3, 2, {dtype = dtype})
    local y = nn.F.layer_norm(nn.F.linear(a, w), {3}, ms.ones(3, {dtype = dtype}), ms.zeros(3, {dtype = dtype}))
    return y:sum()
  end)
  return ok
end

describe("FSDP mixed precision: 16-bit training end to end", function()
  for _, dtype in ipairs({"bf16", "f16"}) do
    it(dtype .. " compute tracks the f32 run within the dtype's precision", function()
      if not half_compute(dtype) then
        pending(dtype .. " compute ops (randn, linear, layer_norm in " .. dtype .. ") are not in the runtime yet")
        return
      end
      local eps = dtype == "bf16" and 2 ^ -8 or 2 ^ -11
      local results = dist.spawn(2, function(rank, size)
        local function train(policy)
          ms.manual_seed(0)
          local model = parity.Model()
          local seen = {}
          model.blocks[1].fc1:register_forward_hook(function(m, _, out) seen[m.weight:dtype() .. "/" .. out:dtype()] = true end)
          fsdp.FSDP(model, {mixed_precision = policy, auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
          local opt = optim.Adam(model:parameters(), {lr = 0.01})
          local per_rank = parity.GLOBAL_BATCH / size
          local losses = {}
          for step = 1, 4 do
            local tokens, targets = parity.batch(step)
            opt:zero_grad()
            local loss = loss_of(model, tokens:narrow(0, rank * per_rank, per_rank),
                                 targets:narrow(0, rank * per_rank, per_rank))
            loss:backward()
            local global = loss:detach():to("f32")
            dist.all_reduce(global, "avg")
            losses[step] = global:item()
            opt:step()
          end
          local dtypes = {}
          for _, p in model:named_parameters() do dtypes[p:to_local():dtype() .. "/" .. p.grad:to_local():dtype()] = true end
          return {losses = losses, dtypes = dtypes, seen = seen}
        end
        return {f32 = train(nil), half = train({param_dtype = dtype, reduce_dtype = "f32"})}
      end)
      for _, r in ipairs(results) do
        assert.same({["f32/f32"] = true}, r.half.dtypes)
        assert.same({[dtype .. "/" .. dtype] = true}, r.half.seen)
        assert.same({["f32/f32"] = true}, r.f32.seen)
        for step, loss in ipairs(r.f32.losses) do
          -- the loss of a few rounded layers: within a few eps of the f32 run's
          assert.is_true(math.abs(r.half.losses[step] - loss) < 16 * eps * math.abs(loss),
                         ("step %d: %s loss %.6g vs f32 %.6g"):format(step, dtype, r.half.losses[step], loss))
        end
        assert.is_true(r.half.losses[4] < r.half.losses[1])
      end
    end)
  end
end)
