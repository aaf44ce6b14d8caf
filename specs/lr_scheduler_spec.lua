-- optim.lr_scheduler against PyTorch: every scheduler's learning rates (and OneCycleLR's
-- momentum / beta1) step by step, equal to what torch.optim.lr_scheduler produced; state
-- dicts that resume a schedule exactly; bad arguments.
--
-- The numbers below were computed by PyTorch 2.15 (CPU, from PyPI into a virtualenv outside
-- the repository) with this script; each row is get_last_lr() (plus the momentum or beta1
-- of group 0 for OneCycleLR) before optimizer.step(); scheduler.step():
--   def run(make_opt, make_sched, steps, extra=None):
--       p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
--       opt = make_opt([p, q]); s = make_sched(opt); rows = []
--       for i in range(steps):
--           rows.append(list(s.get_last_lr()) + (extra(opt) if extra else []))
--           opt.step(); s.step()
--       return rows
--   sgd2 = SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.01}], lr=0.1, momentum=0.9)
--   sgd = SGD([p, q], lr=0.1, momentum=0.9); adamw = AdamW([p, q], lr=0.1)
--   with the schedulers built as in `cases` below (same arguments), printed with %.17g.
local ms = require "moonshard"
local S = ms.optim.lr_scheduler

local pytorch = {
  LambdaLR = {
    {0.10000000000000001, 0.01},
    {0.095000000000000001, 0.0050000000000000001},
    {0.090249999999999997, 0.0033333333333333331},
    {0.085737499999999994, 0.0025000000000000001},
    {0.081450624999999999, 0.002},
    {0.077378093749999988, 0.0016666666666666666},
    {0.07350918906249998, 0.0014285714285714286},
    {0.069833729609374978, 0.00125},
  },
  StepLR = {
    {0.10000000000000001},
    {0.10000000000000001},
    {0.10000000000000001},
    {0.050000000000000003},
    {0.050000000000000003},
    {0.050000000000000003},
    {0.025000000000000001},
    {0.025000000000000001},
    {0.025000000000000001},
    {0.012500000000000001},
  },
  MultiStepLR = {
    {0.10000000000000001},
    {0.10000000000000001},
    {0.010000000000000002},
    {0.010000000000000002},
    {0.010000000000000002},
    {0.00010000000000000005},
    {0.00010000000000000005},
    {0.00010000000000000005},
  },
  ExponentialLR = {
    {0.10000000000000001},
    {0.090000000000000011},
    {0.081000000000000016},
    {0.07290000000000002},
    {0.065610000000000016},
    {0.059049000000000018},
  },
  CosineAnnealingLR = {
    {0.10000000000000001},
    {0.091405764746872634},
    {0.068905764746872628},
    {0.041094235253127359},
    {0.018594235253127367},
    {0.01},
    {0.018594235253127367},
    {0.041094235253127387},
    {0.068905764746872669},
    {0.091405764746872689},
    {0.10000000000000006},
    {0.091405764746872717},
    {0.068905764746872683},
    {0.041094235253127401},
  },
  LinearLR = {
    {0.025000000000000001},
    {0.043750000000000004},
    {0.062500000000000014},
    {0.081250000000000017},
    {0.10000000000000002},
    {0.10000000000000002},
    {0.10000000000000002},
  },
  ConstantLR = {
    {0.050000000000000003},
    {0.050000000000000003},
    {0.050000000000000003},
    {0.10000000000000001},
    {0.10000000000000001},
    {0.10000000000000001},
  },
  SequentialLR = {
    {0.010000000000000002},
    {0.040000000000000001},
    {0.070000000000000007},
    {0.10000000000000001},
    {0.095097958961169751},
    {0.081362745192007313},
    {0.061514786230837566},
    {0.039485213769162447},
    {0.019637254807992697},
    {0.0059020410388302587},
    {0.001},
    {0.0059020410388302526},
  },
  SequentialLR3 = {
    {0.050000000000000003},
    {0.050000000000000003},
    {0.10000000000000001},
    {0.080000000000000016},
    {0.064000000000000015},
    {0.10000000000000001},
    {0.10000000000000001},
    {0.050000000000000003},
    {0.050000000000000003},
    {0.025000000000000001},
  },
  OneCycleLR = {
    {0.020000000000000018, 0.94999999999999996},
    {0.26000000000000001, 0.89999999999999991},
    {0.5, 0.84999999999999998},
    {0.47524231600673683, 0.85495155660487898},
    {0.40587282697488153, 0.86882550990706331},
    {0.30563101096814466, 0.88887395330218422},
    {0.19437098903185537, 0.91112604669781572},
    {0.094129173025118487, 0.93117449009293662},
    {0.024759683993263143, 0.94504844339512095},
    {1.9999999999999999e-06, 0.94999999999999996},
  },
  OneCycleLR3 = {
    {0.016, 0.94999999999999996},
    {0.20800000000000002, 0.89999999999999991},
    {0.40000000000000002, 0.84999999999999998},
    {0.20800000000000002, 0.89999999999999991},
    {0.016000000000000014, 0.94999999999999996},
    {0.01280032, 0.94999999999999996},
    {0.0096006400000000006, 0.94999999999999996},
    {0.0064009600000000007, 0.94999999999999996},
    {0.0032012800000000008, 0.94999999999999996},
    {1.6000000000009063e-06, 0.94999999999999996},
  },
}

