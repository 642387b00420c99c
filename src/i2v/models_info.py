"""What `i2v models` prints: each backend, its weights' source, their download size and what is in the cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import weights
from .backends import BACKENDS, Backend, BackendSpec, tiny_folder
from .errors import ModelUnavailable
from .progress import format_bytes
from .settings import Settings


def weights_state(spec: BackendSpec) -> str:
    """`23.9 GB to download, 4.1 GB in the cache`, from the hub when it answers, else from the cache alone."""
    repo = weights.hub_repo(spec.source)
    if repo is None:
        found = (Path(spec.source).expanduser() / "model_index.json").is_file()
        return "local folder" if found else "local folder without model_index.json"
    planned, why = None, ""
    if not weights.offline():
        try:
            planned = weights.plan(spec.name, repo, spec.files, check_access=False)
        except ModelUnavailable as exc:
            why = "hub unreachable" if isinstance(exc, weights.HubUnreachable) else "hub refused"
    known = planned or weights.cached_plan(spec.name, repo, spec.files)
    if known is None:
        return f"size unknown ({why or 'offline'}), nothing in the cache"
    size = format_bytes(known.total_bytes) if planned else f"{format_bytes(known.total_bytes)} (cached list)"
    if not known.missing:
        return f"{size}, all in the cache"
    return f"{size}, {format_bytes(known.cached_bytes)} in the cache"


def describe_models(settings: Settings | None = None) -> list[str]:
    settings = settings or Settings()
    defaults = {ref.partition("=")[0]: mode for mode, ref in settings.models.items()}
    backends = sorted(BACKENDS.items())
    with ThreadPoolExecutor(max_workers=len(backends)) as pool:  # one hub request each, side by side
        states = list(pool.map(weights_state, [cls.spec for _, cls in backends]))
    lines = []
    for (name, cls), state in zip(backends, states, strict=True):
        spec = cls.spec
        role = f"default for {defaults[name]}" if name in defaults else "available"
        tiny = (
            "built"
            if (tiny_folder(cls, settings.tiny_dir) / "model_index.json").is_file()
            else "built on first use"
        )
        end = (
            "needs end frame"
            if spec.needs_end_frame
            else "takes end frame"
            if spec.takes_end_frame
            else "no end frame"
        )
        lines.append(
            f"{name:<20} {spec.source:<48} weights: {state}; {role}; modes {','.join(spec.modes)}; "
            f"{spec.fps} fps; {end}; {spec.steps} steps, guidance {spec.guidance}, shift {spec.shift}; "
            f"tiny-{name}: {tiny}"
        )
        lines += memory_lines(name, cls, spec)
    return lines


# Memory: what `i2v models` prints under each backend, and the tables of docs/memory.md.

GB = 10**9
# What the turbo variants share with their base model (docs/memory.md's arithmetic for one GPU holding
# both; at run time sharing is decided by the weight files' content, i2v.residency).
SHARED_WITH = {
    "fastwan2.2-ti2v-5b": ("wan2.2-ti2v-5b", ("text_encoder", "vae")),
    "ltx-2-distilled": ("ltx-2", ("text_encoder", "vae", "audio_vae", "vocoder", "latent_upsampler")),
}


def _gb(count: int) -> str:
    return f"{count / GB:.2f}"


def _dtype(part: Any, device_type: str) -> str:
    if part.component.float32:
        return "float32"
    return "bf16" if device_type == "cuda" else "float32"


def memory_lines(name: str, cls: type[Backend], spec: BackendSpec, device_type: str = "cuda") -> list[str]:
    """The parts of one backend, their bytes, and what one clip adds (`i2v models`)."""
    from .memory import Placement, activations_for, need, plan_mode, plan_size

    parts = cls.parts(spec, device_type)
    if not parts:
        return ["    memory: not declared by this backend"]
    where = {p.config_from for p in parts.values()}
    source = "packaged configs" if where == {"packaged"} else "configs from " + ", ".join(sorted(where))
    listed = ", ".join(
        f"{n} {_gb(p.size.bytes)} GB ({p.size.params / 1e9:.2f}B params, {_dtype(p, device_type)})"
        for n, p in parts.items()
    )
    mode = plan_mode(spec)
    per = activations_for(cls, spec, parts, mode, batched_cfg=True)
    lines = [f"    weights on {device_type} ({source}): {listed}"]
    fp8 = [Placement("resident", fp8=True)] if cls.fp8_modules else []
    for placement in (Placement("resident"), *fp8, Placement("offload")):
        n = need(name, parts, per(placement), placement)
        peaks = ", ".join(f"{d} s {_gb(b)} GB" for d, b in n.peaks.items())
        lines.append(f"    {placement}: {_gb(n.idle)} GB held; peak per {mode} clip: {peaks}")
    width, height = plan_size(cls, spec, mode)
    acts = per(Placement("resident"))[5]
    lines.append(
        f"    one 5 s {mode} clip at {width}x{height} adds: encode {_gb(acts.encode)} GB, denoise "
        f"{_gb(acts.denoise)} GB, decode {_gb(acts.decode)} GB ({acts.formula}; formula in docs/memory.md)"
    )
    return lines


def memory_tables() -> str:
    """docs/memory.md's tables, computed from the footprints (`python -m i2v.models_info`)."""
    from .memory import GPU_CLASSES, RESERVE, Placement, activations_for, choose, need, plan_mode, plan_size
    from .speed import Speed

    out = ["### Footprints (bf16 on CUDA; counted on `meta` from the configs)", ""]
    out += [
        "| model | part | parameters | loads in | bytes | GB | fp8 compute GB | low-vram streamed GB |",
        "|---|---|--:|---|--:|--:|--:|--:|",
    ]
    totals: dict[str, dict[str, int]] = {}
    for name, cls in sorted(BACKENDS.items()):
        parts = cls.parts(cls.spec, "cuda")
        totals[name] = {n: p.size.bytes for n, p in parts.items()}
        for n, p in parts.items():
            s = p.size
            out.append(
                f"| {name} | {n} | {s.params:,} | {_dtype(p, 'cuda')} | {s.bytes:,} | {_gb(s.bytes)} | "
                f"{_gb(s.fp8_bytes) if s.fp8_bytes < s.bytes else '—'} | {_gb(s.streamed_bytes)} |"
            )
        all_bytes = sum(p.size.bytes for p in parts.values())
        all_params = sum(p.size.params for p in parts.values())
        out.append(
            f"| **{name}** | **all** | **{all_params:,}** | | **{all_bytes:,}** | **{_gb(all_bytes)}** | | |"
        )
    out += ["", "### One clip (the mode's 16:9 size, batched CFG), GB", ""]
    out += [
        "| model | size | duration | tokens | encode | denoise | decode | peak resident | peak fp8 compute | peak low-vram |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, cls in sorted(BACKENDS.items()):
        parts = cls.parts(cls.spec, "cuda")
        mode = plan_mode(cls.spec)
        per = activations_for(cls, cls.spec, parts, mode, batched_cfg=True)
        width, height = plan_size(cls, cls.spec, mode)
        resident, fp8, offload = Placement("resident"), Placement("resident", True), Placement("offload")
        for duration in (5, 10):
            a = per(resident)[duration]
            peaks = [
                _gb(need(name, parts, per(p), p).peaks[duration]) if p != fp8 or cls.fp8_modules else "—"
                for p in (resident, fp8, offload)
            ]
            out.append(
                f"| {name} | {width}x{height} | {duration} s | {a.formula} | {_gb(a.encode)} | {_gb(a.denoise)} | "
                f"{_gb(a.decode)} | " + " | ".join(peaks) + " |"
            )
    out += ["", "### What each GPU class runs, and how (`choose`: budget = nominal size - 1 GB)", ""]
    out += [
        "| model | server preset | " + " | ".join(GPU_CLASSES) + " |",
        "|---|---|" + "---|" * len(GPU_CLASSES),
    ]
    for name, cls in sorted(BACKENDS.items()):
        parts = cls.parts(cls.spec, "cuda")
        per = activations_for(cls, cls.spec, parts, plan_mode(cls.spec), batched_cfg=True)
        for preset in ("default", "fast"):
            cells = []
            for size in GPU_CLASSES.values():
                chosen = choose(name, parts, per, size - RESERVE, Speed(preset=preset), "cuda")
                if chosen.fits:
                    seconds = "+".join(str(d) for d in chosen.fits)
                    peak = max(chosen.peaks[d] for d in chosen.fits)
                    cells.append(f"{chosen.placement} ({seconds} s; peak {_gb(peak)})")
                else:
                    cells.append(f"does not fit (peak {_gb(chosen.peak)} even with {chosen.placement})")
            out.append(f"| {name} | {preset} | " + " | ".join(cells) + " |")
    out += ["", "### Several models on one GPU (weights held together; shared parts once), GB", ""]
    out += ["| models | weights | + the largest 10 s peak above weights | total |", "|---|--:|--:|--:|"]
    groups = [
        ("wan2.2-ti2v-5b", "ltx-2"),
        ("wan2.2-ti2v-5b", "fastwan2.2-ti2v-5b"),
        ("ltx-2", "ltx-2-distilled"),
        ("wan2.2-ti2v-5b", "fastwan2.2-ti2v-5b", "ltx-2", "ltx-2-distilled"),
    ]
    for group in groups:
        held = 0
        for name in group:
            shared = SHARED_WITH.get(name)
            skip = shared[1] if shared and shared[0] in group else ()
            held += sum(b for part, b in totals[name].items() if part not in skip)
        extra = 0
        for name in group:
            cls = BACKENDS[name]
            parts = cls.parts(cls.spec, "cuda")
            per = activations_for(cls, cls.spec, parts, plan_mode(cls.spec), batched_cfg=True)
            extra = max(
                extra,
                need(name, parts, per(Placement("resident")), Placement("resident")).peaks[10]
                - sum(totals[name].values()),
            )
        out.append(f"| {' + '.join(group)} | {_gb(held)} | {_gb(extra)} | {_gb(held + extra)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(memory_tables(), end="")
