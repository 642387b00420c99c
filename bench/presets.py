"""GPU benchmark, the presets on standard 5 s 720p (TI2V-5B full size, random weights).

    python -m bench.presets --preset fast|turbo|low-vram [--size full|tiny] [--device cuda|cpu]
                            [--steps 3] [--frames 121] [--out DIR]

- fast: the server preset `fast` (fp8 matrix multiplies in the transformer blocks where the GPU has fp8
  tensor cores, `i2v.fp8`, with the compiled blocks); s/step against the same run's bf16 figure is the
  fp8 gain. The per-request step cache is left off: with random weights its skip decisions mean nothing.
- turbo: FastWan (the same architecture, 3 DMD steps, no CFG), end to end as a user gets it: the run
  is the whole clip (its 3 steps), plus the mp4 encode.
- low-vram: fp8 weight storage, group offload and the tiled VAE; its peak GPU memory (must stay under
  22 GB for standard, so it fits a 24 GB card) and its s/step.

Each runs twice with the same inputs; the second run is timed (the first includes compilation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import fullsize
from bench.gpu import (
    BF16_MARK_TFLOPS,
    OUTPUT_SIZE,
    TEXT_TOKENS,
    example_inputs,
    run_ours,
    timed_mp4,
    transformer_flops_per_forward,
    wan_tokens,
)
from bench.report import machine, show_logs, write_report
from i2v.backends.fastwan import FastWanTI2V
from i2v.backends.wan_ti2v import WanTI2V
from i2v.speed import Speed

LOW_VRAM_LIMIT_GIB = 22.0
PRESETS = ("fast", "turbo", "low-vram")


def run(
    preset: str, size: str, steps: int, frames: int | None, device: torch.device, out: Path, x264_preset: str
) -> dict[str, Any]:
    cls = FastWanTI2V if preset == "turbo" else WanTI2V
    speed = Speed() if preset == "turbo" else Speed(preset=preset)  # turbo is a model, not a placement
    output = OUTPUT_SIZE[WanTI2V.spec.name]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "tiny"
        build = time.perf_counter()
        if size == "full":
            spec, pipe = cls.spec, fullsize.wan_ti2v_full(device)
        else:
            spec, pipe = cls.tiny_spec(folder), fullsize.wan_ti2v_tiny(folder, device)
        if preset == "low-vram" and device.type == "cuda":
            pipe.to("cpu")  # group offload starts from CPU memory, as a loaded model does
            torch.cuda.empty_cache()
        build_s = time.perf_counter() - build
        backend = cls(spec, device, speed)
        width, height = backend.model_size(output)
        inputs = example_inputs(spec, width, height, frames, steps)
        with torch.inference_mode():
            figures, clip_frames = run_ours(backend, pipe, inputs, device)
        if preset == "turbo":
            figures["mp4_encode_s"] = timed_mp4(
                clip_frames, output, spec.fps, x264_preset, Path(scratch) / "turbo.mp4"
            )

    guided = spec.guidance > 1.0
    tokens = wan_tokens(pipe, width, height, inputs.model_frames)
    flops = transformer_flops_per_forward(pipe.transformer.config, tokens, TEXT_TOKENS) * (2 if guided else 1)
    steps_full = backend.total_steps(inputs if preset == "turbo" else None)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "preset": preset,
        "model": spec.name,
        "size": size,
        "build_s": build_s,
        "grid": f"{width}x{height}x{inputs.model_frames}",
        "placement": backend.placement,
        "steps_timed": len(backend.pipe.scheduler.timesteps) if preset == "turbo" else steps,
        "steps_full": steps_full,
        "transformer_tokens": tokens,
    }
    report |= figures
    report["transformer_tflops"] = flops / figures["s_per_step"] / 1e12
    report["fraction_of_800_tflops"] = report["transformer_tflops"] / BF16_MARK_TFLOPS
    if preset == "turbo":  # the whole clip was the timed run
        report["end_to_end_s"] = figures["timed_run_s"] + figures["mp4_encode_s"]
        report["end_to_end"] = "measured: the timed run (3 steps) + the mp4 encode"
    else:
        report["end_to_end_s"] = (
            figures["before_steps_s"] + steps_full * figures["s_per_step"] + figures["decode_s"]
        )
        report["end_to_end"] = "extrapolated to 50 steps, mp4 encode not included"
    if preset == "fast":
        report["fp8_compute"] = "fp8 compute transformer" in backend.placement
        report["step_cache"] = "off (random weights would make its skip decisions meaningless)"
    if preset == "low-vram":
        peak = figures["peak_gpu_memory_gib"]
        report["peak_under_22_gib"] = None if peak is None else peak < LOW_VRAM_LIMIT_GIB
    write_report(report, out, f"preset-{preset}-{size}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--steps", type=int, default=3, help="denoising steps timed (fast, low-vram; turbo has 3)"
    )
    parser.add_argument("--frames", type=int, default=None, help="frames (4k+1); default: 5 s, 121")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--x264-preset", default="medium")
    args = parser.parse_args()
    show_logs()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.presets: no CUDA device here; run `--size tiny --device cpu` for the CPU rehearsal")
    run(
        args.preset, args.size, args.steps, args.frames, torch.device(args.device), args.out, args.x264_preset
    )


if __name__ == "__main__":
    main()
