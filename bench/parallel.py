"""Context parallelism: one request on a device group against the same request on its first device alone.

    python -m bench.parallel --devices cuda:0+cuda:1 [--model wan2.2-ti2v-5b=/models/ti2v] [--repeats 2]
    python -m bench.parallel --devices cpu+cpu --model tiny      # CI-sized: two CPU ranks over gloo

Both engines live in this run: `Engine` on the first device, then `Engine` on the whole group
(its followers load the model with `from_pretrained`, so on GPUs this needs the real weights: a hub id,
the HF cache or a local folder). Each renders the same standard-mode request and seed; the report gives
the median model time (`generate`: text encoder, denoising, VAE) and end-to-end time of each, the
speed-up (single / group), and whether the two sides' frames are identical. The start image is square,
whose grid size splits evenly across 2 ranks on every model here, so both sides generate at one size; a
size that must change for the group (see `Grid.size_for`) is reported, and then identity is not expected.

On CPU the ranks share two cores, so the times only show that the path runs; the speed-up is a GPU figure.
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


def square_image(side: int = 960) -> str:
    """A smooth colourful square (gradients), written to a temporary PNG; returns its path."""
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([200 * x + 30, 200 * y + 30, 120 * (x + y) + 10], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    path = Path(tempfile.mkdtemp(prefix="i2v-bench-")) / "square.png"
    path.write_bytes(buffer.getvalue())
    return str(path)


def timed(engine: Engine, request: KlingRequest, output: Path) -> tuple[float, float]:
    """(model seconds, end-to-end seconds) of one request."""
    clock = time.perf_counter()
    result = engine.generate(request, output)
    return result.timings["generate"], time.perf_counter() - clock


def run(devices: str, model: str | None, repeats: int, duration: int, out: Path) -> dict[str, object]:
    group = device_group(devices)
    if len(group) < 2:
        raise SystemExit(f"--devices {devices!r}: a group of two or more, like cuda:0+cuda:1")
    request = KlingRequest(prompt="waves roll in", start_image=square_image(), duration=duration, seed=11)
    scratch = Path(tempfile.mkdtemp(prefix="i2v-bench-"))
    sides: dict[str, dict[str, object]] = {}
    frames: dict[str, np.ndarray] = {}
    for name in ("single", "group"):
        engine = Engine(model, device=group[0] if name == "single" else devices)
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
    single, parallel = sides["single"], sides["group"]
    report: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "devices": devices,
        "model": model or "default",
        "repeats": repeats,
        "duration_s": duration,
        **{f"{side}_{key}": value for side, figures in sides.items() for key, value in figures.items()},
        "speedup_model": float(single["model_s"]) / float(parallel["model_s"]),  # type: ignore[arg-type]
        "speedup_end_to_end": float(single["end_to_end_s"]) / float(parallel["end_to_end_s"]),  # type: ignore[arg-type]
        "frames_identical": bool(np.array_equal(frames["single"], frames["group"])),
    }
    write_report(report, out, "parallel")
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
    args = parser.parse_args()
    run(args.devices, args.model, args.repeats, args.duration, args.out)


if __name__ == "__main__":
    main()