local function optimizer(kind)
  local p, q = ms.zeros(2, {requires_grad = true}), ms.zeros(2, {requires_grad = true})
  if kind == "sgd2" then
    return ms.optim.SGD({{params = {p}, lr = 0.1}, {params = {q}, lr = 0.01}}, {lr = 0.1, momentum = 0.9})
  elseif kind == "adamw" then
    return ms.optim.AdamW({p, q}, {lr = 0.1})
  end
  return ms.optim.SGD({p, q}, {lr = 0.1, momentum = 0.9})
end

local cases = {
  LambdaLR = {"sgd2", function(o) return S.LambdaLR(o, {function(e) return 0.95 ^ e end,
                                                        function(e) return 1 / (e + 1) end}) end},
  StepLR = {"sgd", function(o) return S.StepLR(o, {step_size = 3, gamma = 0.5}) end},
  MultiStepLR = {"sgd", function(o) return S.MultiStepLR(o, {2, 5, 5}, {gamma = 0.1}) end},
  ExponentialLR = {"sgd", function(o) return S.ExponentialLR(o, 0.9) end},
  CosineAnnealingLR = {"sgd", function(o) return S.CosineAnnealingLR(o, {T_max = 5, eta_min = 0.01}) end},
  LinearLR = {"sgd", function(o) return S.LinearLR(o, {start_factor = 0.25, end_factor = 1.0, total_iters = 4}) end},
  ConstantLR = {"sgd", function(o) return S.ConstantLR(o, {factor = 0.5, total_iters = 3}) end},
  SequentialLR = {"sgd", function(o)
    return S.SequentialLR(o, {S.LinearLR(o, {start_factor = 0.1, total_iters = 3}),
                              S.CosineAnnealingLR(o, {T_max = 7, eta_min = 0.001})}, {3})
  end},
  SequentialLR3 = {"sgd", function(o)
    return S.SequentialLR(o, {S.ConstantLR(o, {factor = 0.5, total_iters = 2}), S.ExponentialLR(o, {gamma = 0.8}),
                              S.StepLR(o, {step_size = 2, gamma = 0.5})}, {2, 5})
  end},
  OneCycleLR = {"adamw", function(o) return S.OneCycleLR(o, 0.5, {total_steps = 10}) end,
                function(o) return o.param_groups[1].betas[1] end},
  OneCycleLR3 = {"sgd", function(o)
    return S.OneCycleLR(o, {max_lr = 0.4, epochs = 2, steps_per_epoch = 5, anneal_strategy = "linear",
                            three_phase = true})
  end, function(o) return o.param_groups[1].momentum end},
}

local function close(a, b) return math.abs(a - b) <= 1e-12 * math.max(1, math.abs(b)) end

