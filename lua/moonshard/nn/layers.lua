-- The basic nn layers: Linear, ReLU, GELU, Dropout, LayerNorm, Embedding, Identity.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local Module = require "moonshard.nn.module"
local init = require "moonshard.nn.init_fns"
local nn_ops = require "moonshard.ops.nn"
local linalg = require "moonshard.ops.linalg"
local pointwise = require "moonshard.ops.pointwise"
local raw = require "moonshard.ops.raw"

local fail = C.fail
local Parameter = Module.Parameter

local M = {}

local function check_size(what, name, v)
  if type(v) ~= "number" or v < 0 or v % 1 ~= 0 then
    fail(what, "%s must be a non-negative integer, got %s", name, tostring(v))
  end
end

-- Linear(in_features, out_features, {bias = true, dtype = "f32", device = "cpu"})
M.Linear = Module:extend("Linear")
function M.Linear:__init(in_features, out_features, opts)
  opts = raw.options("Linear", opts, {bias = true, dtype = true, device = true})
  check_size("Linear", "in_features", in_features)
  check_size("Linear", "out_features", out_features)
  self.in_features, self.out_features = in_features, out_features
  local options = {dtype = opts.dtype, device = opts.device}
  self.weight = Parameter(Tensor.empty(out_features, in_features, options))
  if opts.bias ~= false then self.bias = Parameter(Tensor.empty(out_features, options)) end
  self:reset_parameters()
end
function M.Linear:reset_parameters()
  init.kaiming_uniform_(self.weight, {a = math.sqrt(5)})
  if self.bias then
    local bound = self.in_features > 0 and 1 / math.sqrt(self.in_features) or 0
    init.uniform_(self.bias, -bound, bound)
  end
end
function M.Linear:forward(x) return linalg.linear(x, self.weight, self.bias) end
function M.Linear:extra_repr()
  return string.format("in_features=%d, out_features=%d, bias=%s", self.in_features,
                       self.out_features, tostring(self.bias ~= nil))
end

M.Identity = Module:extend("Identity")
function M.Identity:forward(x) return x end

M.ReLU = Module:extend("ReLU")
function M.ReLU:forward(x) return pointwise.relu(x) end

-- GELU({approximate = "none" | "tanh"})
M.GELU = Module:extend("GELU")
function M.GELU:__init(opts)
  self.approximate = raw.options("GELU", opts, {approximate = true}).approximate or "none"
end
function M.GELU:forward(x) return pointwise.gelu(x, {approximate = self.approximate}) end
function M.GELU:extra_repr() return "approximate='" .. self.approximate .. "'" end

M.Tanh = Module:extend("Tanh")
function M.Tanh:forward(x) return pointwise.tanh(x) end

M.Dropout = Module:extend("Dropout")
function M.Dropout:__init(p)
  p = p or 0.5
  if type(p) ~= "number" or p < 0 or p > 1 then fail("Dropout", "p must be in [0, 1], got %s", tostring(p)) end
  self.p = p
end
function M.Dropout:forward(x) return nn_ops.dropout(x, self.p, self.training) end
function M.Dropout:extra_repr() return "p=" .. self.p end

-- LayerNorm(normalized_shape, {eps = 1e-5, elementwise_affine = true, bias = true, dtype, device})
M.LayerNorm = Module:extend("LayerNorm")
function M.LayerNorm:__init(normalized_shape, opts)
  opts = raw.options("LayerNorm", opts, {eps = true, elementwise_affine = true, bias = true, dtype = true, device = true})
  if type(normalized_shape) == "number" then normalized_shape = {normalized_shape} end
  self.normalized_shape, self.eps = normalized_shape, opts.eps or 1e-5
  local options = {dtype = opts.dtype, device = opts.device}
  if opts.elementwise_affine ~= false then
    self.weight = Parameter(Tensor.empty(normalized_shape, options))
    if opts.bias ~= false then self.bias = Parameter(Tensor.empty(normalized_shape, options)) end
  end
  self:reset_parameters()
end
function M.LayerNorm:reset_parameters()
  if self.weight then init.ones_(self.weight) end
  if self.bias then init.zeros_(self.bias) end
end
function M.LayerNorm:forward(x)
  return nn_ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
end
function M.LayerNorm:extra_repr()
  return "(" .. table.concat(self.normalized_shape, ", ") .. "), eps=" .. self.eps
end

-- Embedding(num_embeddings, embedding_dim, {dtype, device}): weight ~ N(0, 1).
M.Embedding = Module:extend("Embedding")
function M.Embedding:__init(num_embeddings, embedding_dim, opts)
  opts = raw.options("Embedding", opts, {dtype = true, device = true})
  check_size("Embedding", "num_embeddings", num_embeddings)
  check_size("Embedding", "embedding_dim", embedding_dim)
  self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
  self.weight = Parameter(Tensor.empty(num_embeddings, embedding_dim, {dtype = opts.dtype, device = opts.device}))
  self:reset_parameters()
end
function M.Embedding:reset_parameters() init.normal_(self.weight, 0, 1) end
function M.Embedding:forward(indices) return nn_ops.embedding(indices, self.weight) end
function M.Embedding:extra_repr() return self.num_embeddings .. ", " .. self.embedding_dim end

return M
