-- Activation checkpointing and offload composed with FSDP on 2 ranks, case by case as in
-- the seed suite test_fsdp_checkpoint: checkpoint wrappers around FSDP units and FSDP
-- around checkpointed modules, a manual reentrant checkpoint around a whole FSDP model,
-- and checkpointed submodules of NO_SHARD units. Every variant must match the variant
-- without checkpointing bitwise, and activation offload must run exactly where asked.
local ms = require "moonshard"
local nn, ac, dist, fsdp = ms.nn, ms.ac, ms.dist, ms.fsdp

local function on_two_ranks(fn) return dist.spawn(2, fn) end

-- One spec per combination of cpu_offload x offload_activations x use_orig_params, each
-- running body(cpu_offload, offload_activations, use_orig_params) on 2 ranks.
local function for_each_parametrization(body)
  for _, cpu_offload in ipairs({true, false}) do
    for _, offload_activations in ipairs({true, false}) do
      for _, use_orig_params in ipairs({false, true}) do
        it(("cpu_offload=%s offload_activations=%s use_orig_params=%s"):format(
             tostring(cpu_offload), tostring(offload_activations), tostring(use_orig_params)), function()
          on_two_ranks(function() body(cpu_offload, offload_activations, use_orig_params) end)
        end)
      end
    end
  end
end

local function local_tensor(t) return ms.is_tensor(t) and t or t:to_local() end

