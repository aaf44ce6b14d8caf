-- Batched matmul hands strided operands to BLAS as they are: attention's heads, a
-- [B, T, H, D] tensor viewed as [B, H, T, D], and keys transposed in their last two dims,
-- multiply without a copy (the product is the only allocation) and give the product of the
-- dense f64 copies, batch by batch.
local ms = require "moonshard"
local global_state = require "support.global_state"

before_each(global_state.save)
after_each(global_state.restore)

local function heads(x, b, t, h, d) return x:reshape(b, t, h, d):transpose(1, 2) end

describe("batched matmul of strided views", function()
  it("reads transposed heads and keys in place and matches the f64 product", function()
    ms.manual_seed(3)
    local B, T, H, D = 2, 5, 3, 4
    local qkv = ms.randn(B, T, 3 * H * D)
    local parts = qkv:split(H * D, 2)
    local q, k = heads(parts[1], B, T, H, D), heads(parts[2], B, T, H, D)
    assert.is_false(q:is_contiguous())
    collectgarbage("collect")
    collectgarbage("stop")
    local base = ms.memory_stats().allocated
    ms.reset_peak_memory_stats()
    local scores = ms.matmul(q, k:transpose(-2, -1))
    local peak = ms.memory_stats().peak - base
    collectgarbage("restart")
    assert.are.same({B, H, T, T}, scores:shape())
    assert.equal(scores:nbytes(), peak)
    local q64, k64 = q:to("f64"):contiguous(), k:to("f64"):contiguous()
    for b = 0, B - 1 do
      for h = 0, H - 1 do
        local want = ms.matmul(q64:select(0, b):select(0, h), k64:select(0, b):select(0, h):transpose(0, 1)):table()
        local got = scores:select(0, b):select(0, h):table()
        for i = 1, T do
          for j = 1, T do
            assert.is_true(math.abs(got[i][j] - want[i][j]) <= 1e-5 * math.max(1, math.abs(want[i][j])),
                           ("batch %d head %d [%d][%d]: %.9g vs %.9g"):format(b, h, i, j, got[i][j], want[i][j]))
          end
        end
      end
    end
  end)

  it("broadcasts batch dims by stride and sums the broadcast operand's gradient", function()
    ms.manual_seed(4)
    local a = ms.randn(3, 1, 4, 5):requires_grad_(true)
    local b = ms.randn(2, 5, 6):requires_grad_(true)
    local out = ms.matmul(a, b)
    assert.are.same({3, 2, 4, 6}, out:shape())
    out:sum():backward()
    -- d/da of sum(a @ b) is ones @ b^T summed over the broadcast dim of a; d/db likewise
    local ones = ms.ones(4, 6, {dtype = "f64"})
    local b64, a64 = b:detach():to("f64"), a:detach():to("f64")
    local want_a = ms.matmul(ones, b64:select(0, 0):transpose(0, 1)) + ms.matmul(ones, b64:select(0, 1):transpose(0, 1))
    local want_b = ms.zeros(5, 6, {dtype = "f64"})
    for i = 0, 2 do want_b = want_b + ms.matmul(a64:select(0, i):select(0, 0):transpose(0, 1), ones) end
    local function close(got, want)
      local g, w = got:to("f64"):reshape(-1):table(), want:reshape(-1):table()
      for i = 1, #w do assert.is_true(math.abs(g[i] - w[i]) <= 1e-5 * math.max(1, math.abs(w[i])), i) end
    end
    for i = 0, 2 do close(a.grad:select(0, i):select(0, 0), want_a) end
    close(b.grad:select(0, 0), want_b)
    close(b.grad:select(0, 1), want_b)
  end)
end)
