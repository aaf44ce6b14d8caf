-- A small GPT-style character model in nanoGPT's layout (transformer.wte, transformer.h.N,
-- lm_head), so state-dict keys are the names a PyTorch nanoGPT checkpoint uses.
local ms = require "moonshard"
local nn = ms.nn

local M = {}

-- Model sizes for --model (vocabulary and sequence length come from the corpus and --seq).
-- gpt2 is GPT-2 small: 12 layers, width 768, 12 heads, lm_head tied to the embedding.
M.PRESETS = {
  gpt2 = {layers = 12, dim = 768, heads = 12, tie = true},
  ["gpt2-tiny"] = {layers = 2, dim = 32, heads = 4, tie = true}, -- gpt2's code path at test size
}

-- The configuration of preset `name` (nil: base as given) over base {vocab, seq, layers, dim, heads}.
function M.config(name, base)
  local config = {}
  for key, value in pairs(base) do config[key] = value end
  if name == nil then return config end
  local preset = M.PRESETS[name]
  if not preset then
    local names = {}
    for key in pairs(M.PRESETS) do names[#names + 1] = key end
    table.sort(names)
    error(("train: unknown --model '%s' (expected %s)"):format(tostring(name), table.concat(names, " or ")), 0)
  end
  for key, value in pairs(preset) do config[key] = value end
  return config
end

-- The residual projections' std, as GPT-2 scales it (set on each c_proj at construction).
local function residual_std(layers) return 0.02 / math.sqrt(2 * layers) end

-- Linear -> GELU -> Linear, four times wider in the middle.
local MLP = nn.Module:extend("MLP")
function MLP:__init(dim)
  self.c_fc = nn.Linear(dim, 4 * dim)
  self.gelu = nn.GELU()
  self.c_proj = nn.Linear(4 * dim, dim)
end
-- c_fc's bias and the GELU run in one pass (nn.F.linear_gelu, the numbers of gelu(c_fc(x)) up
-- to float rounding) while both calls are plain; with hooks or wrappers on either (an FSDP
-- unit per Linear, say) they are called as modules.
function MLP:forward(x)
  local c_fc, gelu = self.c_fc, self.gelu
  if c_fc:_plain_call(nn.Linear) and gelu:_plain_call(nn.GELU) then
    return self.c_proj(nn.F.linear_gelu(x, c_fc.weight, c_fc.bias, {approximate = gelu.approximate}))
  end
  return self.c_proj(gelu(c_fc(x)))
end

-- LayerNorm -> CausalSelfAttention and LayerNorm -> MLP, each with a residual.
local Block = nn.Module:extend("Block")
function Block:__init(dim, heads, layers)
  self.ln_1 = nn.LayerNorm(dim)
  self.attn = nn.CausalSelfAttention(dim, heads)
  self.ln_2 = nn.LayerNorm(dim)
  self.mlp = MLP(dim)
  self.attn.c_proj.init_std = residual_std(layers or 1)
  self.mlp.c_proj.init_std = residual_std(layers or 1)
end
-- The second residual add and ln_2 run in one pass (nn.F.add_layer_norm).
function Block:forward(x)
  local ln_2 = self.ln_2
  local s, h = nn.F.add_layer_norm(x, self.attn(self.ln_1(x)), ln_2.normalized_shape, ln_2.weight, ln_2.bias,
                                   ln_2.eps)
  return s + self.mlp(h)
end
M.Block = Block

local Transformer = nn.Module:extend("Transformer")
function Transformer:__init(config)
  self.wte = nn.Embedding(config.vocab, config.dim)
  self.wpe = nn.Embedding(config.seq, config.dim)
  local blocks = {}
  for i = 1, config.layers do blocks[i] = Block(config.dim, config.heads, config.layers) end
  self.h = nn.ModuleList(blocks)
  self.ln_f = nn.LayerNorm(config.dim)
end

-- GPT-2's initialisation of one module's own parameters: N(0, 0.02) weights (scaled on the
-- residual projections), zero biases.
local function init_weights(m)
  if m.__name == "Linear" then
    nn.init.normal_(m.weight, 0, rawget(m, "init_std") or 0.02)
    if m.bias then nn.init.zeros_(m.bias) end
  elseif m.__name == "Embedding" then
    nn.init.normal_(m.weight, 0, 0.02)
  end
end

-- FSDP's param_init_fn for a model built on the meta device: the same calls a full
-- construction makes on the module's parameters (the layer's reset_parameters, then
-- GPT-2's scheme), so the shards are bitwise those of a full construction (tie included).
function M.init_module(m)
  if m.reset_parameters then m:reset_parameters() end
  init_weights(m)
end

-- GPT(config): config = {vocab, seq, layers, dim, heads, tie}; tie shares lm_head.weight with
-- transformer.wte.weight (GPT-2's tied embeddings).
local GPT = nn.Module:extend("GPT")
function GPT:__init(config)
  self.config = config
  self.transformer = Transformer(config)
  self.lm_head = nn.Linear(config.dim, config.vocab, {bias = false})
  if config.tie then self.lm_head.weight = self.transformer.wte.weight end
  self:apply(init_weights)
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
