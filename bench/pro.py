"""GPU benchmark, pro mode: LTX-2 two-stage 1080p 5 s, the stock diffusers calls against our backend.

    python -m bench.pro [--size full|tiny] [--device cuda|cpu] [--steps 3] [--frames 121] [--out DIR]

`--size full` builds LTX-2.0 at full size with random weights (about 69 GB in bf16, `bench/fullsize.py`:
built on `meta`, materialised on the GPU) and a random stage-2 LoRA of the real rank; `--size tiny` builds
the same way from the tiny twin's configs (the CPU rehearsal). Stage 1 runs `--steps` of the base model's
40 (with CFG and STG); the refine stage runs its 3 distilled sigmas with the LoRA.

Stock: `pipe.to(device)`, VAE tiling (1080p x 121 does not decode in one piece), default attention,
diffusers' own `LTX2ConditionPipeline` then `LTX2LatentUpsamplePipeline` then the pipeline again for the
refine, with the same arguments our backend passes. Ours: the SAME modules through `LTX2.prepare` and
`generate`. The stock side runs twice (same seed) and the second run is timed; ours once more after it
(twice where it compiles). Per side and stage, from marks
taken around the stage calls (CUDA synchronised): text encoding (every `encode_prompt`), stage 1 (to the
upsampler), its s/step, the upsample, the refine (to the VAE decode), its s/step, the decode, the timed
run, peak GPU memory. End to end is extrapolated to the 40 stage-1 steps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import LTX2ConditionPipeline, LTX2LatentUpsamplePipeline
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES

from bench import fullsize
from bench.gpu import example_inputs, peak_gib, planned_peak_gib, reset_peak
from bench.report import machine, max_abs_diff, show_logs, write_report
from i2v.backends.base import ModelInputs
from i2v.backends.ltx2 import _NO_GUIDANCE, LTX2, STAGE2_ADAPTER

OUTPUT = (1920, 1080)


class Marks:
    """Named wall-clock marks, CUDA synchronised, around the calls that bound each stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[tuple[str, float]] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks.append((name, self.now()))

    def around(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"{name}_start")
            try:
                return call(*args, **kwargs)
            finally:
                self.mark(f"{name}_end")

        return timed

    def figures(self, stage1_steps: int) -> dict[str, float]:
        def first(name: str) -> float:
            return next(t for n, t in self.marks if n == name)

        def spans(name: str) -> float:
            starts = [t for n, t in self.marks if n == f"{name}_start"]
            ends = [t for n, t in self.marks if n == f"{name}_end"]
            return sum(e - s for s, e in zip(starts, ends, strict=True))

        steps = [t for n, t in self.marks if n == "step"]
        stage1, stage2 = steps[:stage1_steps], steps[stage1_steps:]
        start, end = first("start"), first("end")
        return {
            "text_encode_s": spans("text"),
            "stage1_s": first("upsample_start") - start,
            "stage1_s_per_step": statistics.median(np.diff(stage1).tolist()),
            "upsample_s": spans("upsample"),
            "refine_s": first("decode_start") - first("upsample_end"),
            "refine_s_per_step": statistics.median(np.diff(stage2).tolist()),
            "decode_s": spans("decode"),
            "timed_run_s": end - start,
        }


def instrument(marks: Marks, pipe: Any, upsampler: Any) -> None:
    """Marks around the calls that bound the stages, on these instances (the classes are untouched)."""
    pipe.encode_prompt = marks.around("text", pipe.encode_prompt)
    upsampler.forward = marks.around("upsample", upsampler.forward)
    pipe.vae.decode = marks.around("decode", pipe.vae.decode)


def stage1_settings(pipe: Any, steps: int) -> dict[str, Any]:
    backend = LTX2.__new__(LTX2)  # the backend's own stage-1 settings, read without building a backend
    backend.pipe, backend.spec = pipe, LTX2.spec
    return backend._stage1_settings(None) | {"num_inference_steps": steps}


def run_stock(
    pipe: Any, upsampler: Any, inputs: ModelInputs, device: torch.device
) -> tuple[dict[str, Any], np.ndarray]:
    """diffusers' classes called directly, with the arguments our backend passes (stage by stage)."""
    pipe.to(device)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    stock = LTX2ConditionPipeline(**pipe.components)  # the stock class around the same modules
    stock.set_progress_bar_config(disable=True)
    upsample = LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=upsampler.to(device))
    upsample.set_progress_bar_config(disable=True)
    marks = Marks(device)
    instrument(marks, stock, upsampler)
    stage1 = stage1_settings(pipe, inputs.steps or 2)

    def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        marks.mark("step")
        return {}

    def call() -> np.ndarray:
        common = {
            "conditions": [LTX2VideoCondition(frames=inputs.image, index=0)], "prompt": inputs.prompt,
            "negative_prompt": inputs.negative_prompt, "num_frames": inputs.model_frames, "frame_rate": 24.0,
            "generator": inputs.generator(), "use_cross_timestep": False, "return_dict": False,
            "callback_on_step_end": step_end,
        }  # fmt: skip
        marks.mark("start")
        stock.disable_lora()
        video, audio = stock(
            **common, width=inputs.width // 2, height=inputs.height // 2, output_type="latent", **stage1
        )
        video = upsample(latents=video, output_type="latent", return_dict=False)[0]
        stock.enable_lora()
        stock.set_adapters(STAGE2_ADAPTER, 1.0)
        frames = stock(
            **common, width=inputs.width, height=inputs.height, latents=video, audio_latents=audio,
            num_inference_steps=len(STAGE_2_DISTILLED_SIGMA_VALUES), sigmas=STAGE_2_DISTILLED_SIGMA_VALUES,
            noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0], output_type="np", **_NO_GUIDANCE,
        )[0][0]  # fmt: skip
        marks.mark("end")
        return frames

    return timed_twice(marks, call, device, stage1["num_inference_steps"])


