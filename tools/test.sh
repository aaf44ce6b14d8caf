#!/usr/bin/env bash
# Runs every test: the FFI declarations check, the C unit tests (CTest) and the busted
# specs (plain `busted`; .busted runs them under LuaJIT), on the release build, again under
# a profiling signal and under AddressSanitizer + UBSan, the specs under mpirun and the
# two-host run. Ends with the line
# "N passed, N failed". Installs and builds what it needs first (tools/setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --sanitize || { echo "0 passed, 1 failed"; exit 1; }

passed=0
failed=0
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

count_ctest() { # log file
  local total fails
  total=$(grep -Eo 'tests failed out of [0-9]+' "$1" | grep -Eo '[0-9]+$' || echo 0)
  fails=$(grep -Eo '[0-9]+ tests failed out of' "$1" | grep -Eo '^[0-9]+' || echo 0)
  [ -z "$total" ] && total=0
  [ -z "$fails" ] && fails=0
  passed=$((passed + total - fails))
  failed=$((failed + fails))
}

count_busted() { # log file, exit status
  local line ok fail err
  line=$(grep -E '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors?' "$1" | tail -1)
  if [ -z "$line" ]; then failed=$((failed + 1)); return; fi
  ok=$(echo "$line" | grep -Eo '^[0-9]+')
  fail=$(echo "$line" | grep -Eo '[0-9]+ failure' | grep -Eo '[0-9]+')
  err=$(echo "$line" | grep -Eo '[0-9]+ error' | grep -Eo '[0-9]+')
  passed=$((passed + ok))
  failed=$((failed + fail + err))
}

count_plain() { # log file ending with "N passed, N failed"
  local line
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$1" | tail -1)
  if [ -z "$line" ]; then failed=$((failed + 1)); return; fi
  passed=$((passed + $(echo "$line" | grep -Eo '^[0-9]+')))
  failed=$((failed + $(echo "$line" | grep -Eo '[0-9]+ failed' | grep -Eo '[0-9]+')))
}

step() { echo; echo "== $*"; }

step "FFI declarations match runtime headers"
if luajit tools/gen_cdef.lua --check; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

step "runtime layers: no circles, leaves stay leaves (tools/layers.lua)"
if luajit tools/layers.lua; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

step "C unit tests (release)"
(cd build && ctest --output-on-failure -j2) 2>&1 | tee "$log_dir/ctest.log"
count_ctest "$log_dir/ctest.log"

step "C unit tests (address + undefined sanitizers)"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j2) 2>&1 | tee "$log_dir/ctest-asan.log"
count_ctest "$log_dir/ctest-asan.log"

step "specs (release)"
busted -o utfTerminal 2>&1 | tee "$log_dir/busted.log"
count_busted "$log_dir/busted.log"

# Every luajit process starts LuaJIT's sampling profiler, whose 1 ms SIGPROF lands in
# whatever runs: kernels, GEMMs, collectives, the store's system calls. (LUA_INIT_5_2 keeps
# the `lua` that launches busted from loading it; the install spec runs luajit without
# LuaJIT's own modules on its path.)
step "specs under a 1 ms profiling signal (jit.p in every luajit process)"
LUA_INIT_5_2="local _" LUA_INIT="require('jit.p').start('f,i1', '/dev/null')" \
  busted -o utfTerminal --exclude-tags=slow,gpu,noasan 2>&1 |
  tee "$log_dir/busted-signals.log"
count_busted "$log_dir/busted-signals.log"

# ---- specs under mpirun -n 4 (tools/test_mpi.sh: the collective specs on the mpi backend) ----
step "specs under mpirun -n 4"
MOONSHARD_LIB=$PWD/build/libmoonshard.so bash tools/test_mpi.sh 2>&1 | tee "$log_dir/busted-mpi.log"
count_busted "$log_dir/busted-mpi.log"
# ---- end of the mpirun block ----

step "several hosts: network namespaces, OpenMPI over TCP (tools/test_multihost.sh)"
bash tools/test_multihost.sh 2>&1 | tee "$log_dir/multihost.log"
count_plain "$log_dir/multihost.log"

step "specs (address + undefined sanitizers)"
asan_runtime=$(gcc -print-file-name=libasan.so)
MOONSHARD_LIB=build-asan/libmoonshard.so LD_PRELOAD="$asan_runtime" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  busted -o utfTerminal --exclude-tags=slow,gpu,noasan 2>&1 | tee "$log_dir/busted-asan.log"
count_busted "$log_dir/busted-asan.log"

step "fuzz the store decoders"
# One test: the manifest and chunk-table decoders under libFuzzer for a bounded time.
if bash fuzz/run.sh 20 2>&1 | tee "$log_dir/fuzz.log"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
