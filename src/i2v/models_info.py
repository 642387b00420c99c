"""What `i2v models` prints: each backend, its weights' source, and whether they are on this machine."""

from __future__ import annotations

from pathlib import Path

from .backends import BACKENDS, tiny_folder
from .settings import Settings


def weights_present(source: str) -> bool:
    """True when `source` is a local folder of weights or a hub id already in the HF cache."""
    if Path(source).expanduser().is_dir():
        return (Path(source).expanduser() / "model_index.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source, "model_index.json"), str)


def describe_models(settings: Settings | None = None) -> list[str]:
    settings = settings or Settings()
    defaults = {ref.partition("=")[0]: mode for mode, ref in settings.models.items()}
    lines = []
    for name, cls in sorted(BACKENDS.items()):
        spec = cls.spec
        role = f"default for {defaults[name]}" if name in defaults else "available"
        present = "weights present" if weights_present(spec.source) else "weights not downloaded"
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
            f"{name:<22} {spec.source:<40} {present:<22} {role}; modes {','.join(spec.modes)}; "
            f"{spec.fps} fps; {end}; {spec.steps} steps, guidance {spec.guidance}, shift {spec.shift}; "
            f"tiny-{name}: {tiny}"
        )
    return lines
