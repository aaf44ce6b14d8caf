-- A small GPT-style character model in nanoGPT's layout (transformer.wte, transformer.h.N,
-- lm_head), so state-dict keys are the names a PyTorch nanoGPT checkpoint uses.
local ms = require "moonshard"
local nn = ms.nn

local M = {}

-- Linear -> GELU -> Linear, four times wider in the middle.
local MLP = nn.Module:extend("MLP")
function MLP:__init(dim)
  self.c_fc = nn.Linear(dim, 4 * dim)
  self.gelu = nn.GELU()
  self.c_proj = nn.Linear(4 * dim, dim)
end
function MLP:forward(x) return self.c_proj(self.gelu(self.c_fc(x))) end

-- LayerNorm -> CausalSelfAttention and LayerNorm -> MLP, each with a residual.
local Block = nn.Module:extend("Block")
function Block:__init(dim, heads)
  self.ln_1 = nn.LayerNorm(dim)
  self.attn = nn.CausalSelfAttention(dim, heads)
  self.ln_2 = nn.LayerNorm(dim)
  self.mlp = MLP(dim)
end
function Block:forward(x)
  x = x + self.attn(self.ln_1(x))
  return x + self.mlp(self.ln_2(x))
end
M.Block = Block

local Transformer = nn.Module:extend("Transformer")
function Transformer:__init(config)
  self.wte = nn.Embedding(config.vocab, config.dim)
  self.wpe = nn.Embedding(config.seq, config.dim)
  local blocks = {}
  for i = 1, config.layers do blocks[i] = Block(config.dim, config.heads) end
  self.h = nn.ModuleList(blocks)
  self.ln_f = nn.LayerNorm(config.dim)
end

-- GPT(config): config = {vocab, seq, layers, dim, heads}.
local GPT = nn.Module:extend("GPT")
function GPT:__init(config)
  self.config = config
  self.transformer = Transformer(config)
  self.lm_head = nn.Linear(config.dim, config.vocab, {bias = false})
  ms.no_grad(function()
    for name, p in self:named_parameters() do
      if name:match("weight$") and p:dim() == 2 then nn.init.normal_(p, 0, 0.02) end
      if name:match("bias$") then nn.init.zeros_(p) end
      if name:match("c_proj%.weight$") then
        nn.init.normal_(p, 0, 0.02 / math.sqrt(2 * config.layers))
      end
    end
  end)
end

-- model(tokens [B, T]) -> logits [B, T, vocab]; model(tokens, targets [B, T]) -> the mean
-- cross-entropy (as nanoGPT). Temporaries are released when the call returns.
function GPT:forward(tokens, targets)
  local t = tokens:size(1)
  local positions = ms.arange(t, {dtype = "i64"})
  local x = self.transformer.wte(tokens) + self.transformer.wpe(positions)
  for _, block in self.transformer.h:ipairs() do x = block(x) end
  local logits = self.lm_head(self.transformer.ln_f(x))
  if targets == nil then return logits end
  return nn.F.cross_entropy(logits:view(-1, self.config.vocab), targets:reshape(-1))
end

M.GPT = GPT

return M
