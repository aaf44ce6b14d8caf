-- FULL_STATE_DICT with rank0_only, loading: rank 0 of the model's mesh (the first rank of
-- its process group) holds the state dict and every rank of that mesh loads its values,
-- parameters and buffers; rank 0 decides which keys are present and every rank raises the
-- same error for a missing, unexpected or malformed key; a buffer shared by two modules loads
-- under both names (its last name wins a conflict, as PyTorch). The optimizer's state loads the
-- same way through optim_state_dict_to_load. Values are checked against an unwrapped model
-- built from the same seed, and resumed training against uninterrupted training.
local ms = require "moonshard"
local global_state = require "support.global_state"
local nn, optim, dist, fsdp = ms.nn, ms.optim, ms.dist, ms.fsdp

-- Two Linears (5 and 3 rows: uneven shards on 2 ranks) and a persistent buffer.
local Net = nn.Module:extend("Rank0Net")
function Net:__init()
  self.fc = nn.Linear(4, 5)
  self.out = nn.Linear(5, 3)
  self:register_buffer("scale", ms.ones(3))
end
function Net:forward(x) return self.out(nn.F.relu(self.fc(x))) * self.scale end

-- Two Linears a and b (registered in the order given) holding one persistent buffer under
-- two names (the same tensor registered in both).
local Shared = nn.Module:extend("Rank0SharedBufferNet")
function Shared:__init(order)
  self[order[1]] = nn.Linear(4, 3)
  self[order[2]] = nn.Linear(3, 2)
  local shared = ms.zeros(2)
  self.a:register_buffer("s", shared)
  self.b:register_buffer("s", shared)
end

local function flat(t) return t:reshape(-1):table() end

-- An unwrapped Net from seed, its buffer set to distinct values (seed + 1, seed + 2, ...).
local function unwrapped(seed)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  local net = Net()
  net.scale:copy_(ms.arange(3, {dtype = "f64"}) + seed + 1)
  return net
end

-- Every state-dict value of a model as plain arrays (parameters gathered), in a fixed order.
local function values_of(model)
  local out = {}
  for _, name in ipairs({"fc.weight", "fc.bias", "out.weight", "out.bias"}) do
    local p = model
    for part in name:gmatch("[^.]+") do p = p[part] end
    out[name] = flat(ms.is_dtensor(p) and p:full_tensor() or p)
  end
  out.scale = flat(model.scale)
  return out
end

-- The values of unwrapped(seed), or with initial = true those of the Net wrapped() builds.
local function plain_values(seed, initial)
  local net = unwrapped(seed)
  if initial then net.scale:fill_(1) end
  local out = {}
  for name, t in pairs(net:state_dict()) do out[name] = flat(t) end
  ms.set_default_dtype("f32")
  return out
end

local function wrapped(seed, opts)
  ms.set_default_dtype("f64")
  ms.manual_seed(seed)
  opts = opts or {}
  opts.auto_wrap_policy = fsdp.wrap_policy({nn.Linear})
  local model = fsdp.FSDP(Net(), opts)
  fsdp.set_state_dict_type(model, "FULL_STATE_DICT", {rank0_only = true}, {rank0_only = true})
  return model
end

local function first_line(err) return (tostring(err):gsub("\n.*", "")) end

before_each(global_state.save)
after_each(global_state.restore)

