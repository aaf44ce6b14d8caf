-- Command-line options of examples/train.lua: defaults, parsing and the usage text.
local M = {}

-- name, kind ("int" | "number" | "string" | "flag"), default, help
local SPEC = {
  {"nproc", "int", 4, "local ranks to fork (ignored under mpirun or moonshard run)"},
  {"strategy", "string", "FULL_SHARD", "FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD | _HYBRID_SHARD_ZERO2"},
  {"ac", "string", "full", "activation checkpointing per block: none | full | selective | offload"},
  {"steps", "int", 300, "training steps (the learning-rate schedule spans them)"},
  {"stop-after", "int", nil, "end after this step, as if interrupted (continue with --resume)"},
  {"batch", "int", 32, "global batch (sequences per step, split evenly over the ranks)"},
  {"seq", "int", 64, "characters per sequence"},
  {"model", "string", nil, "size preset: gpt2 (12 layers, 768 wide, 12 heads, tied embeddings) or gpt2-tiny; replaces --layers/--dim/--heads"},
  {"layers", "int", 3, "transformer blocks"},
  {"dim", "int", 96, "embedding width"},
  {"heads", "int", 4, "attention heads (must divide --dim)"},
  {"lr", "number", 3e-3, "AdamW learning rate (cosine decay to a tenth after 10% warm-up)"},
  {"seed", "int", 0, "seed of the initial weights and of the batches"},
  {"ckpt", "string", nil, "checkpoint store directory (dcp); nothing is saved without it"},
  {"save-every", "int", 0, "save every N steps into --ckpt (0: only after the last step)"},
  {"resume", "flag", false, "continue from the latest step in --ckpt"},
  {"data", "string", "examples/data/shakespeare.txt", "training text"},
  {"out", "string", "build/run", "directory for metrics.jsonl and sample.txt"},
  {"sample", "int", 300, "characters to generate after training (0: none)"},
  {"log-every", "int", 10, "keep a progress line every N steps"},
  {"repl", "flag", false, "after training, open the REPL on rank 0 over the live sharded model"},
}

local STRATEGIES = {FULL_SHARD = true, SHARD_GRAD_OP = true, NO_SHARD = true, HYBRID_SHARD = true,
                    _HYBRID_SHARD_ZERO2 = true}
local AC_MODES = {none = true, full = true, selective = true, offload = true}

function M.usage()
  local lines = {"usage: luajit examples/train.lua [options]", "",
                 "Trains a GPT-style character model with FSDP on local ranks (or under mpirun).", ""}
  for _, s in ipairs(SPEC) do
    local name = s[2] == "flag" and "--" .. s[1] or ("--%s %s"):format(s[1], s[2] == "string" and "S" or "N")
    local default = s[3] ~= nil and s[2] ~= "flag" and (" (default %s)"):format(tostring(s[3])) or ""
    lines[#lines + 1] = ("  %-20s %s%s"):format(name, s[4], default)
  end
  lines[#lines + 1] = "  --help               this text"
  return table.concat(lines, "\n") .. "\n"
end

local function key_of(name) return (name:gsub("-", "_")) end

-- Parse argv (an array of strings). Returns options (keys with "_" for "-"), or nil and
-- a message naming what was wrong; returns "help" for --help.
function M.parse(argv)
  local opts, by_name = {}, {}
  for _, s in ipairs(SPEC) do
    opts[key_of(s[1])] = s[3]
    by_name[s[1]] = s
  end
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--help" or a == "-h" then return "help" end
    local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
    name = name or a:match("^%-%-([%w%-]+)$")
    local s = name and by_name[name]
    if not s then return nil, ("unknown option '%s'"):format(a) end
    if s[2] == "flag" then
      opts[key_of(name)] = true
    else
      local value = inline
      if value == nil then
        i = i + 1
        value = argv[i]
      end
      if value == nil then return nil, ("--%s needs a value"):format(name) end
      if s[2] ~= "string" then
        local n = tonumber(value)
        if not n or (s[2] == "int" and n % 1 ~= 0) then
          return nil, ("--%s needs %s, got '%s'"):format(name, s[2] == "int" and "an integer" or "a number", value)
        end
        value = n
      end
      opts[key_of(name)] = value
    end
    i = i + 1
  end
  return M.check(opts)
end

function M.check(o)
  local function bad(fmt, ...) return nil, fmt:format(...) end
  for _, key in ipairs({"nproc", "steps", "batch", "seq", "layers", "dim", "heads"}) do
    if o[key] < 1 then return bad("--%s must be at least 1, got %s", key, tostring(o[key])) end
  end
  if o.stop_after and o.stop_after < 1 then return bad("--stop-after must be at least 1") end
  if o.lr <= 0 then return bad("--lr must be positive, got %s", tostring(o.lr)) end
  if o.save_every < 0 then return bad("--save-every must be >= 0") end
  if not STRATEGIES[o.strategy] then return bad("unknown --strategy '%s'", o.strategy) end
  if not AC_MODES[o.ac] then return bad("unknown --ac '%s' (expected none, full, selective or offload)", o.ac) end
  if o.dim % o.heads ~= 0 then return bad("--heads %d must divide --dim %d", o.heads, o.dim) end
  if o.resume and not o.ckpt then return bad("--resume needs --ckpt DIR") end
  return o
end

return M
