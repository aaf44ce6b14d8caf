#!/usr/bin/env bash
# Runs bench/fsdp.lua and bench/torch_fsdp.py with the same models, batch, world sizes and
# strategies, and prints one JSON line per configuration with both step times and the
# ratio moonshard / PyTorch (targets: <= 0.75 on the transformer, <= 0.3 on the small MLP).
# PyTorch comes from PyPI into a virtualenv (default .bench-venv, or $TORCH_PYTHON).
# Usage: bench/compare.sh [--model transformer|mlp|all] [--steps N] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${TORCH_PYTHON:-}
if [ -z "$python" ]; then
  venv=.bench-venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch numpy
  fi
  python=$venv/bin/python
fi
ours=$(mktemp)
theirs=$(mktemp)
trap 'rm -f "$ours" "$theirs"' EXIT
luajit bench/fsdp.lua "$@" | tee "$ours"
"$python" bench/torch_fsdp.py "$@" | tee "$theirs"
luajit - "$ours" "$theirs" <<'LUA'
local function read(path)
  local rows = {}
  for line in io.lines(path) do
    local model = line:match('"model":%s*"([^"]+)"')
    local strategy = line:match('"strategy":%s*"([^"]+)"')
    local size = line:match('"world_size":%s*(%d+)')
    local ms = tonumber(line:match('"step_ms":%s*([%d.e+-]+)'))
    if model and ms then rows[model .. "/" .. strategy .. "/" .. size] = ms end
  end
  return rows
end
local ours, theirs = read(arg[1]), read(arg[2])
local keys = {}
for key in pairs(ours) do if theirs[key] then keys[#keys + 1] = key end end
table.sort(keys)
for _, key in ipairs(keys) do
  local model, strategy, size = key:match("([^/]+)/([^/]+)/(%d+)")
  print(string.format('{"bench":"compare","model":"%s","strategy":"%s","world_size":%s,"moonshard_ms":%.4g,' ..
                      '"torch_ms":%.4g,"ratio":%.3f}', model, strategy, size, ours[key], theirs[key],
                      ours[key] / theirs[key]))
end
LUA
