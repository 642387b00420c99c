"""A device group: one request on the group, per plan, against the same request on its first device alone.

    python -m bench.parallel --devices cuda:0+cuda:1 --plans cfg,ulysses [--model wan2.2-ti2v-5b=/m/ti2v]
    python -m bench.parallel --devices cpu+cpu --model tiny      # CI-sized: two CPU ranks over gloo

All engines live in this run, one at a time: `Engine` on the first device, then `Engine` on the whole
group for each plan in `--plans` (`auto`: the configured one, `I2V_CFG_PARALLEL`; `cfg`: CFG parallel,
times Ulysses on four or more; `ulysses`: the sequence split alone). The followers load the model with
`from_pretrained`, so on GPUs this needs the real weights (a hub id, the HF cache or a local folder).
Each renders the same standard-mode request and seed; the report gives the median model time
(`generate`: text encoder, denoising, VAE) and end-to-end time of each side, each plan's speed-up
(single / group), and whether its frames are identical to the single engine's (which runs CFG's passes
one by one, as CFG parallel's ranks do). The start image is square, whose grid size splits evenly across
2 ranks on every model here, so all sides generate at one size; a size that must change for a group
(see `Grid.size_for`) is reported, and then identity is not expected.

On CPU the ranks share two cores, so the times only show that the path runs; the speed-up is a GPU
figure, and a two-GPU one: the device machine this project is lent has a single H200.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.report import machine, write_report
from i2v import KlingRequest
from i2v.devices import device_group
from i2v.engine import Engine
from i2v.settings import Settings


def square_image(folder: Path, side: int = 960) -> str:
    """A smooth colourful square (gradients), written as a PNG in `folder`; returns its path."""
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([200 * x + 30, 200 * y + 30, 120 * (x + y) + 10], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    path = folder / "square.png"
    path.write_bytes(buffer.getvalue())
    return str(path)


def timed(engine: Engine, request: KlingRequest, output: Path) -> tuple[float, float]:
    """(model seconds, end-to-end seconds) of one request."""
    clock = time.perf_counter()
    result = engine.generate(request, output)
    return result.timings["generate"], time.perf_counter() - clock


PLANS: dict[str, bool | None] = {"auto": None, "cfg": True, "ulysses": False}  # -> Speed.cfg_parallel


def run(
    devices: str,
    model: str | None,
    repeats: int,
    duration: int,
    out: Path,
    plans: tuple[str, ...] = ("auto",),
) -> dict[str, object]:
    group = device_group(devices)
    if len(group) < 2:
        raise SystemExit(f"--devices {devices!r}: a group of two or more, like cuda:0+cuda:1")
    unknown = [plan for plan in plans if plan not in PLANS]
    if unknown or not plans:
        raise SystemExit(f"--plans {','.join(plans)!r}: a list of {', '.join(PLANS)}")
    with tempfile.TemporaryDirectory(prefix="i2v-bench-") as scratch:  # the image and the clips, then gone
        report = measure(group, devices, model, repeats, duration, plans, Path(scratch))
    write_report(report, out, "parallel")
    return report


def measure(
    group: tuple[str, ...],
    devices: str,
    model: str | None,
    repeats: int,
    duration: int,
    plans: tuple[str, ...],
    scratch: Path,
) -> dict[str, object]:
    start_image = square_image(scratch)
    request = KlingRequest(prompt="waves roll in", start_image=start_image, duration=duration, seed=11)
    sides: dict[str, dict[str, object]] = {}
    frames: dict[str, np.ndarray] = {}
    base = Settings()
    for name in ("single", *(f"group_{plan}" for plan in plans)):
        plan = name.removeprefix("group_")
        speed = base.speed.model_copy(update={"cfg_parallel": PLANS.get(plan)})
        settings = base.model_copy(update={"speed": speed})
        engine = Engine(model, device=group[0] if name == "single" else devices, settings=settings)
        backend = engine.backend(request.mode)
        size = backend.model_size((720, 720))
        frames[name] = engine.render(request).clip.frames  # also the warm-up: compiles and tunes first
        runs = [timed(engine, request, scratch / f"{name}.mp4") for _ in range(repeats)]
        sides[name] = {
            "model_s": statistics.median(r[0] for r in runs),
            "end_to_end_s": statistics.median(r[1] for r in runs),
            "model_size": f"{size[0]}x{size[1]}",
            "placement": backend.placement,
        }
        engine.close()
        del engine, backend  # the single engine's weights leave the first GPU before the group loads there
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    single = sides["single"]
    report: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "devices": devices,
        "model": model or "default",
        "repeats": repeats,
        "duration_s": duration,
        "plans": list(plans),
        **{f"{side}_{key}": value for side, figures in sides.items() for key, value in figures.items()},
    }
    for plan in plans:
        side = sides[f"group_{plan}"]
        report[f"speedup_{plan}_model"] = float(single["model_s"]) / float(side["model_s"])  # type: ignore[arg-type]
        report[f"speedup_{plan}_end_to_end"] = float(single["end_to_end_s"]) / float(side["end_to_end_s"])  # type: ignore[arg-type]
        report[f"{plan}_frames_identical"] = bool(np.array_equal(frames["single"], frames[f"group_{plan}"]))
    report["frames_identical"] = all(report[f"{plan}_frames_identical"] for plan in plans)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", required=True, help="a device group, e.g. cuda:0+cuda:1 (cpu+cpu in CI)")
    parser.add_argument("--model", help="as for `i2v generate --model`; default: the configured models")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5, choices=(5, 10))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--plans", default="auto", help="comma-separated group plans: auto, cfg, ulysses (default: auto)"
    )
    args = parser.parse_args()
    plans = tuple(plan.strip() for plan in args.plans.split(",") if plan.strip())
    run(args.devices, args.model, args.repeats, args.duration, args.out, plans)


if __name__ == "__main__":
    main()
