#!/usr/bin/env bash
# Set up with the test tools, then run the test suite (and ruff). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev
.venv/bin/ruff check src tests bench predict.py
.venv/bin/ruff format --check src tests bench predict.py
# Three workers on CI's two cores: much of a test waits on a server, a browser, a cluster or a download,
# and a third worker fills those waits (the figures are in DEVELOPERS.md).
# The slowest 20 are listed at the end: the suite has a time budget (DEVELOPERS.md).
exec .venv/bin/python -m pytest -n "${I2V_TEST_WORKERS:-3}" --dist loadscope --durations=20 "$@"
