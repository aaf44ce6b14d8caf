-- FSDP state dicts: SHARDED_STATE_DICT (DTensors), FULL_STATE_DICT (all ranks or rank 0
-- only) and LOCAL_STATE_DICT, their loading, and the optimizer's sharded state; keys and
-- values checked against the unwrapped model built from the same seed. A buffer shared by two
-- modules is in every type under both names, and loads once (its last name wins, as PyTorch).
local ms = require "moonshard"
local parity = require "support.parity"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

local function flat(t) return t:reshape(-1):table() end

-- The unwrapped model's parameters from a seed, as plain arrays keyed by name.
local function unwrapped_values(seed)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  local values = {}
  for name, t in pairs(parity.Model():state_dict()) do values[name] = flat(t) end
  ms.set_default_dtype("f32")
  return values
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- A per-layer-wrapped FSDP model built from seed 0 inside a rank.
local function wrapped_model(strategy)
  ms.set_default_dtype("f64")
  ms.manual_seed(0)
  return fsdp.FSDP(parity.Model(), {sharding_strategy = strategy or "FULL_SHARD",
                                    auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
end

-- A copy of a state dict whose tensors no longer share storage with the model or optimizer.
local function deep_clone(value)
  if ms.is_tensor(value) or ms.is_dtensor(value) then return value:clone() end
  if type(value) ~= "table" then return value end
  local out = {}
  for k, v in pairs(value) do out[k] = deep_clone(v) end
  return out
end

local function full_values(model)
  local out = {}
  for name, p in model:named_parameters() do out[name] = flat(p:full_tensor()) end
  return out
end

before_each(global_state.save)
after_each(global_state.restore)

describe("FSDP state dicts", function()
  local initial

  setup(function() initial = unwrapped_values(0) end)

  it("SHARDED_STATE_DICT has the unwrapped keys and DTensor values sharded on dim 0", function()
    local results = dist.spawn(3, function(rank)
      local model = wrapped_model()
      local sd = model:state_dict()
      local out = {keys = sorted_keys(sd), values = {}, rows = {}, placements = {}}
      for _, name in ipairs(sorted_keys(sd)) do -- the same order on every rank: full_tensor gathers
        local value = sd[name]
        out.values[name] = flat(value:full_tensor())
        out.rows[name] = value:to_local():size(0)
        out.placements[name] = tostring(value.placements[1])
      end
      out.rank = rank
      return out
    end)
    local expected_keys = sorted_keys(initial)
    for _, res in ipairs(results) do
      assert.same(expected_keys, res.keys)
      for name, values in pairs(initial) do
        assert.same(values, res.values[name])
        assert.equal("Shard(0)", res.placements[name])
      end
    end
    -- head.bias has 11 rows: chunks of ceil(11 / 3) = 4, so 4, 4, 3.
    assert.same({4, 4, 3}, {results[1].rows["head.bias"], results[2].rows["head.bias"], results[3].rows["head.bias"]})
  end)

  it("FULL_STATE_DICT gives whole tensors on every rank, or on rank 0 only", function()
    local results = dist.spawn(2, function()
      local model = wrapped_model()
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT")
      local everyone = {}
      for name, t in pairs(model:state_dict()) do
        assert(not ms.is_dtensor(t), name .. " is a DTensor")
        everyone[name] = flat(t)
      end
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT", {rank0_only = true})
      return {everyone = everyone, rank0_only_keys = #sorted_keys(model:state_dict())}
    end)
    for _, res in ipairs(results) do assert.same(initial, res.everyone) end
    assert.equal(#sorted_keys(initial), results[1].rank0_only_keys)
    assert.equal(0, results[2].rank0_only_keys)
  end)

  it("LOCAL_STATE_DICT gives each rank's own rows as plain tensors", function()
    local results = dist.spawn(2, function()
      local model = wrapped_model()
      fsdp.set_state_dict_type(model, "LOCAL_STATE_DICT")
      local w = model:state_dict()["embed.weight"]
      return {is_dtensor = ms.is_dtensor(w), shape = {unpack(w:shape())}, values = flat(w)}
    end)
    -- embed.weight is [11, 6]: rank 0 holds rows 0..5, rank 1 rows 6..10.
    assert.same({6, 6}, results[1].shape)
    assert.same({5, 6}, results[2].shape)
    local whole = {}
    for _, v in ipairs(results[1].values) do whole[#whole + 1] = v end
    for _, v in ipairs(results[2].values) do whole[#whole + 1] = v end
    assert.same(initial["embed.weight"], whole)
    assert.is_false(results[1].is_dtensor)
  end)

  for _, kind in ipairs({"SHARDED_STATE_DICT", "FULL_STATE_DICT", "LOCAL_STATE_DICT"}) do
    it(("loads a %s saved from another model into this one"):format(kind), function()
      local other = unwrapped_values(7)
      local results = dist.spawn(3, function()
        local source = wrapped_model()
        ms.manual_seed(7)
        ms.no_grad(function()
          local fresh = parity.Model()
          fsdp.set_state_dict_type(source, "FULL_STATE_DICT")
          source:load_state_dict(fresh:state_dict())
        end)
        fsdp.set_state_dict_type(source, kind)
        local sd = source:state_dict()
        local target = wrapped_model()
        fsdp.set_state_dict_type(target, kind)
        target:load_state_dict(sd)
        return full_values(target)
      end)
      for _, res in ipairs(results) do assert.same(other, res) end
    end)
  end

  it("FULL_STATE_DICT with rank0_only loads from rank 0's copy into every rank", function()
    local other = unwrapped_values(7)
    local results = dist.spawn(2, function(rank)
      local target = wrapped_model()
      fsdp.set_state_dict_type(target, "FULL_STATE_DICT", {rank0_only = true})
      local sd = {}
      if rank == 0 then
        ms.manual_seed(7)
        sd = parity.Model():state_dict()
      end
      target:load_state_dict(sd)
      return full_values(target)
    end)
    for _, res in ipairs(results) do assert.same(other, res) end
  end)

  it("loads an unwrapped model's state dict and reports missing and unexpected keys", function()
    local results = dist.spawn(2, function()
      local target = wrapped_model()
      fsdp.set_state_dict_type(target, "FULL_STATE_DICT")
      local sd = target:state_dict()
      sd["head.bias"] = nil
      sd["extra.weight"] = ms.zeros(2)
      local ok, err = pcall(target.load_state_dict, target, sd)
      local report = target:load_state_dict(sd, {strict = false})
      return {ok = ok, err = tostring(err), missing = report.missing_keys, unexpected = report.unexpected_keys}
    end)
    assert.is_false(results[1].ok)
    assert.matches("missing keys: head.bias", results[1].err)
    assert.matches("unexpected keys: extra.weight", results[1].err)
    assert.same({"head.bias"}, results[1].missing)
    assert.same({"extra.weight"}, results[1].unexpected)
  end)

  it("names the key and both shapes when a loaded value has the wrong shape", function()
    local results = dist.spawn(2, function()
      local target = wrapped_model()
      fsdp.set_state_dict_type(target, "FULL_STATE_DICT")
      local sd = target:state_dict()
      sd["head.weight"] = ms.zeros(3, 6, {dtype = "f64"})
      local ok, err = pcall(target.load_state_dict, target, sd)
      return {ok = ok, err = tostring(err)}
    end)
    assert.is_false(results[1].ok)
    assert.matches("head.weight", results[1].err)
    assert.matches("%[3, 6%]", results[1].err)
    assert.matches("%[11, 6%]", results[1].err)
  end)
end)

-- Two Linears a and b (3 and 2 rows: uneven shards on 2 ranks; registered in the order
-- given, a then b by default) holding one persistent buffer under two names (the same tensor
-- registered in both), each Linear its own unit.
local SharedBuffer = nn.Module:extend("SharedBufferNet")
function SharedBuffer:__init(order)
  order = order or {"a", "b"}
  self[order[1]] = nn.Linear(2, 3)
  self[order[2]] = nn.Linear(3, 2)
  local shared = ms.arange(2, {dtype = "f64"}) + 1
  self.a:register_buffer("s", shared)
  self.b:register_buffer("s", shared)
  self.order = order
end
function SharedBuffer:forward(x) return self[self.order[2]](self[self.order[1]](x)) * self.a.s end

-- A SharedBuffer from seed, its shared buffer holding values.
local function shared_buffer_net(seed, values, order)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  local net = SharedBuffer(order)
  net.a.s:copy_(ms.tensor(values, {dtype = "f64"}))
  return net
end

local function shared_buffer_model(seed, values, order)
  return fsdp.FSDP(shared_buffer_net(seed, values, order), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
end

-- What a test reads back from a SharedBuffer model: its parameters (gathered), the buffer under
-- both names, and whether both modules still hold one tensor.
local function shared_buffer_state(model)
  local out = {shared = rawequal(model.a.s, model.b.s), ["a.s"] = flat(model.a.s), ["b.s"] = flat(model.b.s)}
  for _, name in ipairs({"a.weight", "a.bias", "b.weight", "b.bias"}) do
    local module, param = name:match("(%a)%.(%a+)")
    local p = model[module][param]
    out[name] = flat(ms.is_dtensor(p) and p:full_tensor() or p)
  end
  return out
end

local SHARED_BUFFER_KINDS = {
  {"SHARDED_STATE_DICT"}, {"FULL_STATE_DICT"}, {"FULL_STATE_DICT", {rank0_only = true}}, {"LOCAL_STATE_DICT"},
}

local function kind_label(kind) return kind[1] .. (kind[2] and " rank0_only" or "") end

describe("FSDP state dicts of a buffer shared by two modules", function()
  local unwrapped_keys

  setup(function()
    unwrapped_keys = sorted_keys(shared_buffer_net(0, {1, 2}):state_dict())
    global_state.restore()
  end)

  it("list it under both names in every state dict type, with the one shared value", function()
    local results = dist.spawn(2, function(rank)
      local model = shared_buffer_model(0, {3, 4})
      local out = {}
      for _, kind in ipairs(SHARED_BUFFER_KINDS) do
        fsdp.set_state_dict_type(model, kind[1], kind[2])
        local sd = model:state_dict()
        local a, b = sd["a.s"], sd["b.s"]
        out[kind_label(kind)] = {
          keys = sorted_keys(sd), a = a and flat(a), b = b and flat(b),
          plain = not (ms.is_dtensor(a) or ms.is_dtensor(b)),
          -- SHARDED and LOCAL give the buffer itself
          storage = a and b and a:data_ptr() == model.a.s:data_ptr() and b:data_ptr() == model.a.s:data_ptr(),
        }
      end
      out.rank = rank
      return out
    end)
    for _, res in ipairs(results) do
      for _, kind in ipairs(SHARED_BUFFER_KINDS) do
        local label = ("rank %d %s"):format(res.rank, kind_label(kind))
        local got = res[kind_label(kind)]
        if kind[2] and res.rank > 0 then
          assert.equal(got.a == nil, got.b == nil, label)
        else
          assert.same(unwrapped_keys, got.keys, label)
        end
        if got.a then
          assert.same({3, 4}, got.a, label)
          assert.same({3, 4}, got.b, label)
          assert.is_true(got.plain, label)
        end
        if kind[1] ~= "FULL_STATE_DICT" then assert.is_true(got.storage, label) end
      end
    end
  end)

  for _, kind in ipairs(SHARED_BUFFER_KINDS) do
    it(("loads its own %s strictly, setting the shared buffer once"):format(kind_label(kind)), function()
      local results = dist.spawn(2, function()
        local source = shared_buffer_model(7, {5, 6})
        fsdp.set_state_dict_type(source, kind[1], kind[2])
        local sd = deep_clone(source:state_dict())
        local target = shared_buffer_model(0, {1, 2})
        fsdp.set_state_dict_type(target, kind[1], kind[2])
        local report = target:load_state_dict(sd)
        return {expected = shared_buffer_state(source), got = shared_buffer_state(target),
                missing = report.missing_keys, unexpected = report.unexpected_keys}
      end)
      for rank, res in ipairs(results) do
        local label = "rank " .. (rank - 1)
        assert.same({}, res.missing, label)
        assert.same({}, res.unexpected, label)
        assert.is_true(res.got.shared, label)
        assert.same({5, 6}, res.got["b.s"], label)
        assert.same(res.expected, res.got, label)
      end
    end)
  end

  it("moves between the wrapped and the unwrapped model with FULL_STATE_DICT, strictly", function()
    local results = dist.spawn(2, function()
      local model = shared_buffer_model(0, {1, 2})
      fsdp.set_state_dict_type(model, "FULL_STATE_DICT")
      local unwrapped = shared_buffer_net(7, {5, 6})
      model:load_state_dict(unwrapped:state_dict())
      local into_wrapped = shared_buffer_state(model)
      local fresh = shared_buffer_net(0, {1, 2})
      fresh:load_state_dict(model:state_dict())
      return {expected = shared_buffer_state(unwrapped), into_wrapped = into_wrapped,
              into_unwrapped = shared_buffer_state(fresh)}
    end)
    for rank, res in ipairs(results) do
      local label = "rank " .. (rank - 1)
      assert.is_true(res.into_wrapped.shared, label)
      assert.same(res.expected, res.into_wrapped, label)
      assert.same(res.expected, res.into_unwrapped, label)
    end
  end)

  for _, kind in ipairs({"FULL_STATE_DICT", "SHARDED_STATE_DICT"}) do
    it(("takes the value of its last registered name on a conflict, as PyTorch, and names a missing " ..
        "name (%s)"):format(kind), function()
      local results = dist.spawn(2, function()
        local out = {}
        for _, order in ipairs({{"a", "b"}, {"b", "a"}}) do
          local first, last = order[1] .. ".s", order[2] .. ".s"
          local model = shared_buffer_model(0, {1, 2}, order)
          fsdp.set_state_dict_type(model, kind)
          local sd = deep_clone(model:state_dict())
          sd[first] = ms.tensor({5, 6}, {dtype = "f64"})
          sd[last] = ms.tensor({7, 8}, {dtype = "f64"})
          model:load_state_dict(sd)
          local conflict = shared_buffer_state(model)
          sd[last] = nil
          local ok, err = pcall(model.load_state_dict, model, sd)
          local after_failure = shared_buffer_state(model)
          local report = model:load_state_dict(sd, {strict = false})
          out[#out + 1] = {last = last, conflict = conflict, ok = ok, err = tostring(err),
                           after_failure = after_failure, non_strict = shared_buffer_state(model),
                           missing = report.missing_keys}
        end
        return out
      end)
      for rank, runs in ipairs(results) do
        for _, res in ipairs(runs) do
          local label = ("rank %d, %s registered last"):format(rank - 1, res.last)
          assert.is_true(res.conflict.shared, label)
          assert.same({7, 8}, res.conflict["a.s"], label)
          assert.same({7, 8}, res.conflict["b.s"], label)
          assert.is_false(res.ok, label)
          assert.matches("missing keys: " .. res.last, res.err, 1, true)
          assert.same({7, 8}, res.after_failure["a.s"], label)
          assert.same({res.last}, res.missing, label)
          assert.is_true(res.non_strict.shared, label)
          assert.same({5, 6}, res.non_strict["a.s"], label)
          assert.same({5, 6}, res.non_strict["b.s"], label)
        end
      end
    end)
  end
end)

describe("FSDP optimizer state dicts", function()
  local STEPS = 2

  -- Adam's exp_avg and exp_avg_sq of the unwrapped model after STEPS steps on the global batch.
  local function reference_state()
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    local model = parity.Model()
    local opt = optim.Adam(model:parameters(), {lr = 0.01})
    for step = 1, STEPS do
      local tokens, targets = parity.batch(step)
      opt:zero_grad()
      nn.F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1)):backward()
      opt:step()
    end
    local out = {}
    for name, p in model:named_parameters() do
      out[name] = {exp_avg = flat(opt.state[p].exp_avg), exp_avg_sq = flat(opt.state[p].exp_avg_sq),
                   step = opt.state[p].step}
    end
    ms.set_default_dtype("f32")
    return out
  end

  local function train(model, opt, rank, size, first, last)
    local per_rank = parity.GLOBAL_BATCH / size
    for step = first, last do
      local tokens, targets = parity.batch(step)
      opt:zero_grad()
      local logits = model(tokens:narrow(0, rank * per_rank, per_rank))
      nn.F.cross_entropy(logits:view(-1, parity.VOCAB), targets:narrow(0, rank * per_rank, per_rank):reshape(-1)):backward()
      opt:step()
    end
  end

  it("gives Adam's state as DTensors keyed by parameter name, matching the unwrapped optimizer", function()
    local reference = reference_state()
    local results = dist.spawn(2, function(rank, size)
      local model = wrapped_model()
      local opt = optim.Adam(model:parameters(), {lr = 0.01})
      train(model, opt, rank, size, 1, STEPS)
      local osd = fsdp.optim_state_dict(model, opt)
      local out = {}
      for _, name in ipairs(sorted_keys(osd.state)) do
        local state = osd.state[name]
        out[name] = {exp_avg = flat(state.exp_avg:full_tensor()), exp_avg_sq = flat(state.exp_avg_sq:full_tensor()),
                     step = state.step, placement = tostring(state.exp_avg.placements[1])}
      end
      return {state = out, params = osd.param_groups[1].params, lr = osd.param_groups[1].lr}
    end)
    for _, res in ipairs(results) do
      assert.equal(0.01, res.lr)
      assert.equal(#sorted_keys(reference), #res.params)
      for name, ref in pairs(reference) do
        local got = res.state[name]
        assert.is_not_nil(got, "no state for " .. name)
        assert.equal(ref.step, got.step)
        assert.equal("Shard(0)", got.placement)
        assert.is_true(parity.max_relative_error(got.exp_avg, ref.exp_avg) < 1e-9, name .. " exp_avg")
        assert.is_true(parity.max_relative_error(got.exp_avg_sq, ref.exp_avg_sq) < 1e-9, name .. " exp_avg_sq")
      end
    end
  end)

  for _, kind in ipairs({"SHARDED_STATE_DICT", "FULL_STATE_DICT", "LOCAL_STATE_DICT"}) do
    it(("resumes from optim_state_dict_to_load of a %s exactly like the uninterrupted optimizer"):format(kind),
       function()
      local results = dist.spawn(3, function(rank, size)
        local model = wrapped_model()
        local opt = optim.Adam(model:parameters(), {lr = 0.01})
        train(model, opt, rank, size, 1, 2)
        fsdp.set_state_dict_type(model, kind)
        local model_sd = deep_clone(model:state_dict())
        local optim_sd = deep_clone(fsdp.optim_state_dict(model, opt))
        train(model, opt, rank, size, 3, 4)
        local uninterrupted = full_values(model)

        ms.manual_seed(3)
        local resumed = fsdp.FSDP(parity.Model(), {auto_wrap_policy = fsdp.wrap_policy({parity.Block})})
        fsdp.set_state_dict_type(resumed, kind)
        local resumed_opt = optim.Adam(resumed:parameters(), {lr = 0.5})
        resumed:load_state_dict(model_sd)
        resumed_opt:load_state_dict(fsdp.optim_state_dict_to_load(resumed, resumed_opt, optim_sd))
        train(resumed, resumed_opt, rank, size, 3, 4)
        return {uninterrupted = uninterrupted, resumed = full_values(resumed)}
      end)
      for _, res in ipairs(results) do
        for name, values in pairs(res.uninterrupted) do assert.same(values, res.resumed[name], name) end
      end
    end)
  end
end)
