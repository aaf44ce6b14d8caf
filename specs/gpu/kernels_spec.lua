-- Every CUDA kernel against the CPU backend on random inputs: each case runs the same Lua
-- code on cpu tensors and on their copies on cuda:0 and compares results and gradients.
-- Run with: busted --exclude-tags=none --tags=gpu specs/gpu
local ms = require "moonshard"
local gpu = require "gpu.helpers"
local F = ms.nn.F

-- Run fn on cpu inputs and on device copies; compare every result, and with grad the
-- gradients of sum(result * fixed weights) with respect to every float input.
local function parity(what, fn, inputs, opts)
  opts = opts or {}
  local cpu_inputs, device_inputs = {}, {}
  for i, x in ipairs(inputs) do
    local floating = x:dtype() == "f32" or x:dtype() == "f64"
    cpu_inputs[i] = x:detach():clone()
    device_inputs[i] = gpu.gpu(x:detach())
    if opts.grad and floating then
      cpu_inputs[i]:requires_grad_()
      device_inputs[i]:requires_grad_()
    end
  end
  local expected = fn(unpack(cpu_inputs))
  local got = fn(unpack(device_inputs))
  assert.are.equal(gpu.device, got:device(), what)
  gpu.assert_close(got, expected, opts.rtol, opts.atol, what)
  if not opts.grad then return end
  local weights = ms.randn(expected:shape(), {dtype = expected:dtype()})
  local cpu_total = (expected * weights):sum()
  local device_total = (got * gpu.gpu(weights)):sum()
  cpu_total:backward()
  device_total:backward()
  for i, x in ipairs(cpu_inputs) do
    if x.grad then
      gpu.assert_close(device_inputs[i].grad, x.grad, opts.rtol, opts.atol,
                       what .. ": gradient of input " .. i)
    end
  end
end

