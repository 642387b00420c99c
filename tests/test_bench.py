"""The benchmarks run in CI-sized form: the engine's frames equal the stock pipeline's, and the server reports its overhead.

It asserts no timing: speed is reported by the benchmark, never asserted by a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), timeout=900,
    )  # fmt: skip


def test_cpu_benchmark_reports_ratio_and_identical_frames(tmp_path: Path) -> None:
    result = run_bench("bench.cpu", "--repeats", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["frames_identical"] is True
    assert report["ratio_engine_over_stock"] > 0 and report["engine_s"] > 0 and report["stock_s"] > 0
    assert report["output"] == "1280x720x121"
    assert "| ratio_engine_over_stock |" in result.stdout


def test_server_benchmark_reports_create_to_start_and_overhead(tmp_path: Path) -> None:
    result = run_bench("bench.server", "--predictions", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "server.json").read_text())
    assert report["predictions"] == 1
    assert 0 <= report["median_create_to_start_s"] <= report["median_total_s"]
    assert report["median_predict_s"] > 0 and report["ratio_total_over_predict"] >= 1.0
