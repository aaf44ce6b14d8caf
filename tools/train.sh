#!/usr/bin/env bash
# The main job: installs and builds what is needed (tools/setup.sh), then trains the
# example model. Extra arguments go to examples/train.lua.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec luajit examples/train.lua "$@"
