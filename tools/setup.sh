#!/usr/bin/env bash
# Installs moonshard's Debian packages (only the missing ones) and builds build/ (and, with
# --sanitize, build-asan/). Safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config luajit libluajit-5.1-dev lua-busted lua-dkjson
          lua-argparse luarocks liblmdb-dev lmdb-utils libopenblas-dev libdnnl-dev libopenmpi-dev
          openmpi-bin libxxhash-dev clang libclang-rt-14-dev libreadline8 gnuplot-nox iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
# The backends are said explicitly, so a build/ configured before CUDA or OpenMPI existed
# switches too: with nvcc, build/ is the CUDA build (kernels for one architecture plus PTX,
# see CMakeLists.txt); with OpenMPI's compiler wrapper (libopenmpi-dev, installed above),
# the mpi backend is in.
cuda=OFF
if [ -n "${CUDACXX:-}" ] || command -v nvcc >/dev/null; then cuda=ON; fi
mpi=OFF
if command -v mpicc >/dev/null; then mpi=ON; fi
jobs=$(nproc)
configure() { # build dir, cmake options...
  local dir=$1 summary
  shift
  summary=$(cmake -S . -B "$dir" "$@" | grep -E '^-- moonshard [0-9]') || {
    cmake -S . -B "$dir" "$@" >&2
    exit 1
  }
  echo "setup: $dir: ${summary#-- }"
}
configure build -DCMAKE_BUILD_TYPE=Release -DMS_WITH_CUDA=$cuda -DMS_WITH_MPI=$mpi
cmake --build build -j"$jobs" >/dev/null
if [ "${1:-}" = "--sanitize" ]; then
  configure build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMS_SANITIZE=ON -DMS_WITH_CUDA=OFF -DMS_WITH_MPI=$mpi
  cmake --build build-asan -j"$jobs" >/dev/null
fi
echo "setup: built build/libmoonshard.so (CUDA $cuda, MPI $mpi)"
