#!/usr/bin/env bash
# Make (or update) the virtual environment at .venv with the `i2v` command in it.
#   ./setup.sh          runtime dependencies
#   ./setup.sh --dev    plus the test and lint tools
# Torch goes in first: on a machine with an NVIDIA GPU the normal (CUDA) build from PyPI,
# elsewhere the pinned CPU build (I2V_TORCH overrides the requirement either way).
set -euo pipefail
cd "$(dirname "$0")"

python=""
for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        python=$candidate
        break
    fi
done
[ -n "$python" ] || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    if [ -n "${I2V_TORCH:-}" ]; then
        torch_req=$I2V_TORCH
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        torch_req="torch"
    else
        torch_req="torch==2.13.0"
    fi
    echo "setup: installing $torch_req"
    "${pip[@]}" "$torch_req"
fi

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
# The rest with uv: the same resolution in seconds where pip takes minutes (it keeps the torch above, which
# satisfies the requirement). pip stays the fallback: uv reads no pip.conf, so on a machine whose packages
# come from a mirror only pip is configured for, uv fails and pip installs the lot.
# --compile-bytecode as pip does by default: uv writes no .pyc, and where PYTHONDONTWRITEBYTECODE is set (this
# box, many CI images) Python never writes them either, so every process would compile diffusers,
# transformers and the rest from source: 15 CPU-s to import a model worker instead of 9.
if ! { "${pip[@]}" uv && .venv/bin/uv pip install --python .venv/bin/python --quiet --compile-bytecode -e ".${extras}"; }; then
    echo "setup: uv could not install the dependencies; installing them with pip"
    "${pip[@]}" -e ".${extras}"
fi

# The web page's tests drive Debian's chromium through Playwright (never `playwright install`).
if [ -n "$extras" ] && ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing chromium (apt) for the browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: no chromium here (and not root with apt-get): the browser tests will be skipped"
    fi
fi
# The several-servers tests start a real PostgreSQL (Debian's, in a temporary cluster; never a system service).
if [ -n "$extras" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing postgresql (apt) for the several-servers tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup: no PostgreSQL here (and not root with apt-get): the PostgreSQL tests will be skipped"
    fi
fi
# axe-core and the official JS client for the browser tests, pinned by tests/web-tools/package-lock.json
# (npm ci installs exactly that, into the ignored tests/web-tools/node_modules).
if [ -n "$extras" ]; then
    tools=tests/web-tools
    if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing nodejs and npm (apt) for the browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    if ! command -v npm >/dev/null; then
        echo "setup: no npm here: the accessibility check and the JS snippet test will be skipped"
    elif ! cmp -s "$tools/package-lock.json" "$tools/node_modules/.i2v-installed-lock"; then
        echo "setup: installing the browser test tools (npm ci in $tools)"
        (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error)
        cp "$tools/package-lock.json" "$tools/node_modules/.i2v-installed-lock"
    fi
fi
echo "setup: ready (.venv/bin/i2v)"