local function grads_of(model)
  local grads = {}
  for _, p in ipairs(model:parameters()) do grads[#grads + 1] = local_tensor(p.grad) end
  return grads
end

-- Losses and outputs of every model equal the first model's; so do the gradients.
local function verify_parity(losses, outputs, models)
  assert.is_true(#losses > 0 and #outputs > 0 and #models > 0)
  for i = 2, #models do
    assert.is_true(ms.equal(losses[1], losses[i]), "loss of model " .. i)
    assert.is_true(ms.equal(outputs[1], outputs[i]), "output of model " .. i)
  end
  local reference = grads_of(models[1])
  for i = 2, #models do
    local grads = grads_of(models[i])
    assert.equal(#reference, #grads)
    for j = 1, #reference do
      assert.is_true(ms.equal(reference[j], grads[j]), ("gradient %d of model %d"):format(j, i))
    end
  end
end

-- Three Linear(3, 3) in an nn.Sequential named ffn; layers optionally checkpointed or
-- offloaded, then optionally each wrapped by FSDP.
local SequentialModule = nn.Module:extend("SequentialModule")
function SequentialModule:__init(opts)
  opts = opts or {}
  ms.manual_seed(0)
  local layers = {nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)}
  for i, layer in ipairs(layers) do
    if opts.checkpoint_layer then
      if opts.offload_activations then ac.offload_wrapper(layer) else ac.checkpoint_wrapper(layer) end
    end
    if opts.wrap_fsdp then layers[i] = fsdp.FSDP(layer, opts.fsdp_kwargs) end
  end
  self.ffn = nn.Sequential(layers)
end
function SequentialModule:forward(x) return self.ffn(x) end

local function fsdp_kwargs(cpu_offload, use_orig_params)
  return {cpu_offload = {offload_params = cpu_offload}, use_orig_params = use_orig_params}
end

-- Run one model's forward; returns its output and whether activation offload ran.
local function forward_counting_offload(call)
  local before = ac.stats()
  local out = call()
  local after = ac.stats()
  return out, after.offload_regions > before.offload_regions, after.offloaded_bytes - before.offloaded_bytes
end

describe("test_fsdp_checkpoint", function()
  describe("test_checkpoint_fsdp_wrapping", function()
    for_each_parametrization(function(cpu_offload, offload_activations, use_orig_params)
      local kwargs = fsdp_kwargs(cpu_offload, use_orig_params)
      local wrapper = offload_activations and ac.offload_wrapper or ac.checkpoint_wrapper
      -- checkpoint(FSDP(layer1), FSDP(layer2), ...)
      local ckpt_sequential_wrapped_fsdp = wrapper(SequentialModule({wrap_fsdp = true, fsdp_kwargs = kwargs}))
      -- FSDP(checkpoint(layer1)), FSDP(checkpoint(layer2)), ...
      local inner_ckpt = SequentialModule({checkpoint_layer = true, offload_activations = offload_activations,
                                           wrap_fsdp = true, fsdp_kwargs = kwargs})
      local baseline = SequentialModule({wrap_fsdp = true, fsdp_kwargs = kwargs})
      -- reentrant checkpointing needs inputs that require grad
      ms.manual_seed(1)
      local inp = ms.randn(10, 3, {requires_grad = true})
      local models = {ckpt_sequential_wrapped_fsdp, inner_ckpt, baseline}
      for _ = 1, 2 do
        local losses, outputs = {}, {}
        for _, m in ipairs(models) do
          local out, offloaded, bytes = forward_counting_offload(function() return m(inp) end)
          local expect_offload = m ~= baseline and offload_activations
          assert.equal(expect_offload, offloaded)
          assert.equal(expect_offload, bytes > 0)
          local loss = out:sum()
          loss:backward()
          losses[#losses + 1] = ms.keep(loss)
          outputs[#outputs + 1] = ms.keep(out)
        end
        verify_parity(losses, outputs, models)
      end
      dist.barrier()
    end)
  end)

  describe("test_basic_checkpoint_end_to_end", function()
    for_each_parametrization(function(cpu_offload, offload_activations, use_orig_params)
      local kwargs = fsdp_kwargs(cpu_offload, use_orig_params)
      local wrapper = offload_activations and ac.offload_wrapper or ac.checkpoint_wrapper
      -- FSDP with no checkpointing
      local fsdp_only_seq = fsdp.FSDP(SequentialModule(), kwargs)
      -- checkpoint-wrapped FSDP
      local checkpointed_fsdp = wrapper(fsdp.FSDP(SequentialModule(), kwargs))
      -- FSDP-wrapped checkpointed module
      local fsdp_wrapped_checkpoint = fsdp.FSDP(wrapper(SequentialModule()), kwargs)
      -- FSDP with a manual reentrant checkpoint around the whole model
      local fsdp_call_checkpoint = fsdp.FSDP(SequentialModule(), kwargs)
      ms.manual_seed(1)
      local inp = ms.randn(10, 3, {requires_grad = true})
      local models = {fsdp_only_seq, checkpointed_fsdp, fsdp_wrapped_checkpoint, fsdp_call_checkpoint}
      for _ = 1, 6 do
        local losses, outputs = {}, {}
        for _, m in ipairs(models) do
          local out, offloaded, bytes
          if m == fsdp_call_checkpoint then
            out, offloaded, bytes = forward_counting_offload(function()
              local function call() return ac.checkpoint(m, inp, {use_reentrant = true}) end
              if offload_activations then return ac.save_on_cpu(call, {pin_memory = true}) end
              return call()
            end)
            -- a reentrant region saves only its input (save_for_backward), which is offloaded
            assert.equal(offload_activations and inp:nbytes() or 0, bytes)
          else
            out, offloaded, bytes = forward_counting_offload(function() return m(inp) end)
            assert.equal(m ~= fsdp_only_seq and offload_activations, bytes > 0)
          end
          assert.equal(m ~= fsdp_only_seq and offload_activations, offloaded)
          local loss = out:sum()
          loss:backward()
          losses[#losses + 1] = ms.keep(loss)
          outputs[#outputs + 1] = ms.keep(out)
        end
        verify_parity(losses, outputs, models)
      end
      dist.barrier()
    end)
  end)

  describe("test_checkpoint_submodule", function()
    local CheckpointModule = nn.Module:extend("CheckpointModule")
    function CheckpointModule:__init(checkpoint, use_reentrant)
      local layers = {}
      for i = 1, 4 do layers[i] = nn.Linear(100, 100) end
      self.seq = nn.Sequential(layers)
      self.checkpoint, self.use_reentrant = checkpoint, use_reentrant
    end
    function CheckpointModule:forward(x)
      if self.checkpoint then return ac.checkpoint(self.seq, x, {use_reentrant = self.use_reentrant}) end
      return self.seq(x)
    end

    local ModelWithCheckpointSubmodule = nn.Module:extend("ModelWithCheckpointSubmodule")
    function ModelWithCheckpointSubmodule:__init(checkpoint, use_reentrant)
      self.l1 = nn.Linear(100, 100)
      self.s1 = CheckpointModule(checkpoint, use_reentrant)
      self.s2 = CheckpointModule(checkpoint, use_reentrant)
      self.relu = nn.ReLU()
      self.l2 = nn.Linear(100, 100)
    end
    function ModelWithCheckpointSubmodule:forward(x)
      return self.l2(self.relu(self.s2(self.s1(self.l1(x)))))
    end

    local TestModel = nn.Module:extend("TestModel")
    function TestModel:__init(checkpoint, use_reentrant)
      self.l1 = nn.Linear(100, 100)
      self.relu = nn.ReLU()
      self.checkpoint1 = ModelWithCheckpointSubmodule(checkpoint, use_reentrant)
      self.checkpoint2 = ModelWithCheckpointSubmodule(checkpoint, use_reentrant)
      self.l2 = nn.Linear(100, 100)
    end
    function TestModel:forward(x)
      return self.l2(self.relu(self.checkpoint2(self.checkpoint1(self.l1(x)))))
    end

    for _, use_reentrant in ipairs({false, true}) do
      it("use_reentrant=" .. tostring(use_reentrant), function()
        on_two_ranks(function()
          ms.manual_seed(0)
          local model = TestModel(false, use_reentrant)
          ms.manual_seed(0)
          local model_ac = TestModel(false, use_reentrant)
          for _, m in model_ac:named_modules() do
            if rawget(m, "_class") == CheckpointModule then m.checkpoint = true end
          end
          assert.is_true(model_ac.checkpoint1.s1.checkpoint)
          assert.is_true(model_ac.checkpoint2.s2.checkpoint)
          local kwargs = {sharding_strategy = "NO_SHARD"}
          model.checkpoint1 = fsdp.FSDP(model.checkpoint1, kwargs)
          model.checkpoint2 = fsdp.FSDP(model.checkpoint2, kwargs)
          model_ac.checkpoint1 = fsdp.FSDP(model_ac.checkpoint1, kwargs)
          model_ac.checkpoint2 = fsdp.FSDP(model_ac.checkpoint2, kwargs)
          ms.manual_seed(2)
          local x = ms.randn(2, 100)
          ac.reset_stats()
          model(x):sum():backward()
          assert.equal(0, ac.stats().recomputed)
          model_ac(x):sum():backward()
          assert.equal(4, ac.stats().recomputed)
          local names, names_ac = {}, {}
          for n, p in model:named_parameters() do names[#names + 1] = n; names[n] = local_tensor(p.grad) end
          for n, p in model_ac:named_parameters() do names_ac[#names_ac + 1] = n; names_ac[n] = local_tensor(p.grad) end
          assert.equal(#names, #names_ac)
          for i, n in ipairs(names) do
            assert.equal(n, names_ac[i])
            assert.is_true(ms.equal(names[n], names_ac[n]), "gradient of " .. n)
          end
        end)
      end)
    end
  end)
end)
