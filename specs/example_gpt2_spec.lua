-- The main job at GPT-2 size: the gpt2 preset's shape and tie (counted on the meta device,
-- without storage), its deferred initialisation bitwise equal to a full build, and
-- examples/train.lua --model gpt2 running a step on 4 ranks and saving a checkpoint.
local ms = require "moonshard"
local store_dirs = require "specs.support.store_dirs"
local dist, fsdp, dcp = ms.dist, ms.fsdp, ms.dcp

package.path = "examples/?.lua;" .. package.path
local gpt = require "gpt"
local global_state = require "support.global_state"

local VOCAB, SEQ = 76, 64

local function run(args)
  local pipe = io.popen("luajit examples/train.lua " .. args .. " 2>&1; echo \"exit=$?\"")
  local output = pipe:read("*a")
  pipe:close()
  return tonumber(output:match("exit=(%d+)%s*$")), output
end

before_each(global_state.save)
after_each(global_state.restore)

describe("the gpt2 preset", function()
  it("is GPT-2 small with tied embeddings, built on the meta device without storage", function()
    local before = ms.memory_stats("cpu").allocs
    local config = gpt.config("gpt2", {vocab = VOCAB, seq = SEQ})
    local model = ms.device("meta", function() return gpt.GPT(config) end)
    assert.are.equal(before, ms.memory_stats("cpu").allocs)
    local count = 0
    for _, p in model:named_parameters() do count = count + p:numel() end
    -- counted by hand: embeddings, 12 blocks (2 LayerNorms, qkv, attention projection, MLP), final LayerNorm
    local d = 768
    local block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert.are.equal(VOCAB * d + SEQ * d + 12 * block + 2 * d, count)
    assert.are.equal(model.transformer.wte.weight, model.lm_head.weight)
    assert.are.equal(12, model.transformer.h:len())
    assert.are.equal(12, model.transformer.h[1].attn.n_head)
  end)

  it("materialises shards bitwise equal to a full build (gpt2-tiny, same code path)", function()
    local results = dist.spawn(3, function()
      local config = gpt.config("gpt2-tiny", {vocab = VOCAB, seq = 16})
      ms.manual_seed(3)
      local full = gpt.GPT(config)
      local whole = {}
      for name, p in full:named_parameters() do whole[name] = p end
      ms.manual_seed(3)
      local model = ms.device("meta", function() return gpt.GPT(config) end)
      fsdp.FSDP(model, {auto_wrap_policy = fsdp.wrap_policy({gpt.Block}), param_init_fn = gpt.init_module})
      local bad, count = {}, 0
      for name, p in model:named_parameters() do
        count = count + 1
        local want = ms.distribute_tensor(whole[name], p.device_mesh, p.placements, {src_data_rank = false}):to_local()
        if not ms.equal(want, p:to_local()) then bad[#bad + 1] = name end
      end
      return {bad = bad, count = count, tied = model.lm_head.weight == model.transformer.wte.weight}
    end)
    for _, r in ipairs(results) do
      assert.are.same({}, r.bad)
      assert.are.equal(4 + 2 * 12, r.count)
      assert.is_true(r.tied)
    end
  end)

  it("calls the MLP's c_fc and gelu as modules once they carry hooks, and trains with an FSDP unit per Linear", function()
    ms.manual_seed(3)
    local config = {vocab = 16, seq = 8, layers = 2, dim = 32, heads = 4} -- untied: lm_head may be its own unit
    local model = gpt.GPT(config)
    local x = ms.randint(0, 16, {2, 8}, {dtype = "i64"})
    local fused = ms.no_grad(function() return model(x) end)
    local seen = 0
    local handle = model.transformer.h[1].mlp.c_fc:register_forward_hook(function() seen = seen + 1 end)
    local called = ms.no_grad(function() return model(x) end)
    handle.remove()
    assert.are.equal(1, seen)
    assert.is_true((called - fused):abs():max():item() < 1e-5)
    local results = dist.spawn(2, function()
      ms.manual_seed(3)
      local wrapped = fsdp.FSDP(gpt.GPT(config), {auto_wrap_policy = fsdp.wrap_policy({ms.nn.Linear})})
      local out = wrapped(x)
      out:sum():backward()
      return {max_diff = (out:detach() - fused):abs():max():item()}
    end)
    for _, r in ipairs(results) do assert.is_true(r.max_diff < 1e-5, "rank output differs by " .. r.max_diff) end
  end)

  it("names an unknown --model", function()
    local status, output = run("--model gpt5 --steps 1")
    assert.are.equal(1, status)
    assert.truthy(output:find("unknown --model 'gpt5' (expected gpt2 or gpt2-tiny)", 1, true), output)
  end)

  describe("in examples/train.lua #slow", function()
    local dir
    before_each(store_dirs.before(function(path) dir = path end))
    after_each(store_dirs.after)

    it("trains a step of gpt2 on 4 ranks with FULL_SHARD and checkpointing, and saves it", function()
      local status, output = run(("--model gpt2 --nproc 4 --strategy FULL_SHARD --ac full --steps 1 --batch 4 " ..
                                  "--seq 32 --sample 0 --ckpt %s/ckpt --out %s"):format(dir, dir))
      assert.are.equal(0, status, output)
      assert.truthy(output:find("model: 12 layers, dim 768, 12 heads, vocab 76, 85138944 parameters (tied embeddings)",
                                1, true), output)
      local peaks = output:match("s/step over 1 step%(s%); peak memory per rank %(MiB%): ([%d. ]+)")
      assert.is_not_nil(peaks, output)
      local count = 0
      for value in peaks:gmatch("[%d.]+") do
        count = count + 1
        assert.is_true(tonumber(value) > 85138944 * 4 / 4 / 2 ^ 20, "peak " .. value) -- at least the shards
      end
      assert.are.equal(4, count)
      local store = dcp.open(dir .. "/ckpt")
      assert.are.same({1}, store:steps())
      local names = {}
      for _, entry in ipairs(store:entries(1)) do names[entry.fqn] = true end
      store:close()
      assert.is_true(names["model.lm_head.weight"] ~= nil and names["model.transformer.wte.weight"] ~= nil)
    end)
  end)
end)