def run_ours(
    backend: LTX2, pipe: Any, upsampler: Any, inputs: ModelInputs, device: torch.device
) -> tuple[dict[str, Any], np.ndarray]:
    marks = Marks(device)
    start = marks.now()
    backend.prepare(pipe, upsampler=upsampler)
    prepare_s = marks.now() - start
    instrument(marks, pipe, upsampler)

    def call() -> np.ndarray:
        marks.mark("start")
        clip = backend.generate(inputs, lambda step, total: marks.mark("step"))
        marks.mark("end")
        return clip.frames

    # The base model is not compiled (it switches its LoRA), so one run after the stock side's suffices.
    warm_up = "compiled" in backend.placement
    figures, frames = timed_twice(marks, call, device, inputs.steps or 2, warm_up)
    planned = planned_peak_gib(backend, inputs)
    return figures | {
        "prepare_s": prepare_s,
        "placement": backend.placement,
        "planned_peak_gib": planned,
    }, frames


def timed_twice(
    marks: Marks,
    call: Callable[[], np.ndarray],
    device: torch.device,
    stage1_steps: int,
    warm_up: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """The second of two runs, timed; with `warm_up` False only one (nothing left to compile or select:
    the stock side's runs already chose the kernels for these modules and shapes)."""
    reset_peak(device)
    clock = marks.now()
    if warm_up:
        call()  # kernel selection, allocator, compilation where there is any
    first = marks.now() - clock
    marks.marks = []
    frames = call()
    figures = marks.figures(stage1_steps) | {"peak_gpu_memory_gib": peak_gib(device)}
    return figures | {"first_run_s": first if warm_up else figures["timed_run_s"]}, frames


def run(size: str, steps: int, frames: int | None, device: torch.device, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        if size == "full":
            spec = LTX2.spec
            build = time.perf_counter()
            pipe, upsampler = fullsize.ltx2_pipeline(device)
        else:
            spec = LTX2.tiny_spec(Path(scratch) / "tiny")
            configs = fullsize.ltx2_tiny_configs(Path(scratch) / "tiny")
            build = time.perf_counter()
            pipe, upsampler = fullsize.ltx2_pipeline(device, configs, lora_rank=2)
        build_s = time.perf_counter() - build
        backend = LTX2(spec, device)
        width, height = backend.model_size(OUTPUT)
        inputs = example_inputs(spec, width, height, frames, steps)
        with torch.inference_mode():
            stock, stock_frames = run_stock(pipe, upsampler, inputs, device)
            ours, our_frames = run_ours(backend, pipe, upsampler, inputs, device)
    params = sum(
        p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()
    )
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "model": spec.name,
        "size": size,
        "build_s": build_s,
        "parameters_billion": (params + sum(p.numel() for p in upsampler.parameters())) / 1e9,
        "stage1_grid": f"{width // 2}x{height // 2}x{inputs.model_frames}",
        "refine_grid": f"{width}x{height}x{inputs.model_frames}",
        "stage1_steps_timed": steps,
        "stage1_steps_full": LTX2.spec.steps,
        "refine_steps": len(STAGE_2_DISTILLED_SIGMA_VALUES),
        "end_to_end": "extrapolated: timed_run_s + (stage1_steps_full - stage1_steps_timed) x stage1_s_per_step",
    }
    for side, figures in (("stock", stock), ("ours", ours)):
        figures["end_to_end_s"] = (
            figures["timed_run_s"] + (LTX2.spec.steps - steps) * figures["stage1_s_per_step"]
        )
        report |= {f"{side}_{key}": value for key, value in figures.items()}
    for key in ("stage1_s_per_step", "refine_s_per_step", "decode_s", "end_to_end_s"):
        report[f"ratio_ours_over_stock_{key}"] = ours[key] / stock[key] if stock[key] else None
    report["frames_max_abs_diff"] = max_abs_diff(our_frames, stock_frames)
    write_report(report, out, f"pro-{size}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=3, help="stage-1 steps timed (at least 2)")
    parser.add_argument("--frames", type=int, default=None, help="frames (8k+1); default: 5 s, 121")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    show_logs()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.pro: no CUDA device here; run `--size tiny --device cpu` for the CPU rehearsal")
    run(args.size, args.steps, args.frames, torch.device(args.device), args.out)


if __name__ == "__main__":
    main()
