#!/usr/bin/env bash
# Runs the collective specs under `mpirun -n 4` (the mpi backend) and prints one line
# "N successes / N failures / N errors / N pending" summed over the four processes.
# Usage (repository root): bash tools/test_mpi.sh [spec files...]
# Default: specs/dist_*_spec.lua, specs/fsdp_*_spec.lua (parity with the unsharded model,
# docs/DESIGN.md section 8, state dicts, training features, memory), specs/dtensor_spec.lua and specs/amp_spec.lua
# in full, plus the tests tagged #mpi in other spec files.
# The library is $MOONSHARD_LIB, else build/libmoonshard.so.
set -uo pipefail
cd "$(dirname "$0")/.."

processes=4
export MOONSHARD_LIB=${MOONSHARD_LIB:-$PWD/build/libmoonshard.so}
export LUA_PATH='lua/?.lua;lua/?/init.lua;specs/?.lua;;'
# The specs spawn 1 to 4 ranks: let dist.spawn(n < 4) run on the first n processes.
export MOONSHARD_SPAWN_SUBGROUPS=1

if ! command -v mpirun >/dev/null; then
  echo "test_mpi: mpirun not found (install openmpi-bin)" >&2
  echo "0 successes / 0 failures / 1 errors / 0 pending"
  exit 1
fi

output_dir=$(mktemp -d)
trap 'rm -rf "$output_dir"' EXIT

successes=0 failures=0 errors=0 pending=0

# busted, then a barrier, then exit status 0: mpirun aborts every process once one exits
# with another status, which cuts the others' output short and leaves OpenMPI's segments
# in /dev/shm. Failures are read from the summaries instead.
cat >"$output_dir/busted_then_barrier.lua" <<'LUA'
local function finish()
  io.stdout:flush()
  pcall(function() require("moonshard").dist.barrier() end)
  os.exit(0, true)
end
require("busted.compatibility").exit = finish -- the runner's way out, taken when it loads
pcall(require("busted.runner"), {standalone = false})
finish()
LUA

# One busted run under mpirun: every process writes its own output file; each must end
# with a summary, or the run counts as one error.
run_under_mpirun() { # label, busted arguments...
  local label=$1
  shift
  local dir="$output_dir/$label"
  echo "-- $label: mpirun -n $processes busted $*"
  timeout --kill-after=10 600 \
    mpirun --allow-run-as-root --oversubscribe -n "$processes" --output-filename "$dir" \
    luajit "$output_dir/busted_then_barrier.lua" --ignore-lua -o plainTerminal "$@" >"$output_dir/$label.mpirun" 2>&1
  local status=$? summaries=0 reported_bad=0 file line
  for file in "$dir"/1/rank.*/stdout; do
    [ -f "$file" ] || continue
    line=$(grep -E '^[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' "$file" | tail -1)
    if [ -z "$line" ]; then
      echo "test_mpi: $label: ${file#"$dir"/1/} printed no summary:" >&2
      tail -20 "$file" >&2
      continue
    fi
    summaries=$((summaries + 1))
    read -r ok _ _ fail _ _ err _ _ skip _ <<<"$line"
    successes=$((successes + ok))
    failures=$((failures + fail))
    errors=$((errors + err))
    pending=$((pending + skip))
    if [ "$fail" -gt 0 ] || [ "$err" -gt 0 ]; then
      reported_bad=1
      echo "test_mpi: $label: ${file#"$dir"/1/}:" >&2
      sed -n '/^\(Failure\|Error\) -> /,$p' "$file" >&2
    fi
  done
  if [ "$summaries" -ne "$processes" ] || { [ "$status" -ne 0 ] && [ "$reported_bad" -eq 0 ]; }; then
    echo "test_mpi: $label: $summaries of $processes processes finished (mpirun status $status):" >&2
    tail -20 "$output_dir/$label.mpirun" >&2
    errors=$((errors + 1))
  fi
}

if [ $# -gt 0 ]; then
  run_under_mpirun given "$@"
else
  run_under_mpirun specs specs/dist_*_spec.lua specs/fsdp_*_spec.lua specs/dtensor_spec.lua specs/amp_spec.lua
  tagged=()
  for spec in specs/*_spec.lua; do
    case "$spec" in specs/dist_* | specs/fsdp_* | specs/dtensor_spec.lua) continue ;; esac
    grep -q '#mpi' "$spec" && tagged+=("$spec")
  done
  if [ ${#tagged[@]} -gt 0 ]; then
    run_under_mpirun tagged --tags=mpi "${tagged[@]}"
  fi
fi

echo "$successes successes / $failures failures / $errors errors / $pending pending"
[ $((failures + errors)) -eq 0 ]
