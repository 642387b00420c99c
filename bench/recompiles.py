"""How often the compiled transformer block recompiles over the request shapes users send (CPU, tiny twin).

    .venv/bin/python -m bench.recompiles [--strategies static,auto,product] [--steps 1] [--out bench/results]

The sequence: standard mode (TI2V, CFG batched) at 8 aspect ratios x 2 durations, then turbo (FastWan,
one forward per step) at the same 16 shapes, then 4 `fast` requests (FirstBlockCache on the compiled
blocks) each followed by a plain one. Both models' blocks are one class, so they share dynamo's cache
and its recompile limit (`torch._dynamo.config.recompile_limit`, 8 by default). The VAE decode is skipped (black frames of
the right shape): it is not compiled and does not change the blocks' inputs.

Strategies, all through `i2v.compiled_blocks.compile_blocks` with `backend="eager"` (dynamo's guards
and recompiles are the same as with inductor, without its code generation):

- static: `dynamic=False`, one graph per token count;
- auto: `dynamic=None`, torch's default (static first, then automatic dynamic after a size changes);
- product: `compile_blocks`'s default, `dynamic=True` (sizes symbolic from the first call), as `place()`
  compiles.

Per strategy: graphs compiled after each request, the recompile reasons dynamo logged, and whether the
limit was reached (dynamo then runs the block uncompiled, or with `fullgraph=True` fails the request).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from PIL import Image
from torch._dynamo.utils import counters

from bench.report import machine, write_report
from i2v.backends.base import Backend, ModelInputs
from i2v.backends.fastwan import FastWanTI2V
from i2v.backends.wan_ti2v import WanTI2V
from i2v.compiled_blocks import compile_blocks
from i2v.speed import Speed

# compile_blocks keyword arguments; "product" passes none, so it measures what `place()` compiles.
STRATEGIES: dict[str, dict[str, Any]] = {
    "static": {"dynamic": False},
    "auto": {"dynamic": None},
    "product": {},
}
# Kling users' usual aspect ratios (width / height) and the two durations.
ASPECTS = (16 / 9, 9 / 16, 1.0, 4 / 3, 3 / 4, 21 / 9, 3 / 2, 2 / 3)
DURATIONS = (5, 10)
FAST_REQUESTS = 4


class Recompiles(logging.Handler):
    """Dynamo's recompile records (the `recompiles` log artifact), kept as they are emitted."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The first failed guard names the reason; the rest repeat it for each earlier graph.
        reasons = record.getMessage().split("triggered by the following guard failure(s):")[-1].strip()
        self.reasons.append(reasons.splitlines()[0].removeprefix("- ").split("  #")[0].strip())


def output_for(aspect: float) -> tuple[int, int]:
    """The exact Kling output size for a start image of this aspect (standard mode: short side 720)."""
    return (round(720 * aspect), 720) if aspect >= 1 else (720, round(720 / aspect))


def tiny_backend(cls: type[Backend], folder: Path) -> Backend:
    cls.build_tiny(folder / cls.spec.name)
    backend = cls(cls.tiny_spec(folder / cls.spec.name), torch.device("cpu"), Speed(batched_cfg=True))
    backend.load()  # compile is off on CPU by default: the strategy under test compiles the blocks
    skip_decode(backend.pipe.vae)
    return backend


def skip_decode(vae: Any) -> None:
    """Black frames of the right shape instead of the VAE decode, on this instance: the decode is not
    compiled and does not change what the blocks see, and at 241 frames it would be most of the time."""
    spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal

    def decode(latents: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        b, _, f, h, w = latents.shape
        return (torch.zeros(b, 3, (f - 1) * temporal + 1, h * spatial, w * spatial),)

    vae.decode = decode


def run_strategy(name: str, steps: int, folder: Path) -> dict[str, Any]:
    torch._dynamo.reset()
    counters.clear()
    standard, turbo = tiny_backend(WanTI2V, folder), tiny_backend(FastWanTI2V, folder)
    for backend in (standard, turbo):
        compile_blocks(backend.pipe.transformer, fullgraph=True, backend="eager", **STRATEGIES[name])
    requests: list[tuple[str, Backend, float, int, bool]] = [
        (label, backend, aspect, duration, False)
        for label, backend in (("standard", standard), ("turbo", turbo))
        for duration in DURATIONS
        for aspect in ASPECTS
    ]
    for aspect in ASPECTS[:FAST_REQUESTS]:
        requests += [("fast", standard, aspect, 5, True), ("standard", standard, aspect, 5, False)]

    log: list[dict[str, Any]] = []
    limit_hit_at = failed_at = None
    failed = 0
    for index, (label, backend, aspect, duration, cached) in enumerate(requests):
        width, height = backend.model_size(output_for(aspect))
        inputs = ModelInputs(
            prompt="a cat", negative_prompt="", image=Image.new("RGB", (width, height)), end_image=None,
            width=width, height=height, model_frames=backend.spec.frames_for(duration), seed=0, steps=steps,
            step_cache=cached,
        )  # fmt: skip
        before = counters["stats"]["unique_graphs"]
        try:
            with torch.inference_mode():
                backend.generate(inputs, lambda step, total: None)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            failed_at = index if failed_at is None else failed_at
            failed += 1
        if limit_hit_at is None and any("recompile limit" in key for key in counters["unimplemented"]):
            limit_hit_at = index
        log.append({
            "request": index, "model": label, "size": f"{width}x{height}x{inputs.model_frames}",
            "new_graphs": counters["stats"]["unique_graphs"] - before,
        })  # fmt: skip
    hit = limit_hit_at is not None or failed_at is not None
    return {
        "strategy": name,
        "requests": len(requests),
        "distinct_shapes": len({(r["model"], r["size"]) for r in log}),
        "graphs_compiled": counters["stats"]["unique_graphs"],
        "recompile_limit": torch._dynamo.config.recompile_limit,
        "limit_reached": hit,
        "limit_reached_at_request": limit_hit_at if limit_hit_at is not None else failed_at,
        "requests_failed": failed,  # with fullgraph=True a request past the limit fails
        "new_graphs_per_request": [r["new_graphs"] for r in log],
        "requests_log": log,
    }


def run(strategies: list[str], steps: int, out: Path) -> dict[str, Any]:
    handler = Recompiles()
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "models": "tiny-wan2.2-ti2v-5b (CFG batched) + tiny-fastwan2.2-ti2v-5b, one block class",
        "aspects": [round(a, 3) for a in ASPECTS],
        "durations_s": list(DURATIONS),
        "compile_backend": "eager",
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name in strategies:
            handler.reasons = []
            result = run_strategy(name, steps, Path(scratch))
            result["recompile_reasons"] = sorted(set(handler.reasons))
            for key, value in result.items():
                if key not in ("strategy", "requests_log"):
                    report[f"{name}_{key}"] = value
    write_report(report, out, "recompiles")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", default="static,auto,product")
    parser.add_argument(
        "--steps", type=int, default=1, help="denoising steps per request (shapes, not steps, matter)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {sorted(STRATEGIES)}")
    run(strategies, args.steps, args.out)


if __name__ == "__main__":
    main()