describe("FULL_STATE_DICT with rank0_only: loading", function()
  it("loads parameters and buffers from rank 0's state dict on every rank, ignoring the others'", function()
    local expected = plain_values(7)
    local results = dist.spawn(2, function(rank)
      local model = wrapped(0)
      -- rank 1's own state dict holds other values: only rank 0's are read
      local sd = unwrapped(rank == 0 and 7 or 9):state_dict()
      local report = model:load_state_dict(sd)
      return {values = values_of(model), missing = #report.missing_keys, unexpected = #report.unexpected_keys}
    end)
    for rank, res in ipairs(results) do
      assert.same(expected, res.values, "rank " .. (rank - 1))
      assert.equal(0, res.missing)
      assert.equal(0, res.unexpected)
    end
  end)

  it("raises on every rank for a key missing from rank 0's state dict; non-strict leaves it as it is", function()
    local expected, initial = plain_values(7), plain_values(0, true)
    local results = dist.spawn(2, function(rank)
      local model = wrapped(0)
      local sd = {}
      if rank == 0 then
        sd = unwrapped(7):state_dict()
        sd["fc.bias"] = nil
        sd.extra = ms.zeros(2)
      end
      local ok, err = pcall(model.load_state_dict, model, sd)
      local after_failure = values_of(model)
      local report = model:load_state_dict(sd, {strict = false})
      return {ok = ok, err = first_line(err), after_failure = after_failure, values = values_of(model),
              missing = report.missing_keys, unexpected = report.unexpected_keys}
    end)
    for rank, res in ipairs(results) do
      local label = "rank " .. (rank - 1)
      assert.is_false(res.ok, label)
      assert.equal("moonshard: load_state_dict: missing keys: fc.bias; unexpected keys: extra", res.err, label)
      assert.same(initial, res.after_failure, label)
      assert.same({"fc.bias"}, res.missing, label)
      assert.same({"extra"}, res.unexpected, label)
      for name, values in pairs(expected) do
        assert.same(name == "fc.bias" and initial[name] or values, res.values[name], label .. " " .. name)
      end
    end
  end)

  it("raises on every rank naming the key for a wrong shape or dtype on rank 0, and loads afterwards", function()
    local expected = plain_values(7)
    local results = dist.spawn(2, function(rank)
      local model = wrapped(0)
      local function load(change)
        local sd = {}
        if rank == 0 then
          sd = unwrapped(7):state_dict()
          change(sd)
        end
        local ok, err = pcall(model.load_state_dict, model, sd)
        return {ok = ok, err = first_line(err)}
      end
      return {
        shape = load(function(sd) sd["out.weight"] = ms.zeros(2, 5, {dtype = "f64"}) end),
        dtype = load(function(sd) sd["fc.weight"] = sd["fc.weight"]:to("f32") end),
        good = load(function() end),
        values = values_of(model),
      }
    end)
    for rank, res in ipairs(results) do
      local label = "rank " .. (rank - 1)
      assert.is_false(res.shape.ok, label)
      assert.equal("moonshard: load_state_dict: size mismatch for 'out.weight': checkpoint has shape [2, 5], " ..
                   "model has [3, 5]", res.shape.err, label)
      assert.is_false(res.dtype.ok, label)
      assert.equal("moonshard: load_state_dict: dtype mismatch for 'fc.weight': checkpoint has f32, model has f64",
                   res.dtype.err, label)
      assert.is_true(res.good.ok, label .. ": " .. tostring(res.good.err))
      assert.same(expected, res.values, label)
    end
  end)

  it("loads a buffer shared by two modules under both names, the last registered name winning a conflict",
     function()
    local results = dist.spawn(2, function(rank)
      local out = {}
      for _, order in ipairs({{"a", "b"}, {"b", "a"}}) do
        local first, last = order[1] .. ".s", order[2] .. ".s"
        ms.set_default_dtype("f64")
        local function state_dict(values)
          if rank ~= 0 then return {} end
          local sd = Shared(order):state_dict()
          sd[first], sd[last] = ms.tensor(values[1], {dtype = "f64"}), ms.tensor(values[2], {dtype = "f64"})
          return sd
        end
        local model = fsdp.FSDP(Shared(order), {auto_wrap_policy = fsdp.wrap_policy({nn.Linear})})
        fsdp.set_state_dict_type(model, "FULL_STATE_DICT", {rank0_only = true})
        local function buffer() return {shared = rawequal(model.a.s, model.b.s), a = flat(model.a.s), b = flat(model.b.s)} end
        local report = model:load_state_dict(state_dict({{5, 6}, {7, 8}}))
        local run = {last = last, conflict = buffer(), conflict_missing = report.missing_keys}
        local sd = state_dict({{1, 2}, {3, 4}})
        sd[last] = nil
        local ok, err = pcall(model.load_state_dict, model, sd)
        run.ok, run.err, run.after_failure = ok, first_line(err), buffer()
        run.missing = model:load_state_dict(sd, {strict = false}).missing_keys
        run.non_strict = buffer()
        out[#out + 1] = run
      end
      return out
    end)
    for rank, runs in ipairs(results) do
      for _, res in ipairs(runs) do
        local label = ("rank %d, %s registered last"):format(rank - 1, res.last)
        assert.same({shared = true, a = {7, 8}, b = {7, 8}}, res.conflict, label)
        assert.same({}, res.conflict_missing, label)
        assert.is_false(res.ok, label)
        assert.equal("moonshard: load_state_dict: missing keys: " .. res.last, res.err, label)
        assert.same({shared = true, a = {7, 8}, b = {7, 8}}, res.after_failure, label)
        assert.same({res.last}, res.missing, label)
        assert.same({shared = true, a = {1, 2}, b = {1, 2}}, res.non_strict, label)
      end
    end
  end)

  it("broadcasts within each model's own process group from the group's first rank", function()
    local expected = {plain_values(10), plain_values(11)}
    local results = dist.spawn(4, function(rank)
      local groups = {dist.new_group({0, 1}), dist.new_group({2, 3})}
      local g = rank < 2 and 1 or 2
      local model = wrapped(g, {process_group = groups[g]})
      local sd = (rank == 0 or rank == 2) and unwrapped(9 + g):state_dict() or {}
      model:load_state_dict(sd)
      return values_of(model)
    end)
    for rank, values in ipairs(results) do
      assert.same(expected[rank <= 2 and 1 or 2], values, "rank " .. (rank - 1))
    end
  end)

  it("reaches every rank of a hybrid (replicate, shard) mesh from its coordinate (0, 0)", function()
    local expected = plain_values(7)
    local results = dist.spawn(4, function(rank)
      local mesh = dist.init_device_mesh({2, 2}, {mesh_dim_names = {"replicate", "shard"}})
      local model = wrapped(0, {sharding_strategy = "HYBRID_SHARD", device_mesh = mesh})
      model:load_state_dict(rank == 0 and unwrapped(7):state_dict() or {})
      return values_of(model)
    end)
    for rank, values in ipairs(results) do assert.same(expected, values, "rank " .. (rank - 1)) end
  end)
end)

describe("FULL_STATE_DICT with rank0_only: the optimizer", function()
  local function train(model, opt, first, last)
    for step = first, last do
      ms.manual_seed(100 + step)
      local x = ms.randn(3, 4)
      opt:zero_grad()
      local y = model(x)
      local loss = (y * y):sum()
      loss:backward()
      opt:step()
    end
  end

  it("resumes from rank 0's optimizer and model state dicts exactly like uninterrupted training", function()
    local results = dist.spawn(4, function(rank)
      -- two independent trainings, one per process group
      local groups = {dist.new_group({0, 1}), dist.new_group({2, 3})}
      local g = rank < 2 and 1 or 2
      local model = wrapped(g, {process_group = groups[g]})
      local opt = optim.Adam(model:parameters(), {lr = 0.05})
      train(model, opt, 1, 2)
      local model_sd = model:state_dict()
      local optim_sd = fsdp.optim_state_dict(model, opt) -- tensors on the group's first rank only
      train(model, opt, 3, 4)
      local uninterrupted = values_of(model)

      local resumed = wrapped(5, {process_group = groups[g]})
      local resumed_opt = optim.Adam(resumed:parameters(), {lr = 0.5})
      resumed:load_state_dict(model_sd)
      resumed_opt:load_state_dict(fsdp.optim_state_dict_to_load(resumed, resumed_opt, optim_sd))
      train(resumed, resumed_opt, 3, 4)
      return {uninterrupted = uninterrupted, resumed = values_of(resumed)}
    end)
    for rank, res in ipairs(results) do
      assert.same(res.uninterrupted, res.resumed, "rank " .. (rank - 1))
    end
    assert.are_not.same(results[1].uninterrupted, results[3].uninterrupted) -- the groups trained apart
  end)

  it("raises on every rank naming the state for a wrong shape in rank 0's optimizer state dict", function()
    local results = dist.spawn(2, function(rank)
      local model = wrapped(0)
      local opt = optim.Adam(model:parameters(), {lr = 0.05})
      train(model, opt, 1, 1)
      local osd = fsdp.optim_state_dict(model, opt)
      if rank == 0 then osd.state["out.weight"].exp_avg = ms.zeros(2, 5, {dtype = "f64"}) end
      local ok, err = pcall(fsdp.optim_state_dict_to_load, model, opt, osd)
      return {ok = ok, err = first_line(err)}
    end)
    for rank, res in ipairs(results) do
      assert.is_false(res.ok, "rank " .. (rank - 1))
      assert.equal("moonshard: load_state_dict: size mismatch for 'out.weight.exp_avg': checkpoint has shape " ..
                   "[2, 5], model has [3, 5]", res.err)
    end
  end)
end)