local function rows_of(case, steps)
  local opt = optimizer(case[1])
  local sched = case[2](opt)
  local rows = {}
  for i = 1, steps do
    local row = sched:get_last_lr()
    if case[3] then row[#row + 1] = case[3](opt) end
    rows[i] = row
    sched:step()
  end
  return rows
end

describe("optim.lr_scheduler", function()
  for name, case in pairs(cases) do
    it(name .. " gives PyTorch's learning rates step by step", function()
      local expected = pytorch[name]
      local got = rows_of(case, #expected)
      for i, row in ipairs(expected) do
        assert.are.equal(#row, #got[i])
        for j, v in ipairs(row) do
          assert.is_true(close(got[i][j], v), string.format("%s step %d value %d: got %.17g, PyTorch %.17g",
                                                             name, i - 1, j, got[i][j], v))
        end
      end
    end)
  end

  it("sets the optimizer's learning rate at every step", function()
    local opt = optimizer("sgd")
    local sched = S.StepLR(opt, 2, 0.5)
    sched:step(); sched:step()
    assert.are.equal(0.05, opt.param_groups[1].lr)
  end)

  for _, name in ipairs({"CosineAnnealingLR", "SequentialLR", "OneCycleLR", "LambdaLR"}) do
    it(name .. " resumes from its state dict (and the optimizer's) exactly", function()
      local case = cases[name]
      local expected = rows_of(case, 9)
      local opt = optimizer(case[1])
      local sched = case[2](opt)
      for _ = 1, 4 do sched:step() end
      local saved_sched, saved_groups = sched:state_dict(), {}
      for i, g in ipairs(opt.param_groups) do
        saved_groups[i] = {}
        for k, v in pairs(g) do
          if k ~= "params" then saved_groups[i][k] = type(v) == "table" and {unpack(v)} or v end
        end
      end
      local fresh = optimizer(case[1])
      local resumed = case[2](fresh)
      for i, g in ipairs(fresh.param_groups) do for k, v in pairs(saved_groups[i]) do g[k] = v end end
      resumed:load_state_dict(saved_sched)
      for i = 5, 9 do
        local row = resumed:get_last_lr()
        if case[3] then row[#row + 1] = case[3](fresh) end
        for j, v in ipairs(expected[i]) do assert.are.equal(v, row[j]) end
        resumed:step()
      end
    end)
  end

  it("keeps functions and the optimizer out of its state dict", function()
    local opt = optimizer("sgd")
    local sd = S.LambdaLR(opt, function(e) return e end):state_dict()
    for key, value in pairs(sd) do
      assert.is_not.equal("function", type(value), key)
      assert.is_not.equal(opt, value, key)
    end
    assert.is_nil(sd.lr_lambdas)
    assert.are.equal(0, sd.last_epoch)
  end)

  describe("bad input", function()
    local function fails(pattern, fn, ...)
      local ok, err = pcall(fn, ...)
      assert.is_false(ok)
      assert.matches(pattern, tostring(err))
    end

    it("refuses a scheduler over something that is not an optimizer", function()
      fails("moonshard: StepLR: expected an optimizer", S.StepLR, {lr = 0.1}, 3)
      fails("moonshard: CosineAnnealingLR: expected an optimizer .* got number", S.CosineAnnealingLR, 5, 10)
      fails("moonshard: OneCycleLR: expected an optimizer", S.OneCycleLR, {param_groups = {}}, 0.1, {total_steps = 3})
      fails("moonshard: SequentialLR: expected an optimizer", S.SequentialLR, "opt", {}, {})
      fails("moonshard: LambdaLR: expected an optimizer", S.LambdaLR, {}, function() return 1 end)
    end)

    it("names the missing or wrong argument", function()
      local opt = optimizer("sgd")
      fails("StepLR: step_size is required", S.StepLR, opt)
      fails("StepLR: step_size must be an integer >= 1, got 0", S.StepLR, opt, 0)
      fails("LinearLR: start_factor must be a number in %(0, 1%]", S.LinearLR, opt, {start_factor = 0})
      fails("StepLR: unknown option 'gama'", S.StepLR, opt, 3, {gama = 0.5})
      fails("OneCycleLR: give total_steps, or epochs and steps_per_epoch", S.OneCycleLR, opt, 0.1)
      fails("SequentialLR: expected 1 milestones", S.SequentialLR, opt, {S.StepLR(opt, 2), S.StepLR(opt, 3)}, {})
      local other = optimizer("sgd")
      fails("SequentialLR: scheduler 2 %(StepLR%) drives another optimizer", S.SequentialLR, opt,
            {S.StepLR(opt, 2), S.StepLR(other, 3)}, {4})
      local once = S.OneCycleLR(optimizer("adamw"), 0.1, {total_steps = 2})
      once:step(); once:step()
      fails("OneCycleLR.step: stepped 3 times, more than total_steps = 2", once.step, once)
    end)
  end)
end)
