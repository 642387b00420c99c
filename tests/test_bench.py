"""The benchmarks run in CI-sized form: the engine's frames equal the stock pipeline's, and the server reports its overhead.

It asserts no timing: speed is reported by the benchmark, never asserted by a test. The GPU benchmark
(bench.gpu) is the device run's first part: tests/test_device_rehearsal.py runs it at tiny size on CPU and
checks its report.
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


def test_parallel_benchmark_on_two_cpu_ranks_reports_identical_frames(tmp_path: Path) -> None:
    # Two CPU ranks over gloo: the group's code path, not its speed (that needs GPUs).
    result = run_bench(
        "bench.parallel", "--devices", "cpu+cpu", "--model", "tiny", "--repeats", "1", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "parallel.json").read_text())
    assert (
        report["plans"] == ["auto"] and report["auto_frames_identical"] is report["frames_identical"] is True
    )
    assert report["single_model_size"] == report["group_auto_model_size"]
    assert "CFG parallel across 2 ranks" in report["group_auto_placement"]  # the configured plan: auto
    assert report["speedup_auto_model"] > 0 and report["speedup_auto_end_to_end"] > 0


def test_compiled_blocks_never_reach_the_recompile_limit_over_every_request_shape(tmp_path: Path) -> None:
    # Standard and turbo at 8 aspect ratios x 2 durations, then fast requests (step cache on the compiled
    # blocks), compiled the way `place()` compiles (dynamo's eager backend: the same guards, no codegen).
    result = run_bench("bench.recompiles", "--strategies", "product", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "recompiles.json").read_text())
    assert report["product_requests"] == 40 and report["product_requests_failed"] == 0
    assert report["product_limit_reached"] is False
    # One graph per batch size (CFG batched: 2; turbo: 1), both compiled by each model's first request.
    assert report["product_graphs_compiled"] == 2 < report["product_recompile_limit"]
    new = report["product_new_graphs_per_request"]
    assert new[0] == 1 and new[16] == 1 and sum(new) == 2
