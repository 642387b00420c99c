"""GPU benchmark, warm-up: what compiling costs, and whether a new shape after warm-up costs it again.

    python -m bench.warmup [--size full|tiny] [--device cuda|cpu] [--steps 2] [--out DIR]

Standard mode (TI2V-5B full size, random weights), our default placement (compiled blocks on CUDA):

- warm_up_s: `Backend.warm_up()` as the worker runs it before READY (a 2-step 16:9 5 s clip), the
  compilation included; warm_up_again_s the same call once compiled; compile_s is their difference;
- for a new shape after warm-up (1:1 5 s; with `--with-10s` also 16:9 10 s), the first request's
  time and the same request again (`--steps` steps); their difference is what the first user of that
  shape would pay (a recompile), ~0 with the product's dynamic shapes;
- graphs dynamo compiled after each call (`torch._dynamo.utils.counters`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch._dynamo.utils import counters

from bench import fullsize
from bench.recompiles import output_for
from bench.report import machine, show_logs, write_report
from i2v.backends.base import Backend, ModelInputs
from i2v.backends.wan_ti2v import WanTI2V
from i2v.speed import Speed

# (aspect, duration) after the 16:9 5 s warm-up: another token count; `--with-10s` adds 16:9 10 s.
NEW_SHAPE = (1.0, 5)
LONG_SHAPE = (16 / 9, 10)


def timed(call: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def new_shape_requests(
    backend: Backend,
    device: torch.device,
    steps: int,
    frames: int | None,
    shapes: tuple[tuple[float, int], ...],
) -> dict[str, Any]:
    """For each (aspect, duration): the first request at that shape on a warm backend, then the same again;
    their difference is what the first user of the shape pays (a recompile, or nothing)."""
    figures: dict[str, Any] = {}
    for aspect, duration in shapes:
        width, height = backend.model_size(output_for(aspect))
        inputs = ModelInputs(
            prompt="a new shape", negative_prompt="", image=Image.new("RGB", (width, height), (90, 120, 150)),
            end_image=None, width=width, height=height, model_frames=frames or backend.spec.frames_for(duration),
            seed=1, steps=steps,
        )  # fmt: skip
        label = f"{width}x{height}x{inputs.model_frames}"

        def call(inputs: ModelInputs = inputs) -> None:
            with torch.inference_mode():
                backend.generate(inputs, lambda step, total: None)

        graphs = counters["stats"]["unique_graphs"]
        first, again = timed(call, device), timed(call, device)
        figures[f"new_shape_{label}_first_s"] = first
        figures[f"new_shape_{label}_again_s"] = again
        figures[f"new_shape_{label}_extra_s"] = first - again
        figures[f"new_shape_{label}_new_graphs"] = counters["stats"]["unique_graphs"] - graphs
    return figures


def run(
    size: str, steps: int, device: torch.device, out: Path, with_10s: bool = False, frames: int | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "tiny"
        if size == "full":
            spec, pipe = WanTI2V.spec, fullsize.wan_ti2v_full(device)
        else:
            spec, pipe = WanTI2V.tiny_spec(folder), fullsize.wan_ti2v_tiny(folder, device)
        backend = WanTI2V(spec, device, Speed())
        backend.prepare(pipe)
        report: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "model": spec.name,
            "size": size,
            "placement": backend.placement,
        }
        report["warm_up_s"] = timed(backend.warm_up, device)
        report["graphs_after_warm_up"] = counters["stats"]["unique_graphs"]
        report["warm_up_again_s"] = timed(backend.warm_up, device)
        report["compile_s"] = report["warm_up_s"] - report["warm_up_again_s"]
        shapes = (NEW_SHAPE, LONG_SHAPE) if with_10s else (NEW_SHAPE,)
        report |= new_shape_requests(backend, device, steps, frames, shapes)
    write_report(report, out, f"warmup-{size}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of each new-shape request")
    parser.add_argument("--frames", type=int, default=None, help="frames of the new-shape requests (4k+1)")
    parser.add_argument("--with-10s", action="store_true", help="also a 16:9 10 s request (241 frames)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    show_logs()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.warmup: no CUDA device here; run `--size tiny --device cpu` for the CPU rehearsal")
    run(args.size, args.steps, torch.device(args.device), args.out, args.with_10s, args.frames)


if __name__ == "__main__":
    main()
