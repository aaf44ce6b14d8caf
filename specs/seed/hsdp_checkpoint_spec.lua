-- Hybrid-sharded checkpoints, case by case as in PyTorch's checkpoint tests for HSDP: a
-- sharded state dict saved on a (2, 2) mesh reloads into the same model after an Adam step,
-- and into an FSDP model on a 1-D mesh of the same 4 ranks; for an even and an uneven model.
local ms = require "moonshard"
local nn, optim, dist, fsdp, dcp = ms.nn, ms.optim, ms.dist, ms.fsdp, ms.dcp

local WORLD_SIZE = 4

local SimpleModel = nn.Module:extend("SimpleModel")
function SimpleModel:__init()
  self.net1 = nn.Linear(5, 8)
  self.relu = nn.ReLU()
  self.net2 = nn.Linear(8, 4)
  self.net3 = nn.Linear(4, 12)
end
function SimpleModel:forward(x)
  x = nn.F.relu(self.net1(x))
  x = nn.F.relu(self.net2(x))
  return nn.F.relu(self.net3(x))
end
function SimpleModel:get_input() return ms.rand(4, 5) end

local SimpleModelUneven = nn.Module:extend("SimpleModelUneven")
function SimpleModelUneven:__init()
  self.net1 = nn.Linear(5, 10)
  self.relu = nn.ReLU()
  self.net2 = nn.Linear(10, 15)
  self.net3 = nn.Linear(15, 30)
  self.net4 = nn.Linear(30, 5)
end
function SimpleModelUneven:forward(x)
  x = nn.F.relu(self.net1(x))
  x = nn.F.relu(self.net2(x))
  x = nn.F.relu(self.net3(x))
  return nn.F.relu(self.net4(x))
end
function SimpleModelUneven:get_input() return ms.rand(4, 5) end

local MODELS = {{"SimpleModel", SimpleModel}, {"SimpleModelUneven", SimpleModelUneven}}

