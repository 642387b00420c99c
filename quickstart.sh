#!/usr/bin/env bash
# Set up, then render the example clip to out/quickstart.mp4 (the real model on a CUDA machine with
# reachable weights, otherwise the tiny random-weight twin, which the command announces).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
mkdir -p out
exec .venv/bin/i2v demo -o out/quickstart.mp4 "$@"
