-- The process's random number generator: a counter-based stream (seed, offset), so any
-- draw can be replayed by restoring the state (dropout in recomputed regions).
local ffi = require "ffi"
local C = require "moonshard.ffi"
local Tensor = require "moonshard.tensor"

local lib, check, fail = C.lib, C.check, C.fail

local M = {}

local state = {seed = 0, offset = 0}

local function is_count(v) return type(v) == "number" and v >= 0 and v % 1 == 0 end

function M.manual_seed(seed)
  if not is_count(seed) then
    fail("manual_seed", "seed must be a non-negative integer, got %s", tostring(seed))
  end
  state.seed, state.offset = seed, 0
end

function M.get_rng_state() return {seed = state.seed, offset = state.offset} end

function M.set_rng_state(new_state)
  if type(new_state) ~= "table" or not is_count(new_state.seed) or not is_count(new_state.offset) then
    fail("set_rng_state", "expected a table {seed = n, offset = n} of non-negative integers " ..
         "from get_rng_state(), got seed %s and offset %s", type(new_state) == "table" and
         tostring(new_state.seed) or "-", type(new_state) == "table" and tostring(new_state.offset) or "-")
  end
  state.seed, state.offset = new_state.seed, new_state.offset
end

-- Reserve n counters of the stream; returns seed and the first counter. Offsets advance in
-- multiples of 4 so draws never share a counter block.
function M.take(n)
  local seed, offset = state.seed, state.offset
  state.offset = offset + math.ceil(n / 4) * 4
  return seed, offset
end

function M.rand(...)
  local shape, opts = Tensor.parse_shape("rand", ...)
  local t = Tensor.create("rand", opts, shape)
  local seed, offset = M.take(t:numel())
  if Tensor.is_meta(t) then -- the counters are kept so materialising draws the same values
    t._init_draws = {{seed, offset}}
  else
    check(lib.ms_rand_uniform(t._c, 0, 1, seed, offset), "rand")
  end
  if opts.requires_grad then t.requires_grad = true end
  return t
end

function M.randn(...)
  local shape, opts = Tensor.parse_shape("randn", ...)
  local t = Tensor.create("randn", opts, shape)
  local seed, offset = M.take(t:numel())
  if Tensor.is_meta(t) then -- the counters are kept so materialising draws the same values
    t._init_draws = {{seed, offset}}
  else
    check(lib.ms_rand_normal(t._c, 0, 1, seed, offset), "randn")
  end
  if opts.requires_grad then t.requires_grad = true end
  return t
end

local function check_draw_arguments(t, what, a, b)
  if not Tensor.is_tensor(t) then fail(what, "expected a tensor, got %s", type(t)) end
  if type(a) ~= "number" or type(b) ~= "number" then
    fail(what, "the distribution's parameters must be numbers, got %s and %s", type(a), type(b))
  end
end

-- In-place draws for initialisers (no autograd).
function M.uniform_(t, low, high)
  check_draw_arguments(t, "uniform_", low, high)
  local seed, offset = M.take(t:numel())
  check(lib.ms_rand_uniform(t._c, low, high, seed, offset), "uniform_")
  t:_bump_version()
  return t
end

function M.normal_(t, mean, std)
  check_draw_arguments(t, "normal_", mean, std)
  local seed, offset = M.take(t:numel())
  check(lib.ms_rand_normal(t._c, mean, std, seed, offset), "normal_")
  t:_bump_version()
  return t
end

-- ms.randint(low, high, shape[, opts]): integers in [low, high), i64 by default.
function M.randint(low, high, shape, opts)
  opts = opts or {}
  if type(opts) ~= "table" then fail("randint", "options must be a table, got %s", type(opts)) end
  for key in pairs(opts) do
    if key ~= "dtype" and key ~= "device" then fail("randint", "unknown option '%s' (expected dtype or device)", tostring(key)) end
  end
  if type(low) ~= "number" or type(high) ~= "number" or low % 1 ~= 0 or high % 1 ~= 0 or high <= low then
    fail("randint", "need integers low < high, got %s and %s", tostring(low), tostring(high))
  end
  local parsed = Tensor.parse_shape("randint", shape)
  local uniform = Tensor.empty_raw(parsed, lib.MS_F64, lib.MS_POOL_CPU)
  local seed, offset = M.take(uniform:numel())
  check(lib.ms_rand_uniform(uniform._c, low, high, seed, offset), "randint")
  local values = ffi.cast("double*", lib.ms_tensor_data(uniform._c))
  for i = 0, uniform:numel() - 1 do values[i] = math.floor(values[i]) end
  local out = Tensor.create("randint", {dtype = opts.dtype or "i64", device = opts.device}, parsed)
  check(lib.ms_copy(out._c, uniform._c), "randint")
  uniform:_release()
  return out
end

return M