local store_dirs = require "support.store_dirs"

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function same_placements(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if not (a[i] == b[i]) then return false end end
  return true
end

local function deepcopy(sd)
  local out = {}
  for k, v in pairs(sd) do out[k] = type(v) == "table" and not ms.is_dtensor(v) and deepcopy(v) or v:clone() end
  return out
end

-- For each key of a (in order) next to b's: key, and whether meshes, placements and local
-- values are equal (local values compared as given by values_of).
local function compare(a, b, values_of)
  local rows = {keys_a = sorted_keys(a), keys_b = sorted_keys(b), entries = {}}
  for _, k in ipairs(rows.keys_a) do
    local v1, v2 = a[k], b[k]
    if v2 then
      local l1, l2 = values_of(v1, v2)
      rows.entries[#rows.entries + 1] = {
        key = k, mesh_equal = v1.device_mesh == v2.device_mesh,
        placements_equal = same_placements(v1.placements, v2.placements), values_equal = ms.equal(l1, l2),
      }
    end
  end
  return rows
end

local function local_values(v1, v2) return v1:to_local(), v2:to_local() end

local function assert_rows(rows, expect)
  assert.same(rows.keys_a, rows.keys_b)
  assert.equal(#rows.keys_a, #rows.entries)
  for _, e in ipairs(rows.entries) do
    assert.equal(expect.mesh_equal, e.mesh_equal, e.key .. ": device_mesh")
    assert.equal(expect.placements_equal, e.placements_equal, e.key .. ": placements")
    if expect.values_equal then
      assert.is_true(e.values_equal, e.key .. ": values should be equal")
    end
  end
  if expect.values_equal == false then
    local changed = 0
    for _, e in ipairs(rows.entries) do
      if not e.values_equal then changed = changed + 1 end
      -- A first Adam step moves every element whose gradient is not zero. Where this rank's
      -- shard got an all-zero gradient (ReLU units inactive for the whole input) the values
      -- stay, so those keys must compare equal instead.
      local moved = expect.moved == nil or expect.moved[e.key]
      assert.equal(not moved, e.values_equal, e.key .. (moved and ": values should differ" or
                   ": a shard without gradient should keep its values"))
    end
    assert.is_true(changed > 0, "no value changed")
  end
end

-- Keys whose local gradient shard has a non-zero element.
local function moved_keys(model)
  local moved = {}
  for name, p in model:named_parameters() do
    local g = p.grad:to_local()
    moved[name] = not ms.equal(g, ms.zeros_like(g))
  end
  return moved
end

describe("HSDP checkpoint", function()
  local dir
  before_each(store_dirs.before(function(path) dir = path end))
  after_each(store_dirs.after)

  for _, case in ipairs(MODELS) do
    local name, Model = case[1], case[2]

    it(("test_hsdp_checkpoint (%s)"):format(name), function()
      local results = dist.spawn(WORLD_SIZE, function(_, world_size)
        ms.manual_seed(0)
        local mesh_2d = dist.init_device_mesh({2, world_size / 2})
        local model = fsdp.FSDP(Model(), {sharding_strategy = "HYBRID_SHARD", device_mesh = mesh_2d})
        local opt = optim.Adam(model:parameters(), {lr = 0.1})
        fsdp.set_state_dict_type(model, "SHARDED_STATE_DICT")
        local state_dict = {model = model:state_dict()}
        local state_dict_to_save = deepcopy(state_dict)
        dcp.save(state_dict_to_save, dir)

        model(model:get_input()):sum():backward()
        local moved = moved_keys(model)
        opt:step()
        local before = compare(state_dict_to_save.model, model:state_dict(), local_values)

        dcp.load(state_dict_to_save, dir)
        model:load_state_dict(state_dict_to_save.model)
        local after = compare(state_dict_to_save.model, model:state_dict(), local_values)
        local placements = {}
        for k, v in pairs(state_dict_to_save.model) do
          placements[k] = tostring(v.placements[1]) .. ", " .. tostring(v.placements[2])
        end
        return {before = before, after = after, placements = placements, moved = moved}
      end)
      for _, res in ipairs(results) do
        assert_rows(res.before, {mesh_equal = true, placements_equal = true, values_equal = false, moved = res.moved})
        assert_rows(res.after, {mesh_equal = true, placements_equal = true, values_equal = true})
        for k, p in pairs(res.placements) do assert.equal("Replicate(), Shard(0)", p, k) end
      end
    end)

    it(("test_hsdp_fsdp_checkpoint_conversion (%s)"):format(name), function()
      local results = dist.spawn(WORLD_SIZE, function(_, world_size)
        ms.manual_seed(0)
        local mesh_2d = dist.init_device_mesh({2, world_size / 2})
        local hsdp_model = fsdp.FSDP(Model(), {sharding_strategy = "HYBRID_SHARD", device_mesh = mesh_2d})
        fsdp.set_state_dict_type(hsdp_model, "SHARDED_STATE_DICT")
        local hsdp_state_dict = {model = hsdp_model:state_dict()}
        dcp.save(hsdp_state_dict, dir)

        local mesh_1d = dist.init_device_mesh({world_size})
        local fsdp_model = fsdp.FSDP(Model(), {device_mesh = mesh_1d})
        fsdp.set_state_dict_type(fsdp_model, "SHARDED_STATE_DICT")
        local fsdp_state_dict = {model = fsdp_model:state_dict()}

        local function all_gathered(v1, v2)
          return v1:redistribute(mesh_2d, {ms.Replicate(), ms.Replicate()}):to_local(),
                 v2:redistribute(mesh_1d, {ms.Replicate()}):to_local()
        end
        local before = compare(hsdp_state_dict.model, fsdp_state_dict.model, all_gathered)

        dcp.load(fsdp_state_dict, dir)
        fsdp_model:load_state_dict(fsdp_state_dict.model)
        local state_dict_after_load = fsdp_model:state_dict()
        local after = compare(hsdp_state_dict.model, state_dict_after_load, all_gathered)
        return {before = before, after = after}
      end)
      for _, res in ipairs(results) do
        assert_rows(res.before, {mesh_equal = false, placements_equal = false, values_equal = false})
        assert_rows(res.after, {mesh_equal = false, placements_equal = false, values_equal = true})
      end
    end)
  end
end)
