#!/usr/bin/env bash
# Download the wheels the GPU run carries (bench/carry.txt) into the ignored .whl/ folder, and print what
# the GPU call sends: the working tree plus the wheels, against the device tool's 64 MiB.
#   bench/wheels.sh                              cp312 manylinux wheels for the GPU machine, into .whl/
#   bench/wheels.sh --python 3.11 --dest DIR     the same versions for Python 3.11 (the CPU rehearsal)
#   bench/wheels.sh --leave-out NAME             all but NAME (to see the rehearsal fail without it)
# pip's cache keeps repeated runs quick. Wheels not in the list are removed from the folder (the install
# takes one version of each).
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=3.12
dest=.whl
leave_out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) pyver=$2; shift 2 ;;
        --dest) dest=$2; shift 2 ;;
        --leave-out) leave_out=$2; shift 2 ;;
        *) echo "wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
mkdir -p "$dest"
requirements=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' bench/carry.txt | grep -v '^$' | grep -v -i "^${leave_out:-<none>}==" || true)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$dest" $requirements
# Keep exactly the listed versions: a wheel left from an older list would be installed beside its successor.
"$python" - "$dest" $requirements <<'PY'
import re, sys
from pathlib import Path
folder, wanted = Path(sys.argv[1]), {re.sub(r"[-_.]+", "_", r.split("==")[0]).lower() + "-" + r.split("==")[1] for r in sys.argv[2:]}
for wheel in folder.glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if f"{name.lower()}-{version}" not in wanted:
        print(f"wheels.sh: removing {wheel.name} (not in bench/carry.txt)")
        wheel.unlink()
PY
wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
count=$(ls "$dest"/*.whl | wc -l)
awk -v w="$wheels" -v t="$tree" -v n="$count" -v d="$dest" 'BEGIN {
    mib = 1024 * 1024
    printf "wheels.sh: %d wheels in %s, %.1f MiB; tree %.1f MiB; sent together %.1f MiB of 64 MiB\n", n, d, w / mib, t / mib, (w + t) / mib
    exit (w + t > 64 * mib)
}' || { echo "wheels.sh: over the device tool's 64 MiB" >&2; exit 1; }
