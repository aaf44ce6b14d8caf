#!/usr/bin/env bash
# The main job: installs and builds what is needed (tools/setup.sh), then trains the
# example character model on 4 local ranks with FULL_SHARD and per-block activation
# checkpointing, saving checkpoints into build/run/ckpt, and finally lists the store and
# plots the loss curve. Each run starts afresh in build/run, unless --resume continues the
# last one. Extra arguments go to examples/train.lua (e.g. --steps 50; --help prints its
# options and touches nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
run=build/run
export LUA_PATH='lua/?.lua;lua/?/init.lua;;'
fresh=1
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec luajit examples/train.lua --help ;;
    --resume) fresh=0 ;;
  esac
done
if [ "$fresh" = 1 ]; then rm -rf "$run"; fi
luajit examples/train.lua --nproc 4 --strategy FULL_SHARD --ac full \
  --ckpt "$run/ckpt" --save-every 100 --out "$run" "$@"
echo
bin/moonshard ckpt ls "$run/ckpt"
bin/moonshard plot "$run/metrics.jsonl" -o "$run/loss.png"
echo "metrics: $run/metrics.jsonl  sample: $run/sample.txt  loss curve: $run/loss.png"
