-- Command-line options of examples/train.lua: defaults, parsing (lua-argparse) and the
-- usage text.
local argparse = require "argparse"

local M = {}

-- The bundled text, next to this file wherever the example is run from.
local DATA = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".") .. "/data/shakespeare.txt"

-- name, kind ("int" | "number" | "string" | "flag"), default, help
local SPEC = {
  {"nproc", "int", 4, "local ranks to fork (ignored under mpirun or moonshard run)"},
  {"strategy", "string", "FULL_SHARD", "FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD | _HYBRID_SHARD_ZERO2"},
  {"ac", "string", "full", "activation checkpointing per block: none | full | selective | offload"},
  {"dtype", "string", "f32", "compute dtype: f32, or bf16 | f16 mixed precision over f32 masters (f16 with loss scaling)"},
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
  {"data", "string", DATA, "training text"},
  {"out", "string", "build/run", "directory for metrics.jsonl and sample.txt"},
  {"sample", "int", 300, "characters to generate after training (0: none)"},
  {"log-every", "int", 10, "keep a progress line every N steps"},
  {"repl", "flag", false, "after training, open the REPL on rank 0 over the live sharded model"},
}

local STRATEGIES = {FULL_SHARD = true, SHARD_GRAD_OP = true, NO_SHARD = true, HYBRID_SHARD = true,
                    _HYBRID_SHARD_ZERO2 = true}
local AC_MODES = {none = true, full = true, selective = true, offload = true}
local DTYPES = {f32 = true, bf16 = true, f16 = true}

local function key_of(name) return (name:gsub("-", "_")) end

-- "--steps needs an integer, got 'three'"
local function number_of(name, kind)
  return function(text)
    local n = tonumber(text)
    if n and (kind == "number" or n % 1 == 0) then return n end
    return nil, ("--%s needs %s, got '%s'"):format(name, kind == "int" and "an integer" or "a number", tostring(text))
  end
end

local function parser()
  local p = argparse("luajit examples/train.lua",
                     "Trains a GPT-style character model with FSDP on local ranks (or under mpirun).")
    :add_help(false)
  for _, s in ipairs(SPEC) do
    local name, kind, default, help = s[1], s[2], s[3], s[4]
    if kind == "flag" then
      p:flag("--" .. name, help):target(key_of(name))
    else
      local option = p:option("--" .. name, help):target(key_of(name)):argname(kind == "string" and "S" or "N")
      if default ~= nil then option:default(tostring(default)) end
      if kind ~= "string" then option:convert(number_of(name, kind)) end
    end
  end
  p:flag("-h --help", "this text")
  return p
end

function M.usage() return parser():get_help() .. "\n" end

-- Parse argv (an array of strings). Returns options (keys with "_" for "-"), or nil and
-- a message naming what was wrong; returns "help" for --help.
function M.parse(argv)
  for _, a in ipairs(argv) do if a == "--help" or a == "-h" then return "help" end end
  -- a negative number is a value ("--lr -1"), not an option
  local joined, i = {}, 1
  while i <= #argv do
    local a, nxt = argv[i], argv[i + 1]
    if a:match("^%-%-[%w%-]+$") and nxt and nxt:match("^%-") and tonumber(nxt) then
      joined[#joined + 1], i = a .. "=" .. nxt, i + 2
    else
      joined[#joined + 1], i = a, i + 1
    end
  end
  local ok, opts = parser():pparse(joined)
  if not ok then return nil, opts end
  opts.help = nil
  return M.check(opts)
end

function M.check(o)
  local function bad(fmt, ...) return nil, fmt:format(...) end
  for _, key in ipairs({"nproc", "steps", "batch", "seq", "layers", "dim", "heads"}) do
    if o[key] < 1 then return bad("--%s must be at least 1, got %s", key, tostring(o[key])) end
  end
  if o.stop_after and o.stop_after < 1 then return bad("--stop-after must be at least 1") end
  if not (o.lr > 0 and o.lr < math.huge) then
    return bad("--lr must be a positive finite number, got %s", tostring(o.lr))
  end
  if o.seed < 0 then return bad("--seed must be a non-negative integer, got %s", tostring(o.seed)) end
  if o.log_every < 1 then return bad("--log-every must be at least 1, got %s", tostring(o.log_every)) end
  if o.sample < 0 then return bad("--sample must be >= 0 (0: no sample), got %s", tostring(o.sample)) end
  if o.save_every < 0 then return bad("--save-every must be >= 0") end
  if not STRATEGIES[o.strategy] then return bad("unknown --strategy '%s'", o.strategy) end
  if not DTYPES[o.dtype] then return bad("unknown --dtype '%s' (expected f32, bf16 or f16)", o.dtype) end
  if not AC_MODES[o.ac] then return bad("unknown --ac '%s' (expected none, full, selective or offload)", o.ac) end
  if o.dim % o.heads ~= 0 then return bad("--heads %d must divide --dim %d", o.heads, o.dim) end
  if o.resume and not o.ckpt then return bad("--resume needs --ckpt DIR") end
  return o
end

return M
