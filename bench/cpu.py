"""CPU benchmark: the i2v engine against the stock diffusers pipeline, same tiny model, inputs and seed.

    .venv/bin/python -m bench.cpu [--repeats 3] [--duration 5] [--out bench/results]

Both sides run in this one process, alternating, so machine noise hits both alike. Reports the ratio of
median wall times (engine / stock; 1.00 means no overhead), whether the frames are bit-identical, and the
engine's stage timings including the mp4 encode. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline

from bench.report import machine, write_report
from i2v import Engine, KlingRequest


def run(repeats: int, duration: int, out: Path) -> dict[str, object]:
    example = Path(__file__).resolve().parents[1] / "src" / "i2v" / "assets" / "example.jpg"
    request = KlingRequest(
        prompt="waves roll in under a bright sun", start_image=str(example), duration=duration, seed=11
    )
    engine = Engine("tiny")
    rendered = engine.render(request)  # warm-up: builds and loads the tiny twin
    inputs, spec = rendered.inputs, rendered.backend.spec
    # The stock pipeline with the one component we swap in, Wan's own schedule (see docs/models.md).
    ours = rendered.backend.pipe.scheduler
    stock = WanImageToVideoPipeline.from_pretrained(
        spec.source, scheduler=type(ours).from_config(ours.config)
    )
    stock.set_progress_bar_config(disable=True)

    def call_stock() -> np.ndarray:
        with torch.inference_mode():
            return stock(
                image=inputs.image,  # the stock call gets the image already fitted; the engine fetches and fits it
                prompt=request.prompt,
                negative_prompt=inputs.negative_prompt,  # the request's, or the model's default for ""
                height=inputs.height,
                width=inputs.width,
                num_frames=inputs.model_frames,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                output_type="np",
            ).frames[0]

    call_stock()  # warm-up
    ours, theirs, encode = [], [], []
    identical = True
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(repeats):
            clock = time.perf_counter()
            frames_ours = engine.render(request).clip.frames
            ours.append(time.perf_counter() - clock)
            clock = time.perf_counter()
            frames_stock = call_stock()
            theirs.append(time.perf_counter() - clock)
            identical &= bool(np.array_equal(frames_ours, frames_stock))
            result = engine.generate(request, Path(scratch) / f"clip{i}.mp4")
            encode.append(result.timings["encode"])
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": spec.name,
        "grid": f"{inputs.width}x{inputs.height}x{inputs.model_frames}",
        "steps": spec.steps,
        "repeats": repeats,
        "engine_s": statistics.median(ours),
        "stock_s": statistics.median(theirs),
        "ratio_engine_over_stock": statistics.median(ours) / statistics.median(theirs),
        "frames_identical": identical,
        "encode_s": statistics.median(encode),
        "output": f"{result.width}x{result.height}x{result.num_frames}",
    }
    write_report(report, out, "cpu")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, choices=(5, 10))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    run(args.repeats, args.duration, args.out)


if __name__ == "__main__":
    main()
