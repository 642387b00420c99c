#!/usr/bin/env bash
# The GPU run, one call of the device tool: install the carried wheels (bench/wheels.sh made .whl/), then
# the measurements in order of value (bench/device.py), each writing its figures under $OUT as it ends.
#   bash bench/device.sh --parts standard,warmup --budget-s 320      (call 1; see docs/benchmarks.md)
#   bash bench/device.sh --parts pro,fast,turbo,low-vram --budget-s 320   (call 2)
# Environment: OUT (required: where results go), PYTHON (python3), WHEELS (.whl), SITE (/tmp/site).
# The CPU rehearsal runs this same script with the rehearsal's Python and the cp311 wheels.
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
site=${SITE:-/tmp/site}
mkdir -p "$OUT"
ls "$wheels"/*.whl >/dev/null || { echo "device.sh: no wheels in $wheels (run bench/wheels.sh here first)" >&2; exit 1; }
"$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
exec "$python" -m bench.device --out "$OUT" --started "$started" "$@"
