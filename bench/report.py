"""What every benchmark leaves behind: the figures as JSON and as a Markdown table (also printed)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def max_abs_diff(ours: np.ndarray, stock: np.ndarray) -> float:
    """The largest difference between two clips' frames (reported beside the timings, never asserted)."""
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(stock, np.float32)).max())


def write_report(report: dict[str, object], out: Path, name: str) -> None:
    """Write `out/NAME.json` and `out/NAME.md`; floats show three decimals in the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = ["| what | value |", "|---|---|"]
    table += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.items()]
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def show_logs() -> None:
    """i2v's own log lines (placement, fp8 fallback) on stderr, with other libraries' warnings."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("i2v").setLevel(logging.INFO)
