-- Flash-style attention (ms_attention): scaled_dot_product_attention a query row at a time
-- over tiles of keys, against the composition matmul + mask + softmax + matmul (the path
-- dropout takes) in f64 and f32, causal, with boolean and float masks, key counts across
-- tile edges; finite differences in f64; no [L, S] tensor made; the C checks.
local ffi = require "ffi"
local ms = require "moonshard"
local gradcheck = require "support.gradcheck"
local F = ms.nn.F
local lib = require("moonshard.ffi").lib

-- The composition: the dropout path with a p that keeps everything (scale 1 / (1 - 1e-300) = 1).
local function composed(q, k, v, opts)
  opts = opts or {}
  return F.scaled_dot_product_attention(q, k, v, {attn_mask = opts.attn_mask, is_causal = opts.is_causal,
                                                  scale = opts.scale, dropout_p = 1e-300})
end

local function leaf(shape, dtype, seed)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return ms.tensor(gradcheck.values(n, -2, 2, seed), {dtype = dtype}):view(shape):requires_grad_()
end

local function max_diff(a, b) return (a - b):abs():max():item() end

-- fn's tensors (a list) made at 1 thread and at 2 are bitwise the same.
local function same_at_1_and_2_threads(fn)
  local saved = ms.get_num_threads()
  local results = {}
  for i, threads in ipairs({1, 2}) do
    ms.set_num_threads(threads)
    results[i] = fn()
  end
  ms.set_num_threads(saved)
  for i = 1, #results[1] do assert.is_true(ms.equal(results[1][i], results[2][i]), "result " .. i) end
end

-- Output and gradients (of sum(out * w)) of the fused and composed paths agree within tol.
local function agrees(q, k, v, opts, tol)
  local out = F.scaled_dot_product_attention(q, k, v, opts)
  local ref = composed(q, k, v, opts)
  assert.is_true(max_diff(out, ref) <= tol, "forward " .. max_diff(out, ref))
  local w = leaf(out:shape(), out:dtype(), 99):detach()
  local got = ms.autograd.grad({(out * w):sum()}, {q, k, v})
  local want = ms.autograd.grad({(ref * w):sum()}, {q, k, v})
  for i = 1, 3 do
    assert.is_true(max_diff(got[i], want[i]) <= tol, "gradient " .. i .. ": " .. max_diff(got[i], want[i]))
  end
end

local function tril(l, s)
  local rows = {}
  for i = 1, l do
    rows[i] = {}
    for j = 1, s do rows[i][j] = j <= i and 1 or 0 end
  end
  return ms.tensor(rows, {dtype = "i64"})
end

