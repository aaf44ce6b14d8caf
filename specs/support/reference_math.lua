-- Reference math for specs, in doubles: erf by its Maclaurin series, summed until the terms
-- vanish (Abramowitz-Stegun 7.1.26 is too coarse to check GELU against).
local M = {}

function M.erf(x)
  local t = math.abs(x)
  if t > 6 then return x > 0 and 1 or -1 end
  local sum, term, k = t, t, 0
  repeat
    k = k + 1
    term = term * -t * t / k
    local add = term / (2 * k + 1)
    sum = sum + add
  until math.abs(add) < 1e-17 * math.abs(sum) or k > 200
  local value = 2 / math.sqrt(math.pi) * sum
  return x < 0 and -value or value
end

return M
