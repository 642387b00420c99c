"""The memory plan: what a model needs on a device under each placement, and which placement fits a budget.

A model's need is its parts' weights (i2v.footprint, counted on `meta`) plus what one generation adds
(`Backend.activations`), phase by phase, since the text encoder, the transformer and the VAE run one
after the other:

    resident:  idle = sum of the weights;  peak = idle + the largest phase's activations
    shuttle:   the same weights, but the text encoder leaves the device once the prompt is encoded
               (i2v.residency moves it back for the next request):
               peak = max(idle + encode, idle - text encoder + max(denoise, decode))
    offload:   group offload (`low-vram`): no weights stay on the device but the parts kept beside the
               pipeline (LTX-2's latent upsampler); per phase, the running parts' streamed bytes (their
               non-block tensors, and two blocks at a time) + that phase's activations

               (`low-vram` also stores the fp8 parts' weights in fp8: the streamed bytes count that)

fp8 (the `fast` preset's fp8 compute, on GPUs with fp8 tensor cores) makes the transformer's block weights
one byte each in `resident` and `shuttle`; the load itself still places them in bf16 first (i2v.fp8
quantizes a model already on the device), so the peak is at least all the weights at their load dtypes.
`choose` picks the first placement, in that order, under which every duration fits the budget, so the
defaults find their own way: `low-vram` comes by itself where the model does not fit otherwise (CUDA only:
on a CPU the device is the host memory, and offloading to it gains nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from .backends import Backend, BackendSpec
from .footprint import Activations, Part
from .parsing import format_bytes
from .request import SHORT_SIDE, Mode
from .speed import Speed

Kind = Literal["resident", "shuttle", "offload"]
KINDS: tuple[Kind, ...] = ("resident", "shuttle", "offload")
DURATIONS = (5, 10)
# The GPU classes of docs/memory.md, by their nominal size in decimal GB; a worker on one has about that
# much free at start, less the CUDA context and the allocator's workspaces (RESERVE).
GPU_CLASSES: dict[str, int] = {
    "24 GB": 24 * 10**9,
    "48 GB": 48 * 10**9,
    "80 GB": 80 * 10**9,
    "141 GB": 141 * 10**9,
}
RESERVE = 10**9
# The output a mode's plan is made for: 16:9 at the mode's short side (the grid keeps every aspect's area
# at or under the 16:9 one's, within the grid's rounding).
PLAN_ASPECT = (16, 9)


NO_ACTIVATIONS = Activations(
    encode=0, denoise=0, decode=0, formula="on a CPU: host memory, outside the budget"
)


@dataclass(frozen=True)
class Placement:
    kind: Kind
    fp8: bool = False  # the fp8 parts' block weights in fp8 (the `fast` preset's fp8 compute)

    def __str__(self) -> str:
        text = {
            "resident": "all parts on the device",
            "shuttle": "text encoder off the device while denoising",
            "offload": "group offload (low-vram)",
        }[self.kind]
        return text + (", fp8 compute" if self.fp8 else "")


@dataclass(frozen=True)
class Need:
    """What a model needs on one device under one placement."""

    model: str
    placement: Placement
    idle: int  # bytes on the device between requests
    peaks: dict[int, int]  # duration (s) -> the most on the device during one generation
    fits: tuple[int, ...] = ()  # the durations that fit the budget it was chosen for
    weights: dict[str, int] = field(default_factory=dict)  # part -> bytes resident (or streamed)
    load: int = 0  # bytes on the device as the load places it (before fp8 quantization); 0: `idle`

    @property
    def loading(self) -> int:
        return max(self.load, self.idle)

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def describe(self) -> str:
        peaks = ", ".join(f"{d} s {format_bytes(b)}" for d, b in sorted(self.peaks.items()))
        return f"{self.model} ({self.placement}): {format_bytes(self.idle)} idle, peak {peaks}"


def part_bytes(part: Part, placement: Placement) -> int:
    size = part.size
    if placement.kind == "offload" and part.component.in_pipeline:
        return size.streamed_bytes
    return size.fp8_bytes if placement.fp8 else size.bytes


def need(
    model: str,
    parts: Mapping[str, Part],
    activations: Mapping[int, Activations],
    placement: Placement,
    *,
    loading: bool = True,
) -> Need:
    """The need of a model's parts and per-duration activations under one placement (module docstring);
    `loading` False leaves out the load itself (a run of a model already loaded)."""
    weights = {name: part_bytes(part, placement) for name, part in parts.items()}
    if placement.kind == "offload":
        idle = sum(weights[n] for n, p in parts.items() if not p.component.in_pipeline)

        def running(phase: str) -> int:
            return max(
                (
                    weights[n]
                    for n, p in parts.items()
                    if p.component.in_pipeline and p.component.phase == phase
                ),
                default=0,
            )

        peaks = {
            d: idle
            + max(running("encode") + a.encode, running("denoise") + a.denoise, running("decode") + a.decode)
            for d, a in activations.items()
        }
        return Need(model, placement, idle, peaks, weights=weights)
    idle = sum(weights.values())
    # fp8 compute quantizes the parts once they are on the device: the load holds them as loaded first.
    load = sum(p.size.bytes for p in parts.values()) if placement.fp8 and loading else idle
    if placement.kind == "shuttle":
        text = sum(weights[n] for n, p in parts.items() if p.component.role == "text_encoder")
        peaks = {
            d: max(load, idle + a.encode, idle - text + max(a.denoise, a.decode))
            for d, a in activations.items()
        }
    else:
        peaks = {d: max(load, idle + a.peak) for d, a in activations.items()}
    return Need(model, placement, idle, peaks, weights=weights, load=load)


def candidates(speed: Speed, device_type: str, fp8_compute: bool = True) -> list[Placement]:
    """The placements to try, best first: exact ones before offload; fp8 only where the preset asks for
    it and the device computes in fp8 (`fp8_compute`, i2v.fp8; elsewhere `fast` runs in bf16)."""
    if speed.low_vram:
        return [Placement("offload")]
    fp8 = speed.fp8 and fp8_compute and device_type == "cuda"
    found = [Placement("resident", fp8), Placement("shuttle", fp8)]
    if device_type == "cuda":
        found.append(Placement("offload"))
    return found


def choose(
    model: str,
    parts: Mapping[str, Part],
    activations: Callable[[Placement], Mapping[int, Activations]],
    budget: int | None,
    speed: Speed,
    device_type: str,
    fp8_compute: bool = True,
) -> Need:
    """The first placement under which every duration fits `budget`; else the one that fits the most
    durations (then the smallest); with no budget, the configured placement."""
    fp8_compute = fp8_compute and any(p.size.fp8_bytes < p.size.bytes for p in parts.values())
    options = candidates(speed, device_type, fp8_compute)
    needs = [need(model, parts, activations(p), p) for p in options]
    if budget is None:
        return dataclasses.replace(needs[0], fits=tuple(needs[0].peaks))
    fitted = [dataclasses.replace(n, fits=tuple(d for d, b in n.peaks.items() if b <= budget)) for n in needs]
    best = max(fitted, key=lambda n: (len(n.fits), -fitted.index(n) if n.fits else -n.peak))
    return best


def plan_size(cls: type[Backend], spec: BackendSpec, mode: Mode, ranks: int = 1) -> tuple[int, int]:
    """The model's own size for a 16:9 clip of `mode` (what a plan is made for)."""
    short = SHORT_SIDE[mode]
    output = (short * PLAN_ASPECT[0] // PLAN_ASPECT[1], short)
    return cls(spec, torch.device("cpu"), ranks=ranks).model_size(output)  # no weights are read


def plan_mode(spec: BackendSpec) -> Mode:
    """The most demanding mode a model is made for (its plan is made for that one's output size)."""
    modes = [m for m in spec.modes if m in SHORT_SIDE] or ["standard"]
    return max(modes, key=lambda m: SHORT_SIDE[m])  # type: ignore[arg-type,return-value]


def activations_for(
    cls: type[Backend],
    spec: BackendSpec,
    parts: Mapping[str, Part],
    mode: Mode,
    *,
    batched_cfg: bool,
    device_type: str = "cuda",
    durations: tuple[int, ...] = DURATIONS,
) -> Callable[[Placement], dict[int, Activations]]:
    """Per placement, the activations of each duration's clip at the mode's plan size.

    On a CPU the budget (`I2V_GPU_MEMORY`, as the tests set it) covers the weights only: activations
    come from the host's memory like everything else there, so they count as none."""
    width, height = plan_size(cls, spec, mode)
    batch = cfg_batch(spec, batched_cfg)

    def per_duration(placement: Placement) -> dict[int, Activations]:
        tiled = placement.kind == "offload"
        if device_type == "cpu":
            return {d: NO_ACTIVATIONS for d in durations}
        return {
            d: cls.activations(parts, width, height, spec.frames_for(d), batch=batch, tiled=tiled)
            for d in durations
        }

    return per_duration


def cfg_batch(spec: BackendSpec, batched_cfg: bool) -> int:
    """The denoising batch: 2 where CFG's two passes run as one batched forward (i2v.batched_cfg)."""
    return 2 if batched_cfg and spec.guidance > 1.0 else 1


def one_run(
    cls: type[Backend],
    parts: Mapping[str, Part],
    placement: Placement,
    size: tuple[int, int, int],
    batch: int,
) -> Need:
    """What one generation at the model's (width, height, frames) needs on the device, its model loaded
    with `placement`: `peak - idle` is what the run adds (activations; streamed blocks under offload)."""
    width, height, frames = size
    acts = cls.activations(parts, width, height, frames, batch=batch, tiled=placement.kind == "offload")
    return need(cls.spec.name, parts, {0: acts}, placement, loading=False)


def speed_placement(cls: type[Backend], speed: Speed, fp8_compute: bool) -> Placement:
    """The placement a preset asks for by itself: group offload for `low-vram`, fp8 compute for `fast`
    where the device has it and the model takes it, else all parts on the device."""
    if speed.low_vram:
        return Placement("offload")
    return Placement("resident", fp8=speed.fp8 and fp8_compute and bool(cls.fp8_modules))


def device_budget(total_free: int, setting: int | None) -> int:
    """The budget of a device: `I2V_GPU_MEMORY` when set, else its free memory at start less RESERVE."""
    return setting if setting is not None else max(0, total_free - RESERVE)