describe("flash-style scaled_dot_product_attention", function()

  for _, keys in ipairs({1, 31, 32, 33, 70}) do
    it("equals the composition in f64 with " .. keys .. " keys, causal or not", function()
      local q, k, v = leaf({2, 3, keys, 8}, "f64", 1), leaf({2, 3, keys, 8}, "f64", 2), leaf({2, 3, keys, 5}, "f64", 3)
      agrees(q, k, v, {}, 1e-12)
      agrees(q, k, v, {is_causal = true}, 1e-12)
      -- is_causal keeps key j <= query i, as a lower-triangular boolean mask does
      local out = F.scaled_dot_product_attention(q, k, v, {is_causal = true})
      assert.is_true(max_diff(out, composed(q, k, v, {attn_mask = tril(keys, keys)})) <= 1e-12)
    end)
  end

  it("equals the composition with boolean and float masks, more keys than queries, 3-D", function()
    local q, k, v = leaf({4, 6, 8}, "f64", 4), leaf({4, 40, 8}, "f64", 5), leaf({4, 40, 3}, "f64", 6)
    local keep = ms.randint(0, 2, {6, 40}, {dtype = "i64"})
    keep:narrow(1, 0, 1):fill_(1) -- every query keeps a key
    agrees(q, k, v, {attn_mask = keep}, 1e-12)
    agrees(q, k, v, {attn_mask = leaf({1, 6, 40}, "f64", 7):detach(), scale = 0.3}, 1e-12)
  end)

  it("agrees with the composition in f32 within rounding", function()
    local q, k, v = leaf({2, 4, 64, 16}, "f32", 8), leaf({2, 4, 64, 16}, "f32", 9), leaf({2, 4, 64, 16}, "f32", 10)
    agrees(q, k, v, {is_causal = true}, 2e-5)
  end)

  it("matches finite differences in f64", function()
    local mask = ms.tensor({{0, -1.5, 0.5}, {0.25, 0, -math.huge}}, {dtype = "f64"})
    local ok, message = gradcheck.check(function(q, k, v)
      return F.scaled_dot_product_attention(q, k, v, {attn_mask = mask})
    end, {gradcheck.input({2, 2, 4}, {seed = 1}), gradcheck.input({2, 3, 4}, {seed = 2}),
          gradcheck.input({2, 3, 2}, {seed = 3})})
    assert.is_true(ok, message)
    ok, message = gradcheck.check(function(q, k, v)
      return F.scaled_dot_product_attention(q, k, v, {is_causal = true})
    end, {gradcheck.input({1, 2, 35, 3}, {seed = 4}), gradcheck.input({1, 2, 35, 3}, {seed = 5}),
          gradcheck.input({1, 2, 35, 2}, {seed = 6})})
    assert.is_true(ok, message)
  end)

  it("keeps the composition for a float mask that needs its gradient", function()
    local q = leaf({2, 5, 4}, "f64", 11)
    local mask = leaf({5, 5}, "f64", 12)
    local out = F.scaled_dot_product_attention(q, q, q, {attn_mask = mask})
    out:sum():backward()
    assert.is_not_nil(mask.grad)
  end)

  it("makes no [L, S] tensor", function()
    local l = 256
    local q = ms.randn(1, 1, l, 16)
    collectgarbage()
    local base = ms.memory_stats("cpu").allocated
    ms.reset_peak_memory_stats("cpu")
    ms.no_grad(function() F.scaled_dot_product_attention(q, q, q, {is_causal = true}):free() end)
    local fused = ms.memory_stats("cpu").peak - base
    ms.reset_peak_memory_stats("cpu")
    ms.no_grad(function() composed(q, q, q, {is_causal = true}):free() end)
    local whole = ms.memory_stats("cpu").peak - base
    assert.is_true(fused < l * l * 4 / 4, "fused peak " .. fused)
    assert.is_true(whole >= l * l * 4)
  end)

  it("is on by default, switched off by ms.backends.enable_flash_sdp(false) and on the CPU by enable_cpu_flash_sdp(false)", function()
    local q = ms.randn(1, 8, 4)
    local function attention_ops()
      local p = ms.profiler.profile(function()
        ms.no_grad(function() F.scaled_dot_product_attention(q, q, q) end)
      end)
      return p.by_key.attention.count
    end
    assert.is_true(ms.backends.flash_sdp_enabled())
    assert.is_true(ms.backends.cpu_flash_sdp_enabled())
    assert.equal(1, attention_ops())
    ms.backends.enable_flash_sdp(false)
    local off = attention_ops()
    ms.backends.enable_flash_sdp(true)
    assert.is_true(off >= 4)
    ms.backends.enable_cpu_flash_sdp(false)
    local cpu_off = attention_ops()
    ms.backends.enable_cpu_flash_sdp(true)
    assert.is_true(cpu_off >= 4)
  end)

  it("ms_attention names a k of the wrong shape and a strided last dim", function()
    local q, k, v = ms.randn(2, 5, 4), ms.randn(2, 6, 3), ms.randn(2, 6, 4)
    local out, lse = ms.empty(2, 5, 4), ms.empty(2, 5)
    local status = lib.ms_attention(out._c, lse._c, q._c, k._c, v._c, nil, 0.5, 0)
    assert.equal(lib.MS_ERR_SHAPE, status)
    assert.matches("attention: k", ffi.string(lib.ms_last_error()))
    local strided = ms.randn(2, 4, 5):transpose(1, 2)
    status = lib.ms_attention(out._c, lse._c, strided._c, ms.randn(2, 6, 4)._c, v._c, nil, 0.5, 0)
    assert.equal(lib.MS_ERR_INVALID, status)
    assert.matches("attention: q needs a unit stride in its last dim", ffi.string(lib.ms_last_error()))
  end)
end)

