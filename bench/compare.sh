#!/usr/bin/env bash
# Runs bench/fsdp.lua and bench/torch_fsdp.py pair by pair (one of each per pair, the order
# alternating, default 5 pairs) with the same models, batch, world sizes and strategies;
# prints each pair's ratio moonshard / PyTorch as it comes, then per configuration the
# medians and ranges of both step times and of the ratio (targets: <= 0.7 on the
# transformer at world 1, <= 0.5 under FSDP, <= 0.2 on the small MLP), with bound_ratio: the
# ratio that running every FLOP at the sgemm rate of the same run would give (compare_rows.lua).
# PyTorch comes from PyPI into a virtualenv (default .bench-venv, or $TORCH_PYTHON).
# Usage: bench/compare.sh [--pairs N] [--model transformer|mlp|all] [--strategy S]
#                         [--world-size N] [--steps N] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=5
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) pairs=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
python=${TORCH_PYTHON:-}
if [ -z "$python" ]; then
  venv=.bench-venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch numpy
  fi
  python=$venv/bin/python
fi
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
for pair in $(seq 1 "$pairs"); do
  # alternate which program goes first, so a drift in the machine's load hits both alike
  if [ $((pair % 2)) -eq 1 ]; then order="ours theirs"; else order="theirs ours"; fi
  for who in $order; do
    if [ "$who" = ours ]; then
      luajit bench/fsdp.lua "${args[@]}" > "$runs/ours.$pair"
    else
      "$python" bench/torch_fsdp.py "${args[@]}" > "$runs/theirs.$pair"
    fi
  done
  luajit bench/compare_rows.lua pair "$runs" "$pair"
done
luajit bench/compare_rows.lua summary "$runs" "$pairs"
