"""What `i2v models` prints: each backend, its weights' source, their download size and what is in the cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import weights
from .backends import BACKENDS, BackendSpec, tiny_folder
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
    return lines