-- Every value of a and b (any dims) within tol * (1 + |b|), NaN where the other is NaN.
local function assert_close(a, b, tol, what)
  local fa, fb = a:to("f64"):reshape(-1):table(), b:to("f64"):reshape(-1):table()
  assert.are.equal(#fb, #fa)
  for i = 1, #fa do
    local x, y = fa[i], fb[i]
    if y ~= y then
      assert.is_true(x ~= x, what .. ": element " .. i .. " is " .. x .. ", expected NaN")
    else
      assert.is_true(math.abs(x - y) <= tol * (1 + math.abs(y)), what .. ": element " .. i .. " is " .. x .. ", expected " .. y)
    end
  end
end

-- f32 flash attention and its gradients (of sum(out * w)) against the f64 composition of
-- the same values.
local function agrees_with_f64(q, k, v, opts)
  local out = F.scaled_dot_product_attention(q, k, v, opts)
  local q64, k64, v64 = q:detach():to("f64"):requires_grad_(), k:detach():to("f64"):requires_grad_(),
                        v:detach():to("f64"):requires_grad_()
  local opts64 = {}
  for key, value in pairs(opts) do opts64[key] = value end
  if opts.attn_mask and opts.attn_mask:dtype() == "f32" then opts64.attn_mask = opts.attn_mask:to("f64") end
  local ref = composed(q64, k64, v64, opts64)
  assert_close(out, ref, 2e-5, "out")
  local w = leaf(out:shape(), "f64", 98):detach()
  local got = ms.autograd.grad({(out * w:to("f32")):sum()}, {q, k, v})
  local want = ms.autograd.grad({(ref * w):sum()}, {q64, k64, v64})
  for i, name in ipairs({"dq", "dk", "dv"}) do assert_close(got[i], want[i], 1e-4, name) end
  return out, got
end

describe("f32 flash attention in blocks of query rows", function()

  it("crosses row blocks (2000 keys: blocks of 32 rows), causal or not, more keys than queries", function()
    local q, k, v = leaf({2, 3, 100, 16}, "f32", 21), leaf({2, 3, 2000, 16}, "f32", 22), leaf({2, 3, 2000, 8}, "f32", 23)
    agrees_with_f64(q, k, v, {})
    agrees_with_f64(q, k, v, {is_causal = true})
  end)

  it("causal over a partial last block, and with more queries than keys", function()
    agrees_with_f64(leaf({1, 300, 8}, "f32", 24), leaf({1, 300, 8}, "f32", 25), leaf({1, 300, 8}, "f32", 26),
                    {is_causal = true})
    agrees_with_f64(leaf({50, 4}, "f32", 27), leaf({20, 4}, "f32", 28), leaf({20, 6}, "f32", 29), {is_causal = true})
  end)

  it("with broadcast boolean and float masks, a row whose keys are all masked giving 0", function()
    local q, k, v = leaf({2, 2, 40, 8}, "f32", 30), leaf({2, 2, 70, 8}, "f32", 31), leaf({2, 2, 70, 8}, "f32", 32)
    local keep = ms.randint(0, 2, {40, 70}, {dtype = "i64"})
    keep:narrow(1, 0, 1):fill_(1)
    keep:narrow(0, 5, 1):fill_(0) -- query 5 sees no key
    local out = agrees_with_f64(q, k, v, {attn_mask = keep})
    for _, value in ipairs(out:narrow(2, 5, 1):reshape(-1):table()) do assert.are.equal(0, value) end
    agrees_with_f64(q, k, v, {attn_mask = leaf({2, 1, 40, 70}, "f32", 33):detach(), scale = 0.2})
  end)

  it("reads heads in place from a fused projection and an expanded key", function()
    local batch, time, heads, dim = 2, 48, 4, 8
    local qkv = leaf({batch, time, 3 * heads * dim}, "f32", 34)
    local parts = qkv:split(heads * dim, 2)
    local function split_heads(t) return t:view(batch, time, heads, dim):transpose(1, 2) end
    local q, k, v = split_heads(parts[1]), split_heads(parts[2]), split_heads(parts[3])
    assert.is_false(q:is_contiguous())
    agrees_with_f64(q, k, v, {is_causal = true})
    local one_key = leaf({batch, heads, 1, dim}, "f32", 35)
    agrees_with_f64(q, one_key:expand(batch, heads, time, dim), v, {})
  end)

  it("with no keys gives zeros and zero gradients, as the composition does", function()
    local q, k, v = leaf({2, 3, 4}, "f32", 39), leaf({2, 0, 4}, "f32", 40), leaf({2, 0, 5}, "f32", 41)
    local out = F.scaled_dot_product_attention(q, k, v)
    assert.are.same({2, 3, 5}, out:shape())
    assert.is_true(ms.equal(out, composed(q, k, v)))
    assert.are.equal(0, out:abs():sum():item())
    local grads = ms.autograd.grad({out:sum()}, {q, k, v})
    assert.are.equal(0, grads[1]:abs():sum():item())
    assert.are.equal(0, grads[2]:numel())
  end)

  it("gives bitwise the same values and gradients with 1 and 2 threads", function()
    same_at_1_and_2_threads(function()
      local q, k, v = leaf({4, 8, 64, 32}, "f32", 36), leaf({4, 8, 64, 32}, "f32", 37), leaf({4, 8, 64, 32}, "f32", 38)
      local out = F.scaled_dot_product_attention(q, k, v, {is_causal = true})
      local grads = ms.autograd.grad({(out * out):sum()}, {q, k, v})
      return {out, grads[1], grads[2], grads[3]}
    end)
  end)
end)

describe("causal_self_attention over a packed [B, T, 3C] projection", function()

  -- q, k and v as CausalSelfAttention used to make them: split qkv, view the heads.
  local function split_heads(qkv, heads, opts)
    local batch, time = qkv:size(0), qkv:size(1)
    local dim = qkv:size(2) / (3 * heads)
    local parts = qkv:split(heads * dim, 2)
    local function view(t) return t:reshape(batch, time, heads, dim):transpose(1, 2) end
    local out = F.scaled_dot_product_attention(view(parts[1]), view(parts[2]), view(parts[3]), opts)
    return out:transpose(1, 2):reshape(batch, time, heads * dim)
  end

  local function output_and_gradient(fn, qkv, w)
    local x = qkv:detach():requires_grad_()
    local out = fn(x)
    return out, ms.autograd.grad({(out * w):sum()}, {x})[1]
  end

  for _, case in ipairs({{2, 5, 4, 3, "f64"}, {3, 70, 2, 8, "f64"}, {2, 48, 4, 8, "f32"}, {1, 1, 1, 1, "f32"}}) do
    local batch, time, heads, dim, dtype = unpack(case)
    it(("gives the heads' attention side by side, and its gradient, for [%d, %d, 3 x %d x %d] %s"):format(
         batch, time, heads, dim, dtype), function()
      local qkv = leaf({batch, time, 3 * heads * dim}, dtype, 51)
      local w = leaf({batch, time, heads * dim}, dtype, 52):detach()
      local out, grad = output_and_gradient(function(x) return F.causal_self_attention(x, heads) end, qkv, w)
      assert.are.same({batch, time, heads * dim}, out:shape())
      assert.are.same({batch, time, 3 * heads * dim}, grad:shape())
      -- the composition (matmul + causal mask + softmax + matmul) per head
      local ref, ref_grad = output_and_gradient(function(x)
        return split_heads(x, heads, {is_causal = true, dropout_p = 1e-300})
      end, qkv, w)
      local tol = dtype == "f64" and 1e-12 or 2e-5
      assert.is_true(max_diff(out, ref) <= tol, "forward " .. max_diff(out, ref))
      assert.is_true(max_diff(grad, ref_grad) <= 2 * tol, "gradient " .. max_diff(grad, ref_grad))
      -- the same kernel reached through split heads: the same bits
      local split, split_grad = output_and_gradient(function(x) return split_heads(x, heads, {is_causal = true}) end,
                                                    qkv, w)
      assert.is_true(ms.equal(out, split))
      assert.is_true(ms.equal(grad, split_grad))
    end)
  end

  it("writes dq, dk and dv into one [B, T, 3C] gradient, with no other tensor made", function()
    local batch, time, heads, dim = 2, 32, 4, 16
    local qkv = leaf({batch, time, 3 * heads * dim}, "f32", 53)
    local out = F.causal_self_attention(qkv, heads)
    local g = ms.randn(batch, time, heads * dim)
    collectgarbage()
    local base = ms.memory_stats("cpu").allocated
    ms.reset_peak_memory_stats("cpu")
    out:backward(g)
    local gradient_bytes = batch * time * 3 * heads * dim * 4
    assert.are.equal(gradient_bytes, ms.memory_stats("cpu").peak - base)
    assert.are.same({batch, time, 3 * heads * dim}, qkv.grad:shape())
  end)

  it("reads a qkv that is not contiguous, and gives its gradient in qkv's shape", function()
    local base = leaf({40, 2, 3 * 2 * 4}, "f64", 54)
    local qkv = base:transpose(0, 1)
    assert.is_false(qkv:is_contiguous())
    local w = leaf({2, 40, 8}, "f64", 55):detach()
    local out = F.causal_self_attention(qkv, 2)
    local ref = split_heads(qkv, 2, {is_causal = true, dropout_p = 1e-300})
    assert.is_true(max_diff(out, ref) <= 1e-12)
    local got = ms.autograd.grad({(out * w):sum()}, {base})[1]
    local want = ms.autograd.grad({(ref * w):sum()}, {base})[1]
    assert.is_true(max_diff(got, want) <= 1e-12)
  end)

  it("with dropout composes the ops, as scaled_dot_product_attention does", function()
    local qkv = leaf({2, 6, 3 * 2 * 4}, "f64", 56)
    local function attention_ops(opts)
      return ms.profiler.profile(function() F.causal_self_attention(qkv, 2, opts) end).by_key.attention.count
    end
    assert.are.equal(1, attention_ops())
    assert.is_true(attention_ops({dropout_p = 1e-300}) >= 4)
    local kept = F.causal_self_attention(qkv, 2, {dropout_p = 1e-300})
    assert.is_true(max_diff(kept, F.causal_self_attention(qkv, 2)) <= 1e-12)
    ms.manual_seed(3)
    local dropped = F.causal_self_attention(qkv, 2, {dropout_p = 0.5})
    assert.is_true(max_diff(dropped, kept) > 1e-3)
  end)

  it("gives an empty [B, T, C] and a zero gradient for no batch or no time steps", function()
    for _, shape in ipairs({{0, 3, 12}, {2, 0, 12}}) do
      local qkv = ms.zeros(shape[1], shape[2], shape[3]):requires_grad_()
      local out = F.causal_self_attention(qkv, 2)
      assert.are.same({shape[1], shape[2], 4}, out:shape())
      out:sum():backward()
      assert.are.same(shape, qkv.grad:shape())
    end
  end)

  it("gives bitwise the same values and gradients with 1 and 2 threads", function()
    same_at_1_and_2_threads(function()
      local qkv = leaf({4, 64, 3 * 8 * 32}, "f32", 57)
      local out = F.causal_self_attention(qkv, 8)
      return {out, ms.autograd.grad({(out * out):sum()}, {qkv})[1]}
    end)
  end)

  it("names a qkv whose width is not 3 x heads x head_dim, a qkv not 3-D and bad heads", function()
    local function raises(pattern, fn)
      local ok, err = pcall(fn)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(pattern, 1, true), tostring(err))
    end
    raises("qkv must be [B, T, 3 * heads * head_dim] with 2 heads, got shape [1, 3, 10]",
           function() F.causal_self_attention(ms.zeros(1, 3, 10), 2) end)
    raises("qkv must be [B, T, 3 * heads * head_dim] with 1 heads, got shape [3, 6]",
           function() F.causal_self_attention(ms.zeros(3, 6), 1) end)
    raises("heads must be a positive whole number, got number 0", function() F.causal_self_attention(ms.zeros(1, 3, 6), 0) end)
    raises("heads must be a positive whole number, got number 1.5",
           function() F.causal_self_attention(ms.zeros(1, 3, 6), 1.5) end)
    raises("heads must be a positive whole number, got string 2",
           function() F.causal_self_attention(ms.zeros(1, 3, 6), "2") end)
    raises("qkv must be a tensor", function() F.causal_self_attention(nil, 1) end)
  end)
end)
