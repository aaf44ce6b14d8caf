-- Differentiable element-wise operations with broadcasting: arithmetic, powers,
-- activations and comparisons, as functions and as Tensor methods and operators.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local autograd = require "moonshard.autograd"
local raw = require "moonshard.ops.raw"

local fail = C.fail
local new_node = autograd.new_node
local is_tensor = Tensor.is_tensor

-- An operand's gradient: the output gradient summed down to the operand's shape when the
-- operand was broadcast (shape is nil when it has the output's shape).
local function sum_to(g, shape)
  if shape == nil then return g end
  return raw.sum_to(g, shape)
end

local M = {}

-- PyTorch-style node names: "mul" -> "MulBackward0" (made once per op: ops run per element
-- of a training loop and string building would dominate small ones).
local node_names = setmetatable({}, {__index = function(names, op_name)
  local name = op_name:gsub("^%l", string.upper):gsub("_(%l)", string.upper) .. "Backward0"
  names[op_name] = name
  return name
end})
local function node_name(op_name) return node_names[op_name] end

local function as_tensor(v, what)
  if is_tensor(v) then return v end
  fail(what, "expected a tensor or a number, got %s", type(v))
end

-- ---- binary ----

local function add_backward(node, g)
  return sum_to(g, node.a_shape), sum_to(g, node.b_shape)
end

local function sub_backward(node, g)
  local gb = node[2] and raw.unary(sum_to(g, node.b_shape), raw.NEG, "sub")
  return sum_to(g, node.a_shape), gb or nil
end

local function mul_backward(node, g)
  local ga, gb
  if node[1] then ga = sum_to(raw.binary(g, node:saved_tensor(node.b), raw.MUL, "mul"), node.a_shape) end
  if node[2] then gb = sum_to(raw.binary(g, node:saved_tensor(node.a), raw.MUL, "mul"), node.b_shape) end
  return ga, gb
end

local function div_backward(node, g)
  local b = node:saved_tensor(node.b)
  local ga, gb
  if node[1] then ga = sum_to(raw.binary(g, b, raw.DIV, "div"), node.a_shape) end
  if node[2] then
    local a = node:saved_tensor(node.a)
    local q = raw.binary(raw.binary(g, a, raw.MUL, "div"), raw.binary(b, b, raw.MUL, "div"), raw.DIV, "div")
    gb = sum_to(raw.unary(q, raw.NEG, "div"), node.b_shape)
  end
  return ga, gb
end

-- The winner takes the gradient; a tie splits it in halves, as PyTorch's maximum / minimum.
local function extremum_backward(node, g)
  local a, b = node:saved_tensor(node.a), node:saved_tensor(node.b)
  local a_wins = raw.binary(a, b, node.op == raw.MAXIMUM and raw.GT or raw.LT, node.name)
  local tie = raw.scalar(raw.binary(a, b, raw.EQ, node.name), 0.5, raw.MUL, false, node.name)
  local a_share = raw.binary(a_wins, tie, raw.ADD, node.name)
  local ga, gb
  if node[1] then ga = sum_to(raw.binary(g, a_share, raw.MUL, node.name), node.a_shape) end
  if node[2] then
    local b_share = raw.scalar(a_share, 1, raw.SUB, true, node.name)
    gb = sum_to(raw.binary(g, b_share, raw.MUL, node.name), node.b_shape)
  end
  return ga, gb
end

local binary_backward = {
  [raw.ADD] = add_backward, [raw.SUB] = sub_backward, [raw.MUL] = mul_backward,
  [raw.DIV] = div_backward, [raw.MAXIMUM] = extremum_backward, [raw.MINIMUM] = extremum_backward,
}
local binary_names = {
  [raw.ADD] = "add", [raw.SUB] = "sub", [raw.MUL] = "mul", [raw.DIV] = "div",
  [raw.MAXIMUM] = "maximum", [raw.MINIMUM] = "minimum",
}

-- ---- tensor-scalar ----

local function scalar_backward(node, g)
  local op, s = node.op, node.scalar
  if op == raw.ADD then return g end
  if op == raw.SUB then return node.reverse and raw.unary(g, raw.NEG, "rsub") or g end
  if op == raw.MUL then return raw.scalar(g, s, raw.MUL, false, "mul") end
  if op == raw.DIV then
    if not node.reverse then return raw.scalar(g, s, raw.DIV, false, "div") end
    -- d(s / x) = -s / x^2
    local x = node:saved_tensor(node.a)
    local x2 = raw.binary(x, x, raw.MUL, "div")
    return raw.binary(raw.scalar(g, -s, raw.MUL, false, "div"), x2, raw.DIV, "div")
  end
  if op == raw.POW then
    local x = node:saved_tensor(node.a)
    if node.reverse then -- d(s^x) = s^x * ln s
      local y = raw.scalar(x, s, raw.POW, true, "pow")
      return raw.binary(g, raw.scalar(y, math.log(s), raw.MUL, false, "pow"), raw.MUL, "pow")
    end
    if s == 0 then return raw.zeros_like(g) end -- x^0 is 1 everywhere, 0 included
    local d = raw.scalar(raw.scalar(x, s - 1, raw.POW, false, "pow"), s, raw.MUL, false, "pow")
    return raw.binary(g, d, raw.MUL, "pow")
  end
  if op == raw.MAXIMUM or op == raw.MINIMUM then -- as maximum with s as a tensor: a tie halves
    local x = node:saved_tensor(node.a)
    local wins = raw.scalar(x, s, op == raw.MAXIMUM and raw.GT or raw.LT, false, node.name)
    local tie = raw.scalar(raw.scalar(x, s, raw.EQ, false, node.name), 0.5, raw.MUL, false, node.name)
    return raw.binary(g, raw.binary(wins, tie, raw.ADD, node.name), raw.MUL, node.name)
  end
  fail(node.name, "no gradient for this scalar operation")
end

local INTEGER = {i32 = true, i64 = true, u8 = true}

-- An integer tensor in a division, or meeting a number s that is not a whole one, computes in
-- the default float dtype, as PyTorch promotes it (Lua numbers carry no int/float type, so
-- the value decides: i64 * 2 stays i64, i64 * 2.5 is f32). s is nil for a tensor operand.
local function promoted(a, s, op, what)
  local needs_float = op == raw.DIV or (s ~= nil and s % 1 ~= 0)
  if not needs_float or not INTEGER[a:dtype()] then return a end
  local out = Tensor.empty_like_raw(a, Tensor.dtype_id(Tensor.get_default_dtype(), what))
  C.check(C.lib.ms_copy(out._c, a._c), what)
  return out
end

local function scalar_op(a, s, op, reverse, what)
  a = promoted(a, s, op, what)
  local node = new_node(node_name(what), scalar_backward, a)
  local out = raw.scalar(a, s, op, reverse, what, node)
  if node then
    node.op, node.scalar, node.reverse = op, s, reverse
    if op == raw.POW or op == raw.MAXIMUM or op == raw.MINIMUM or (op == raw.DIV and reverse) then
      node.a = node:save(a)
    end
  end
  return out
end

local function binary_op(a, b, op)
  local what = binary_names[op]
  if not is_tensor(a) and not is_tensor(b) then
    fail(what, "expected a tensor and a tensor or a number, got %s and %s", type(a), type(b))
  end
  if type(b) == "number" then return scalar_op(a, b, op, false, what) end
  if type(a) == "number" then
    if op == raw.ADD or op == raw.MUL then return scalar_op(b, a, op, false, what) end
    return scalar_op(b, a, op, true, what)
  end
  as_tensor(a, what)
  as_tensor(b, what)
  if op == raw.DIV then a, b = promoted(a, nil, op, what), promoted(b, nil, op, what) end
  local node = new_node(node_name(what), binary_backward[op], a, b)
  local out = raw.binary(a, b, op, what, node)
  if node then
    node.op = op
    if not raw.same_shape(a._c, b._c) then node.a_shape, node.b_shape = a:shape(), b:shape() end
    if op == raw.MUL then
      if node[1] then node.b = node:save(b) end
      if node[2] then node.a = node:save(a) end
    elseif op == raw.DIV then
      node.b = node:save(b)
      if node[2] then node.a = node:save(a) end
    elseif op == raw.MAXIMUM or op == raw.MINIMUM then
      node.a, node.b = node:save(a), node:save(b)
    end
  end
  return out
end

function M.add(a, b, alpha)
  if alpha and alpha ~= 1 then b = binary_op(b, alpha, raw.MUL) end
  return binary_op(a, b, raw.ADD)
end
function M.sub(a, b, alpha)
  if alpha and alpha ~= 1 then b = binary_op(b, alpha, raw.MUL) end
  return binary_op(a, b, raw.SUB)
end
function M.mul(a, b) return binary_op(a, b, raw.MUL) end
function M.div(a, b) return binary_op(a, b, raw.DIV) end
function M.maximum(a, b) return binary_op(a, b, raw.MAXIMUM) end
function M.minimum(a, b) return binary_op(a, b, raw.MINIMUM) end

function M.pow(a, b)
  if type(b) == "number" and is_tensor(a) then return scalar_op(a, b, raw.POW, false, "pow") end
  if type(a) == "number" and is_tensor(b) then return scalar_op(b, a, raw.POW, true, "pow") end
  fail("pow", "one operand must be a number (tensor ** tensor is not supported)")
end

-- ---- unary ----

local activation_ops = {relu = raw.RELU, gelu = raw.GELU, gelu_tanh = raw.GELU_TANH,
                        tanh = raw.TANH, sigmoid = raw.SIGMOID}

local function activation_backward(node, g)
  return raw.unary_backward(node:saved_tensor(node.x), g, node.op, node.name)
end

local function unary_backward(node, g)
  local op = node.op
  if op == raw.NEG then return raw.unary(g, raw.NEG, "neg") end
  if op == raw.EXP then return raw.binary(g, node:saved_tensor(node.y), raw.MUL, "exp") end
  if op == raw.SQRT then
    return raw.binary(g, raw.scalar(node:saved_tensor(node.y), 2, raw.MUL, false, "sqrt"), raw.DIV, "sqrt")
  end
  local x = node:saved_tensor(node.x)
  if op == raw.LOG then return raw.binary(g, x, raw.DIV, "log") end
  if op == raw.RSQRT then -- d x^-1/2 = -1/2 x^-3/2
    local d = raw.scalar(raw.scalar(x, -1.5, raw.POW, false, "rsqrt"), -0.5, raw.MUL, false, "rsqrt")
    return raw.binary(g, d, raw.MUL, "rsqrt")
  end
  if op == raw.ABS then return raw.binary(g, raw.unary(x, raw.SIGN, "abs"), raw.MUL, "abs") end
  if op == raw.SIN then return raw.binary(g, raw.unary(x, raw.COS, "sin"), raw.MUL, "sin") end
  if op == raw.COS then
    return raw.binary(g, raw.unary(raw.unary(x, raw.SIN, "cos"), raw.NEG, "cos"), raw.MUL, "cos")
  end
  if op == raw.RECIPROCAL then
    return raw.binary(raw.unary(g, raw.NEG, "reciprocal"), raw.binary(x, x, raw.MUL, "reciprocal"), raw.DIV, "reciprocal")
  end
  if op == raw.SQUARE then return raw.binary(g, raw.scalar(x, 2, raw.MUL, false, "square"), raw.MUL, "square") end
  fail(node.name, "no gradient formula")
end

-- Which unary ops are activations (a lookup, not a search: it runs per op).
local is_activation = {}
for _, op in pairs(activation_ops) do is_activation[op] = true end

local function unary_op(a, op, name)
  if not is_tensor(a) then fail(name, "expected a tensor, got %s", type(a)) end
  local node = new_node(node_name(name), is_activation[op] and activation_backward or unary_backward, a)
  local out = raw.unary(a, op, name, node)
  if node then
    node.op = op
    if op == raw.EXP or op == raw.SQRT then node.y = node:save(out)
    elseif op ~= raw.NEG then node.x = node:save(a) end
  end
  return out
end

local unary_names = {
  neg = raw.NEG, exp = raw.EXP, log = raw.LOG, sqrt = raw.SQRT, rsqrt = raw.RSQRT,
  abs = raw.ABS, sin = raw.SIN, cos = raw.COS, reciprocal = raw.RECIPROCAL, square = raw.SQUARE,
  relu = raw.RELU, gelu_tanh = raw.GELU_TANH, tanh = raw.TANH, sigmoid = raw.SIGMOID,
}
for name, op in pairs(unary_names) do
  M[name] = function(a) return unary_op(a, op, name) end
end

-- gelu(x, {approximate = "tanh"}) like torch.nn.functional.gelu.
function M.gelu(a, opts)
  local approximate = type(opts) == "table" and opts.approximate or opts
  if approximate == "tanh" then return unary_op(a, raw.GELU_TANH, "gelu") end
  if approximate ~= nil and approximate ~= "none" then
    fail("gelu", "approximate must be 'none' or 'tanh', got '%s'", tostring(approximate))
  end
  return unary_op(a, raw.GELU, "gelu")
end

function M.sign(a) return raw.unary(as_tensor(a, "sign"), raw.SIGN, "sign") end

-- ---- comparisons (no gradient) ----

local comparisons = {eq = raw.EQ, ne = raw.NE, lt = raw.LT, le = raw.LE, gt = raw.GT, ge = raw.GE}
for name, op in pairs(comparisons) do
  M[name] = function(a, b)
    as_tensor(a, name)
    if type(b) == "number" then return raw.scalar(promoted(a, b, op, name), b, op, false, name) end
    return raw.binary(a, b, op, name)
  end
end

return M
