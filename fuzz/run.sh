#!/usr/bin/env bash
# Builds the store's libFuzzer target with clang (AddressSanitizer + UBSan) and runs it for a
# bounded time: the manifest decoder and the chunk-table reader (fuzz/fuzz_store.c).
# Usage: fuzz/run.sh [seconds, default 20]. Exits non-zero when the fuzzer finds a crash;
# the reproducer is left in $build as crash-*. Needs clang and libclang-rt-14-dev.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
build=${FUZZ_BUILD_DIR:-build-fuzz}
if ! command -v clang >/dev/null; then
  echo "fuzz: clang is missing (apt-get install -y clang libclang-rt-14-dev)" >&2
  exit 1
fi
# clang 14 has no _Float16 on x86; the runtime only stores halves in it, which __fp16 also does.
cmake -S . -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMS_WITH_CUDA=OFF -DMS_WITH_MPI=OFF -DMS_SANITIZE=ON -DMS_FUZZ=ON \
  -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link -D_Float16=__fp16" >/dev/null
cmake --build "$build" --target fuzz_store fuzz_seeds -j2 >/dev/null
corpus="$build/fuzz-corpus"
mkdir -p "$corpus"
"$build/fuzz_seeds" "$corpus"
cd "$build"
ASAN_OPTIONS=detect_leaks=1 ./fuzz_store -max_total_time="$seconds" -max_len=4096 \
  -print_final_stats=1 fuzz-corpus 2>&1 | tail -n 12
