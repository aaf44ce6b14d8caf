-- Text generation after training: the sharded model's full weights are gathered to rank 0,
-- which samples characters from an unsharded copy (temperature 0.8).
local ms = require "moonshard"
local gpt = require "gpt"
local fsdp = ms.fsdp

local M = {}

local function pick(probabilities, u)
  local total = 0
  for i, p in ipairs(probabilities) do
    total = total + p
    if u <= total then return i - 1 end
  end
  return #probabilities - 1
end

-- Sample length characters after prompt from an unsharded model.
function M.generate(model, config, corpus, opts)
  local random = opts.random or math.random
  local ids = corpus:encode(opts.prompt or "\n")
  local prompt_length = #ids
  model:eval()
  ms.no_grad(function()
    for _ = 1, opts.length do
      local first = math.max(1, #ids - config.seq + 1)
      local context = {}
      for i = first, #ids do context[#context + 1] = ids[i] end
      local logits = model(ms.tensor({context}, {dtype = "i64"}))
      local last = logits:select(1, #context - 1) / (opts.temperature or 0.8)
      local probabilities = last:softmax(1):reshape(-1):table()
      ids[#ids + 1] = pick(probabilities, random())
    end
  end)
  local generated = {}
  for i = prompt_length + 1, #ids do generated[#generated + 1] = ids[i] end
  return corpus:decode(generated)
end

-- Every rank calls this (gathering is a collective); rank 0 returns the text, others nil.
function M.generate_on_rank0(model, config, corpus, opts)
  if opts.length <= 0 then return nil end
  fsdp.set_state_dict_type(model, "FULL_STATE_DICT", {rank0_only = true})
  local full = model:state_dict()
  fsdp.set_state_dict_type(model, "SHARDED_STATE_DICT")
  if ms.dist.get_rank() ~= 0 then return nil end
  local copy = gpt.GPT(config)
  copy:load_state_dict(full)
  math.randomseed(opts.seed)
  return M.generate(copy, config, corpus, {length = opts.length})
end

return M
