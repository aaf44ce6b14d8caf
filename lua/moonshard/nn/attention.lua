-- CausalSelfAttention: GPT-style multi-head self-attention with a causal mask, as in
-- nanoGPT (c_attn projects to q, k, v; c_proj projects back).
local C = require "moonshard.ffi"
local Module = require "moonshard.nn.module"
local layers = require "moonshard.nn.layers"
local nn_ops = require "moonshard.ops.nn"
local raw = require "moonshard.ops.raw"

local fail = C.fail

local CausalSelfAttention = Module:extend("CausalSelfAttention")

-- CausalSelfAttention(n_embd, n_head, {dropout = 0, bias = true})
function CausalSelfAttention:__init(n_embd, n_head, opts)
  opts = raw.options("CausalSelfAttention", opts, {dropout = true, bias = true, dtype = true, device = true})
  if type(n_embd) ~= "number" or type(n_head) ~= "number" or n_head < 1 or n_embd % n_head ~= 0 then
    fail("CausalSelfAttention", "n_embd (%s) must be divisible by n_head (%s)", tostring(n_embd), tostring(n_head))
  end
  self.n_embd, self.n_head, self.dropout = n_embd, n_head, opts.dropout or 0
  local options = {bias = opts.bias, dtype = opts.dtype, device = opts.device}
  self.c_attn = layers.Linear(n_embd, 3 * n_embd, options)
  self.c_proj = layers.Linear(n_embd, n_embd, options)
  self.resid_dropout = layers.Dropout(self.dropout)
end

function CausalSelfAttention:forward(x)
  if x:dim() ~= 3 or x:size(2) ~= self.n_embd then
    fail("CausalSelfAttention", "expected input [B, T, %d], got %s", self.n_embd, tostring(x:shape()))
  end
  local y = nn_ops.causal_self_attention(self.c_attn(x), self.n_head,
                                         {dropout_p = self.training and self.dropout or 0})
  return self.resid_dropout(self.c_proj(y))
end

function CausalSelfAttention:extra_repr()
  return string.format("n_embd=%d, n_head=%d", self.n_embd, self.n_head)
end

return CausalSelfAttention
