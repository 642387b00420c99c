"""Settings from the environment, read once per Engine. Every knob has a default that serves users."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


@dataclass(frozen=True)
class Settings:
    """Where things live and which model serves each mode.

    `models` maps a mode to a model reference: a registered backend name, optionally followed by
    `=SOURCE`, where SOURCE is a hub id or a local folder of weights (e.g. `wan2.2-ti2v-5b=/models/ti2v`).
    """

    cache_dir: Path = field(default_factory=lambda: Path(_env("I2V_CACHE_DIR", "~/.cache/i2v")).expanduser())
    models: dict[str, str] = field(
        default_factory=lambda: {
            "standard": _env("I2V_MODEL_STANDARD", "wan2.2-ti2v-5b"),
            "pro": _env("I2V_MODEL_PRO", "ltx-2"),
        }
    )
    device: str | None = field(default_factory=lambda: os.environ.get("I2V_DEVICE") or None)
    x264_preset: str = field(default_factory=lambda: _env("I2V_X264_PRESET", "medium"))
    x264_crf: int = field(default_factory=lambda: int(_env("I2V_X264_CRF", "18")))

    @property
    def tiny_dir(self) -> Path:
        return self.cache_dir / "tiny"
