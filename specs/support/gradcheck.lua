-- Finite-difference gradient checker in f64: central differences of a fixed random
-- projection of an op's output, compared element by element with what backward computes.
local ms = require "moonshard"

local M = {}

-- A Park-Miller stream in [0, 1): deterministic and independent of moonshard's RNG.
local function stream(seed)
  local state = seed % 2147483646 + 1
  return function()
    state = state * 16807 % 2147483647
    return (state - 1) / 2147483646
  end
end

-- n values in [low, high); with margin, values closer than margin to zero are pushed out
-- (keeps relu, abs and friends away from their kinks).
function M.values(n, low, high, seed, margin)
  local next_value = stream(seed or 1)
  local out = {}
  for i = 1, n do
    local v = low + (high - low) * next_value()
    if margin and math.abs(v) < margin then v = v < 0 and v - margin or v + margin end
    out[i] = v
  end
  return out
end

local function numel_of(shape)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return n
end

-- An f64 tensor of shape from a flat Lua array.
function M.tensor(shape, flat, opts)
  local t = ms.tensor(flat, {dtype = "f64"}):view(shape)
  if opts and opts.requires_grad then t:requires_grad_(true) end
  return t
end

-- An f64 leaf of shape that requires grad, values in [low, high) (default [-1, 1)).
function M.input(shape, opts)
  opts = opts or {}
  local flat = M.values(numel_of(shape), opts.low or -1, opts.high or 1, opts.seed or 1, opts.margin)
  return M.tensor(shape, flat, {requires_grad = true})
end

-- Flatten the nested tables that Tensor:table() returns (a number for a 0-dim tensor).
local function flatten(value, out)
  out = out or {}
  if type(value) == "number" then
    out[#out + 1] = value
  else
    for i = 1, #value do flatten(value[i], out) end
  end
  return out
end
M.flatten = flatten

function M.flat(t) return flatten(t:table()) end

local function projection_value(fn, args, weights)
  return ms.scope(function()
    return ms.no_grad(function()
      local out = fn(unpack(args, 1, table.maxn(args)))
      local values = flatten(out:table())
      local total = 0
      for i = 1, #values do total = total + values[i] * weights[i] end
      return total
    end)
  end)
end

-- Check fn's gradients. inputs is an array of arguments for fn; the f64 tensors among
-- them that require grad are checked, everything else is passed through unchanged.
-- opts: eps (1e-6), atol (1e-6), rtol (1e-5), seed of the projection.
-- Returns true, or false and a message naming the first disagreements.
function M.check(fn, inputs, opts)
  opts = opts or {}
  local eps, atol, rtol = opts.eps or 1e-6, opts.atol or 1e-6, opts.rtol or 1e-5
  local ninputs = table.maxn(inputs)

  local out = fn(unpack(inputs, 1, ninputs))
  if not ms.is_tensor(out) then return false, "fn did not return a tensor" end
  if not out.requires_grad then return false, "the output does not require grad" end
  local weights = M.values(out:numel(), -1, 1, opts.seed or 7)
  local projection = M.tensor(out:shape(), weights)

  for i = 1, ninputs do
    local x = inputs[i]
    if ms.is_tensor(x) and x.requires_grad then x.grad = nil end
  end
  out:backward(projection)

  local problems, checked = {}, 0
  for i = 1, ninputs do
    local x = inputs[i]
    if ms.is_tensor(x) and x.requires_grad then
      if x:dtype() ~= "f64" then return false, "input " .. i .. " is not f64" end
      local shape = x:shape()
      local analytic = x.grad and M.flat(x.grad)
      if x.grad and not (x.grad:shape() == shape) then
        return false, string.format("input %d: grad has shape %s, input %s", i,
                                    tostring(x.grad:shape()), tostring(shape))
      end
      local flat = M.flat(x)
      local args = {}
      for k = 1, ninputs do args[k] = inputs[k] end
      for k = 1, #flat do
        local original = flat[k]
        flat[k] = original + eps
        args[i] = M.tensor(shape, flat)
        local plus = projection_value(fn, args, weights)
        flat[k] = original - eps
        args[i] = M.tensor(shape, flat)
        local minus = projection_value(fn, args, weights)
        flat[k] = original
        local numeric = (plus - minus) / (2 * eps)
        local computed = analytic and analytic[k] or 0
        checked = checked + 1
        if not (math.abs(computed - numeric) <= atol + rtol * math.abs(numeric)) then
          if #problems < 5 then
            problems[#problems + 1] = string.format("input %d element %d: backward %.10g, " ..
                                                    "finite differences %.10g", i, k - 1,
                                                    computed, numeric)
          end
        end
      end
    end
  end
  if checked == 0 then return false, "no input requires grad" end
  if #problems > 0 then return false, table.concat(problems, "; ") end
  return true
end

return M
