-- nn.utils: gradient norms and clipping for plain (unwrapped) parameters, as
-- torch.nn.utils.clip_grad_norm_ (sharded models use fsdp.clip_grad_norm_).
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local raw = require "moonshard.ops.raw"
local reduce = require "moonshard.ops.reduce"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

-- The norm type as a number: 2 by default, math.huge for "inf".
function M.norm_type(norm_type, what)
  if norm_type == nil then return 2 end
  if norm_type == "inf" then return math.huge end
  if type(norm_type) ~= "number" or norm_type ~= norm_type or norm_type <= 0 then
    fail(what, "norm_type must be a positive number or math.huge (inf), got %s", tostring(norm_type))
  end
  return norm_type
end

-- One gradient's contribution to a p-norm: sum |g|^p (max |g| for p = inf), a Lua number.
function M.norm_term(g, p)
  if g:numel() == 0 then return 0 end
  if p == 2 then return reduce.sum_of_squares(g) end
  local dims = {}
  for d = 0, g:dim() - 1 do dims[d + 1] = d end
  local a = raw.unary(g, raw.ABS, "clip_grad_norm_")
  if p ~= math.huge and p ~= 1 then
    check(lib.ms_binary_scalar(a._c, a._c, p, raw.POW, 0), "clip_grad_norm_")
  end
  local reduced = raw.reduce_keepdim(a, p == math.huge and raw.MAX or raw.SUM, dims, "clip_grad_norm_")
  local value = reduced:item()
  reduced:_release()
  a:_release()
  return value
end

-- Combine two terms of the same norm (sums add, maxima take the larger).
function M.combine(a, b, p)
  if p == math.huge then
    if a ~= a or b ~= b then return 0 / 0 end
    return math.max(a, b)
  end
  return a + b
end

-- The norm from the combined terms.
function M.finish(total, p)
  if p == math.huge or p == 1 then return total end
  return total ^ (1 / p)
end

-- Scale every gradient by max_norm / (norm + 1e-6) when that is below 1 (or NaN, as
-- PyTorch's clamped coefficient is).
function M.scale(grads, norm, max_norm)
  local coef = max_norm / (norm + 1e-6)
  if coef < 1 or coef ~= coef then
    for _, g in ipairs(grads) do
      check(lib.ms_binary_scalar(g._c, g._c, coef, raw.MUL, 0), "clip_grad_norm_")
      g:_bump_version()
    end
  end
end

local function parameter_list(parameters, what)
  if Tensor.is_tensor(parameters) then return {parameters} end
  if type(parameters) == "table" and type(parameters.parameters) == "function" then return parameters:parameters() end
  if type(parameters) ~= "table" then
    fail(what, "expected a tensor or an array of tensors (model:parameters()), got %s", type(parameters))
  end
  return parameters
end

-- clip_grad_norm_(parameters, max_norm, [norm_type = 2], [{error_if_nonfinite = false}]):
-- the norm of all gradients together (norm_type 2, any p > 0, or math.huge / "inf" for the
-- largest magnitude); gradients are scaled by max_norm / (norm + 1e-6) when that is below 1.
-- Returns the norm before clipping (a Lua number).
function M.clip_grad_norm_(parameters, max_norm, norm_type, opts)
  local what = "clip_grad_norm_"
  if type(norm_type) == "table" and opts == nil then norm_type, opts = nil, norm_type end
  if type(max_norm) ~= "number" or max_norm ~= max_norm or max_norm < 0 then
    fail(what, "max_norm must be a non-negative number, got %s", tostring(max_norm))
  end
  local p = M.norm_type(norm_type, what)
  local grads = {}
  for i, param in ipairs(parameter_list(parameters, what)) do
    if not Tensor.is_tensor(param) then
      if type(param) == "table" and param.to_local then
        fail(what, "parameter %d is a DTensor: clip a sharded model with fsdp.clip_grad_norm_(model, max_norm)", i)
      end
      fail(what, "parameter %d is a %s, not a tensor", i, type(param))
    end
    local g = rawget(param, "grad")
    if g then grads[#grads + 1] = g end
  end
  local total = 0
  for _, g in ipairs(grads) do total = M.combine(total, M.norm_term(g, p), p) end
  local norm = M.finish(total, p)
  if opts and opts.error_if_nonfinite and (norm ~= norm or norm == math.huge) then
    fail(what, "the total norm of order %s of the gradients is %s; with error_if_nonfinite = false the " ..
         "gradients are scaled anyway", tostring(p), tostring(norm))
  end
  M.scale(grads, norm, max_norm)
  return norm
end

return M
