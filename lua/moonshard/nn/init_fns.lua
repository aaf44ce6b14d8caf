-- nn.init: in-place parameter initialisers with PyTorch's distributions, on plain tensors,
-- sharded parameters (DTensors: only the local rows' counters are drawn) and meta tensors.
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"
local DTensor = require "moonshard.dtensor"
local placement = require "moonshard.placement"
local random = require "moonshard.random"
local autograd = require "moonshard.autograd"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

-- Calls a meta build made through a module's parameter slot on a tensor that a tie later
-- replaced (lm_head.weight = wte.weight): tensor -> calls still to skip, while materialisation
-- runs one module's init (see run_init).
local replaced = {}

-- Count an initialiser call on a meta tensor (a module slot that drops it in a tie keeps the
-- count: Module's __newindex), or consume one skipped call of a replaced tensor: true then.
local function skipped(t)
  if Tensor.is_meta(t) then
    rawset(t, "_init_calls", (rawget(t, "_init_calls") or 0) + 1)
    return false
  end
  local left = replaced[t]
  if not left then return false end
  replaced[t] = left > 1 and left - 1 or nil
  return true
end

-- The counters a draw over numel elements of t uses. A meta tensor records them (so its
-- materialisation replays them, draw by draw); a tensor materialised from one replays them.
local function counters(t, numel)
  if Tensor.is_meta(t) then
    local seed, offset = random.take(numel)
    local draws = rawget(t, "_init_draws") or {}
    draws[#draws + 1] = {seed, offset}
    rawset(t, "_init_draws", draws)
    return seed, offset
  end
  local draws = rawget(t, "_init_draws")
  if draws then
    local i = (rawget(t, "_init_next") or 0) + 1
    if draws[i] then
      rawset(t, "_init_next", i)
      return draws[i][1], draws[i][2]
    end
  end
  return random.take(numel)
end

-- The tensor holding t's local values and the element index its first one has in t.
local function local_part(t)
  if not DTensor.is_dtensor(t) then return t, 0 end
  local rows = t:size(0)
  local mesh_dim = t._shard_dim
  if not mesh_dim or rows == 0 then return t._local, 0 end
  local start = placement.shard_range(rows, t.device_mesh:size(mesh_dim), t.device_mesh:get_local_rank(mesh_dim))
  return t._local, start * (t:numel() / rows)
end

local function draw(what, t, c_draw, a, b)
  if not (Tensor.is_tensor(t) or DTensor.is_dtensor(t)) then fail(what, "expected a tensor, got %s", type(t)) end
  if type(a) ~= "number" or type(b) ~= "number" then
    fail(what, "the distribution's parameters must be numbers, got %s and %s", type(a), type(b))
  end
  if skipped(t) then return t end
  local seed, offset = counters(t, t:numel())
  if Tensor.is_meta(t) then return t end
  local target, first = local_part(t)
  if target:numel() > 0 then check(c_draw(target._c, a, b, seed, offset + first), what) end
  target:_bump_version()
  return t
end

function M.uniform_(t, a, b)
  return autograd.no_grad(draw, "uniform_", t, lib.ms_rand_uniform, a or 0, b or 1)
end

function M.normal_(t, mean, std)
  return autograd.no_grad(draw, "normal_", t, lib.ms_rand_normal, mean or 0, std or 1)
end

local function fill(what, t, value)
  if not (Tensor.is_tensor(t) or DTensor.is_dtensor(t)) then fail(what, "expected a tensor, got %s", type(t)) end
  if type(value) ~= "number" then fail(what, "value must be a number, got %s", type(value)) end
  if skipped(t) or Tensor.is_meta(t) then return t end
  autograd.no_grad(function() local_part(t):fill_(value) end)
  return t
end

function M.zeros_(t) return fill("zeros_", t, 0) end
function M.ones_(t) return fill("ones_", t, 1) end
function M.constant_(t, value) return fill("constant_", t, value) end

-- init_fn(module) for materialisation: the module's first calls on a parameter it took in a
-- tie replay the calls its construction made on the tensor the tie dropped, and write
-- nothing (the full construction's tied tensor keeps the other module's values).
function M.run_init(module, init_fn)
  local calls = rawget(module, "_init_replaced")
  if calls then
    for name, p in module:named_parameters({recurse = false, remove_duplicate = false}) do
      replaced[p] = calls[name]
    end
  end
  local ok, err = pcall(init_fn, module)
  replaced = {}
  if not ok then error(err, 0) end
end

-- fan_in and fan_out of a weight shaped [out, in, ...] like torch.nn.init.
function M.calculate_fan_in_and_fan_out(t)
  local shape = t:shape()
  if #shape < 2 then fail("init", "fan in/out needs a tensor with at least 2 dims, got %d", #shape) end
  local receptive = 1
  for d = 3, #shape do receptive = receptive * shape[d] end
  return shape[2] * receptive, shape[1] * receptive
end

-- The recommended gain of torch.nn.init.calculate_gain for the nonlinearities that have one.
function M.calculate_gain(nonlinearity, param)
  if nonlinearity == "linear" or nonlinearity == "sigmoid" then return 1 end
  if nonlinearity == "tanh" then return 5 / 3 end
  if nonlinearity == "relu" then return math.sqrt(2) end
  if nonlinearity == "leaky_relu" then
    local slope = param or 0.01
    return math.sqrt(2 / (1 + slope * slope))
  end
  fail("calculate_gain", "unsupported nonlinearity '%s' (expected linear, sigmoid, tanh, relu or " ..
       "leaky_relu)", tostring(nonlinearity))
end

-- kaiming_uniform_(t, {a = 0, mode = "fan_in", nonlinearity = "leaky_relu"}) like PyTorch's:
-- U(-bound, bound) with bound = gain * sqrt(3 / fan); Linear uses a = sqrt(5).
function M.kaiming_uniform_(t, opts)
  opts = opts or {}
  for key in pairs(opts) do
    if key ~= "a" and key ~= "mode" and key ~= "nonlinearity" then
      fail("kaiming_uniform_", "unknown option '%s' (expected a, mode or nonlinearity)", tostring(key))
    end
  end
  local mode = opts.mode or "fan_in"
  if mode ~= "fan_in" and mode ~= "fan_out" then
    fail("kaiming_uniform_", "mode must be 'fan_in' or 'fan_out', got '%s'", tostring(mode))
  end
  local fan_in, fan_out = M.calculate_fan_in_and_fan_out(t)
  local fan = mode == "fan_in" and fan_in or fan_out
  local gain = M.calculate_gain(opts.nonlinearity or "leaky_relu", opts.a or 0)
  local bound = fan > 0 and gain * math.sqrt(3 / fan) or 0
  return M.uniform_(t, -bound, bound)
end

function M.xavier_uniform_(t, gain)
  local fan_in, fan_out = M.calculate_fan_in_and_fan_out(t)
  local bound = (gain or 1) * math.sqrt(6 / (fan_in + fan_out))
  return M.uniform_(t, -bound, bound)
end

return M
