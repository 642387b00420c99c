"""The GPU run's entry point: the measurements in order of value, each saved as soon as it ends.

    python -m bench.device --out DIR [--parts standard,pro,fast,turbo,low-vram,warmup] [--size full|tiny]
                           [--device cuda|cpu] [--steps 3] [--frames N] [--budget-s 320] [--started EPOCH]

`bench/device.sh` installs the carried wheels and calls this. First the environment (package versions
against bench/gpu-machine.txt and bench/carry.txt, the GPU, whether fp8 compute is there), then each
part in its own process (its memory is freed after it, and a crash ends only that part):

    standard   bench.gpu       TI2V-5B 720p 5 s: stock pipeline against our default path; then on the
                               warm path a request at a new aspect ratio (the warm-up question)
    pro        bench.pro       LTX-2 1080p 5 s: stage 1, upsample, refine, decode, stock against ours
    fast       bench.presets   fp8 compute with the compiled blocks
    turbo      bench.presets   FastWan 3 steps, end to end
    low-vram   bench.presets   fp8 storage + group offload: peak memory (< 22 GB)
    warmup     bench.warmup    the worker's own warm_up(): its time, compile time, then a new shape

After each part DIR holds `device.json` (every part so far: its figures or why it has none),
`device.md` (the same as tables) and `device.log` (all output): three files, whatever is cut short.
`--budget-s` is the time the whole call may take, counted from `--started` (device.sh's start): a part
that would start with less than a minute left is skipped, and a running part is stopped when the budget
ends, so the files are written before the device tool's own limit kills everything.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
MIN_PART_S = 60.0  # a part with less left than this would only be killed half-way
MARGIN_S = 10.0  # kept back to write the files after the last part
# name -> (module and its own arguments, which common flags it takes)
PARTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "standard": (["bench.gpu", "--model", "wan2.2-ti2v-5b", "--new-shape"], ("steps", "frames", "x264")),
    "pro": (["bench.pro"], ("steps", "frames")),
    "fast": (["bench.presets", "--preset", "fast"], ("steps", "frames")),
    "turbo": (["bench.presets", "--preset", "turbo"], ("frames", "x264")),
    "low-vram": (["bench.presets", "--preset", "low-vram"], ("steps", "frames")),
    "warmup": (["bench.warmup"], ("frames",)),
}


def pinned(path: Path) -> dict[str, str]:
    """name -> version from one of the pinned lists (`name==version  # comment`)."""
    versions = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            versions[name.strip()] = version.strip()
    return versions


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """What this machine has, against what the lists say; the GPU and its fp8 support."""
    import torch

    from i2v.fp8 import fp8_unsupported

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for listed, label in (("gpu-machine.txt", "machine"), ("carry.txt", "carried")):
        found = {name: installed(name) for name in pinned(ROOT / "bench" / listed)}
        wanted = pinned(ROOT / "bench" / listed)
        env[f"{label}_packages"] = found
        env[f"{label}_differs"] = {n: f"{found[n]} (listed {v})" for n, v in wanted.items() if found[n] != v}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
            "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
        }  # fmt: skip
    env["fp8_compute"] = fp8_unsupported(torch.device(device)) or "available"
    return env


class Results:
    """device.json, device.md and device.log under `out`, rewritten after every part."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.parts: dict[str, dict[str, Any]] = {}
        self.tables: dict[str, str] = {}
        self.log: TextIO = (out / "device.log").open("a", buffering=1)

    def add(self, name: str, result: dict[str, Any], table: str = "") -> None:
        self.parts[name] = result
        self.tables[name] = table
        self._write("device.json", json.dumps(self.parts, indent=2, default=str))
        lines = ["# GPU run", "", "| part | status | seconds |", "|---|---|---|"]
        lines += [f"| {n} | {r.get('status')} | {r.get('seconds', 0):.0f} |" for n, r in self.parts.items()]
        for part, text in self.tables.items():
            if text:
                lines += ["", f"## {part}", "", text]
        self._write("device.md", "\n".join(lines) + "\n")

    def _write(self, name: str, text: str) -> None:
        staging = self.out / f".{name}.tmp"
        staging.write_text(text)
        staging.replace(self.out / name)  # whole files only, even if the call is killed mid-write

    def echo(self, line: str) -> None:
        self.log.write(line)
        sys.stdout.write(line)


def run_part(argv: list[str], timeout: float, echo: Callable[[str], None]) -> tuple[int | None, str]:
    """Run one part's module in its own process group; (exit code or None if stopped, last output)."""
    process = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    tail: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            echo(line)
            tail.append(line)
            del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    reader.join(timeout=5)
    return code, "".join(tail)


def part_args(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    module, takes = PARTS[name]
    argv = [*module, "--size", args.size, "--device", args.device, "--out", str(out)]
    if "steps" in takes and args.steps:
        argv += ["--steps", str(args.steps)]
    if "frames" in takes and args.frames:
        argv += ["--frames", str(args.frames)]
    if "x264" in takes:
        argv += ["--x264-preset", args.x264_preset]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, in order: {', '.join(PARTS)}"
    )
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--steps", type=int, default=None, help="timed denoising steps (each part's default: 3)"
    )
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: 5 s, 121)")
    parser.add_argument("--x264-preset", default="medium")
    parser.add_argument("--budget-s", type=float, default=330.0, help="seconds the whole call may take")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the call began")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    deadline = (args.started or time.time()) + args.budget_s - MARGIN_S

    results = Results(args.out)
    clock = time.time()
    results.add("env", {"status": "ok", "seconds": 0.0} | environment(args.device))
    results.parts["env"]["seconds"] = time.time() - clock
    for name in parts:
        left = deadline - time.time()
        if left < MIN_PART_S:
            results.add(name, {"status": f"skipped: {left:.0f} s left of the budget", "seconds": 0.0})
            continue
        results.echo(f"=== {name}: {' '.join(part_args(name, args, Path('OUT')))} ({left:.0f} s left)\n")
        clock = time.time()
        with tempfile.TemporaryDirectory() as scratch:
            code, tail = run_part(part_args(name, args, Path(scratch)), left, results.echo)
            seconds = time.time() - clock
            reports = sorted(Path(scratch).glob("*.json"))
            if code == 0 and reports:
                figures = json.loads(reports[0].read_text())
                table = reports[0].with_suffix(".md").read_text()
                results.add(name, {"status": "ok", "seconds": seconds} | figures, table)
            else:
                status = (
                    f"stopped at the budget after {seconds:.0f} s"
                    if code is None
                    else f"failed (exit {code})"
                )
                tail = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", tail)[-4000:]
                results.add(name, {"status": status, "seconds": seconds, "output_tail": tail})
    failed = [n for n, r in results.parts.items() if r["status"] != "ok"]
    summary = ", ".join(f"{name} {result['status']}" for name, result in results.parts.items())
    results.echo(f"=== done: {summary}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