describe("CUDA kernels against the CPU backend #gpu", function()
  local missing = gpu.missing_devices(1)
  if missing then
    pending(missing)
    return
  end
  before_each(function() ms.manual_seed(1234) end)
  -- Tensors of a case are garbage once it ends: collect them, so later spec files that
  -- measure a pool (specs/gpu/memory_spec.lua, inherited by forked ranks) start from zero.
  after_each(function() collectgarbage(); collectgarbage() end)

  describe("copies", function()
    it("round-trips every dtype between cpu and cuda:0", function()
      for _, dtype in ipairs({"f32", "f64", "bf16", "f16", "i32", "i64", "u8"}) do
        local x = (ms.rand(5, 7, {dtype = "f64"}) * 200):to(dtype)
        gpu.assert_equal(gpu.gpu(x), x, dtype)
      end
    end)
    it("converts between dtypes on the device like the CPU", function()
      local x = ms.randn(6, 9, {dtype = "f64"}) * 1000
      for _, dtype in ipairs({"f32", "bf16", "f16", "i32", "i64", "u8"}) do
        gpu.assert_equal(gpu.gpu(x):to(dtype), x:to(dtype), "f64 -> " .. dtype)
      end
    end)
    it("copies transposed, narrowed and expanded views", function()
      local x = ms.randn(8, 5)
      parity("transpose", function(t) return t:t():contiguous() end, {x})
      parity("narrow", function(t) return t:narrow(1, 1, 3):contiguous() end, {x})
      parity("expand", function(t) return t:narrow(0, 0, 1):expand(4, 5):contiguous() end, {x})
      parity("reshape of a strided view", function(t) return t:t():reshape(40) end, {x})
    end)
    it("fills, counts with arange and compares on the device", function()
      local d = ms.zeros(3, 4, {device = gpu.device})
      d:fill_(2.5)
      gpu.assert_equal(d, ms.full({3, 4}, 2.5))
      assert.is_true(ms.equal(d, gpu.gpu(ms.full({3, 4}, 2.5))))
      assert.is_false(ms.equal(d, gpu.gpu(ms.full({3, 4}, 2.25))))
      assert.is_true(ms.allclose(d, gpu.gpu(ms.full({3, 4}, 2.5 + 1e-7)), {rtol = 1e-5}))
      gpu.assert_equal(ms.arange(10, {device = gpu.device}), ms.arange(10))
    end)
  end)

  describe("element-wise ops", function()
    it("runs every binary op with broadcasting", function()
      local a, b = ms.randn(4, 1, 6), ms.rand(5, 1) + 0.5
      for _, name in ipairs({"add", "sub", "mul", "div", "maximum", "minimum"}) do
        parity(name, function(x, y) return ms.Tensor[name](x, y) end, {a, b}, {grad = true})
      end
      parity("pow", function(x) return x:abs() ^ 1.7 end, {a}, {grad = true, rtol = 1e-4})
      for _, name in ipairs({"eq", "ne", "lt", "le", "gt", "ge"}) do
        parity(name, function(x, y) return ms.Tensor[name](x, y) end, {a, b})
      end
    end)
    it("runs scalar ops on floats and integer ops on i32 and i64", function()
      local a = ms.randn(7, 3, {dtype = "f64"})
      parity("scalar", function(x) return (x * 3 - 1) / 2 + (2 - x) end, {a}, {grad = true})
      for _, dtype in ipairs({"i32", "i64"}) do
        local i = (ms.rand(20) * 100):to(dtype)
        parity(dtype, function(x) return (x + x * 3 - 7):maximum(x) end, {i})
      end
    end)
    it("runs every unary op and the activations' backward", function()
      local x = ms.randn(33, 17, {dtype = "f64"})
      local positive = x:abs() + 0.1
      for _, name in ipairs({"neg", "exp", "sin", "cos", "abs", "tanh", "sigmoid", "relu",
                             "gelu", "square", "sign"}) do
        parity(name, function(t) return ms.Tensor[name](t) end, {x}, {grad = name ~= "sign"})
      end
      for _, name in ipairs({"log", "sqrt", "rsqrt", "reciprocal"}) do
        parity(name, function(t) return ms.Tensor[name](t) end, {positive}, {grad = true})
      end
      parity("gelu tanh", function(t) return F.gelu(t, {approximate = "tanh"}) end, {x},
             {grad = true})
    end)
  end)

  describe("reductions", function()
    it("sums, averages and takes extremes over any dims", function()
      local x = ms.randn(6, 5, 4)
      for _, dim in ipairs({0, 1, 2}) do
        parity("sum " .. dim, function(t) return t:sum(dim) end, {x}, {grad = true})
        parity("mean " .. dim, function(t) return t:mean(dim, true) end, {x}, {grad = true})
        parity("max " .. dim, function(t) return t:max(dim) end, {x})
        parity("min " .. dim, function(t) return t:min(dim) end, {x})
        parity("argmax " .. dim, function(t) return t:argmax(dim) end, {x})
      end
      parity("sum of everything", function(t) return t:sum() end, {ms.randn(300, 301)},
             {grad = true, rtol = 1e-4})
      local long = ms.randn(3, 300000) -- long rows are split into chunks on the device
      parity("chunked sum", function(t) return t:sum(1) end, {long}, {rtol = 1e-4, atol = 1e-3})
      parity("chunked mean", function(t) return t:mean(1) end, {long}, {rtol = 1e-4, atol = 1e-6})
      parity("chunked max", function(t) return t:max(1) end, {long})
    end)
  end)

  describe("matrix multiply (cuBLAS)", function()
    it("multiplies 2-D, batched, transposed and shared-b operands", function()
      for _, dtype in ipairs({"f32", "f64"}) do
        local o = {dtype = dtype}
        local tol = {grad = true, rtol = dtype == "f32" and 1e-4 or 1e-10, atol = 1e-5}
        parity("mm " .. dtype, function(a, b) return a:matmul(b) end,
               {ms.randn(17, 9, o), ms.randn(9, 13, o)}, tol)
        parity("transposed " .. dtype, function(a, b) return a:t():matmul(b:t()) end,
               {ms.randn(9, 17, o), ms.randn(13, 9, o)}, tol)
        parity("bmm " .. dtype, function(a, b) return a:bmm(b) end,
               {ms.randn(3, 5, 7, o), ms.randn(3, 7, 4, o)}, tol)
        parity("linear " .. dtype, function(x, w, b) return F.linear(x, w, b) end,
               {ms.randn(2, 6, 8, o), ms.randn(5, 8, o), ms.randn(5, o)}, tol)
        parity("strided batches " .. dtype,
               function(a, b) return a:permute(1, 0, 2):bmm(b) end,
               {ms.randn(5, 3, 7, o), ms.randn(3, 7, 4, o)}, tol)
      end
    end)
  end)

  describe("softmax, layer norm, embedding and losses", function()
    it("matches softmax and log_softmax with their gradients", function()
      local x = ms.randn(7, 300)
      parity("softmax", function(t) return t:softmax(1) end, {x}, {grad = true})
      parity("log_softmax", function(t) return t:log_softmax(1) end, {x}, {grad = true})
      parity("softmax dim 0", function(t) return t:softmax(0) end, {x}, {grad = true})
    end)
    it("matches layer norm forward and every gradient", function()
      parity("layer_norm", function(x, w, b) return F.layer_norm(x, {64}, w, b, 1e-5) end,
             {ms.randn(3, 5, 64), ms.randn(64), ms.randn(64)}, {grad = true, rtol = 1e-4, atol = 1e-5})
    end)
    -- 700 rows span three of the kernels' 256-row chunks and 100 columns a ragged last tile
    -- of 32 (kernels/column_sums.cuh), so the parameter gradients cross both.
    it("matches layer norm's parameter gradients summed over many rows", function()
      parity("layer_norm rows", function(x, w, b) return F.layer_norm(x, {100}, w, b, 1e-5) end,
             {ms.randn(7, 100, 100), ms.randn(100), ms.randn(100)},
             {grad = true, rtol = 1e-4, atol = 1e-4})
    end)
    it("matches linear + GELU fused, with its bias gradient over many rows", function()
      for _, approximate in ipairs({"none", "tanh"}) do
        parity("linear_gelu " .. approximate, function(x, w, b)
          return F.linear_gelu(x, w, b, {approximate = approximate})
        end, {ms.randn(700, 48), ms.randn(100, 48), ms.randn(100)},
               {grad = true, rtol = 1e-4, atol = 1e-4})
      end
    end)
    it("matches the embedding lookup and its accumulated gradient", function()
      local indices = ms.randint(0, 10, {4, 6})
      parity("embedding", function(w, i) return F.embedding(i, w) end,
             {ms.randn(10, 8), indices}, {grad = true})
    end)
    it("matches cross entropy and nll with ignored targets", function()
      local target = ms.randint(0, 9, {12})
      target:narrow(0, 3, 2):fill_(-100)
      parity("cross_entropy", function(x, t) return F.cross_entropy(x, t) end,
             {ms.randn(12, 9), target}, {grad = true, rtol = 1e-4})
      parity("nll sum", function(x, t) return F.nll_loss(x:log_softmax(1), t, {reduction = "sum"}) end,
             {ms.randn(12, 9), target}, {grad = true, rtol = 1e-4})
    end)
    it("matches the fused cross entropy for every reduction, f32 and f64, [N, C, d]", function()
      for _, dtype in ipairs({"f32", "f64"}) do
        for _, reduction in ipairs({"none", "sum", "mean"}) do
          local target = ms.randint(0, 7, {3, 4})
          target:narrow(1, 1, 1):fill_(-100)
          parity("cross_entropy " .. dtype .. " " .. reduction, function(x, t)
            return F.cross_entropy(x, t, {reduction = reduction})
          end, {ms.randn(3, 7, 4, {dtype = dtype}), target}, {grad = true, rtol = 1e-4})
        end
      end
    end)
    it("matches flash-style attention, causal and with a boolean mask", function()
      for _, dtype in ipairs({"f32", "f64"}) do
        parity("attention causal " .. dtype, function(q, k, v)
          return F.scaled_dot_product_attention(q, k, v, {is_causal = true})
        end, {ms.randn(2, 3, 40, 8, {dtype = dtype}), ms.randn(2, 3, 40, 8, {dtype = dtype}),
              ms.randn(2, 3, 40, 6, {dtype = dtype})}, {grad = true, rtol = 1e-4, atol = 1e-5})
        local keep = ms.randint(0, 2, {7, 9})
        keep:narrow(1, 0, 1):fill_(1)
        parity("attention mask " .. dtype, function(q, k, v, m)
          return F.scaled_dot_product_attention(q, k, v, {attn_mask = m})
        end, {ms.randn(3, 7, 4, {dtype = dtype}), ms.randn(3, 9, 4, {dtype = dtype}),
              ms.randn(3, 9, 5, {dtype = dtype}), keep}, {grad = true, rtol = 1e-4, atol = 1e-5})
      end
    end)
    it("reports a bad index or target on the device", function()
      local weight = ms.randn(4, 3, {device = gpu.device})
      local bad = ms.tensor({1, 7}, {dtype = "i64"}):to(gpu.device)
      local ok, err = pcall(F.embedding, bad, weight)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("index 7 at position 1", 1, true), tostring(err))
    end)
  end)

  describe("random numbers and dropout", function()
    it("draws the same counter-based numbers as the CPU", function()
      ms.manual_seed(7)
      local cpu_draw = ms.rand(1000, {dtype = "f64"})
      ms.manual_seed(7)
      local device_draw = ms.rand(1000, {dtype = "f64", device = gpu.device})
      gpu.assert_close(device_draw, cpu_draw, 0, 0, "uniform")
      ms.manual_seed(7)
      local cpu_normal = ms.randn(1000, {dtype = "f64"})
      ms.manual_seed(7)
      gpu.assert_close(ms.randn(1000, {dtype = "f64", device = gpu.device}), cpu_normal, 1e-12, 1e-12,
                       "normal")
    end)
    it("drops the same elements as the CPU", function()
      local x = ms.randn(50, 40)
      ms.manual_seed(3)
      local cpu_out = F.dropout(x, 0.3, true)
      ms.manual_seed(3)
      local device_out = F.dropout(gpu.gpu(x), 0.3, true)
      gpu.assert_equal(device_out:ne(0), cpu_out:ne(0), "mask")
      gpu.assert_close(device_out, cpu_out, 1e-6, 1e-6, "values")
    end)
  end)

  describe("fused optimizer steps", function()
    for _, case in ipairs({
      {"SGD with momentum", function(p) return ms.optim.SGD(p, {lr = 0.1, momentum = 0.9, nesterov = true}) end},
      {"Adam", function(p) return ms.optim.Adam(p, {lr = 0.01, weight_decay = 0.1}) end},
      {"AdamW", function(p) return ms.optim.AdamW(p, {lr = 0.01, weight_decay = 0.1}) end},
    }) do
      it("takes the same " .. case[1] .. " steps", function()
        local start = ms.randn(40, 3)
        local cpu_param = start:clone():requires_grad_()
        local device_param = gpu.gpu(start):requires_grad_()
        local cpu_opt, device_opt = case[2]({cpu_param}), case[2]({device_param})
        for step = 1, 3 do
          local g = ms.randn(40, 3)
          cpu_param.grad, device_param.grad = ms.keep(g), ms.keep(gpu.gpu(g))
          cpu_opt:step()
          device_opt:step()
          gpu.assert_close(device_param, cpu_param:detach(), 1e-5, 1e-6, case[1] .. " step " .. step)
        end
      end)
    end
  end)

  describe("the cuda:0 pool", function()
    it("counts device allocations exactly and caches freed blocks", function()
      ms.empty_cache(gpu.device)
      local before = ms.memory_stats(gpu.device)
      local t = ms.keep(ms.empty(1000, {device = gpu.device}))
      assert.are.equal(before.allocated + 4000, ms.memory_stats(gpu.device).allocated)
      t:_release()
      local after = ms.memory_stats(gpu.device)
      assert.are.equal(before.allocated, after.allocated)
      assert.is_true(after.reserved > before.reserved)
      ms.empty_cache(gpu.device)
      assert.are.equal(before.reserved, ms.memory_stats(gpu.device).reserved)
    end)
    it("refuses operands on different pools with a clear error", function()
      if gpu.device == "host" then return pending("cpu and host operands mix by design") end
      local ok, err = pcall(function() return gpu.gpu(ms.ones(3)) + ms.ones(3) end)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("lives on cpu", 1, true), tostring(err))
    end)
  end)
end)
