"""Settings from the environment and an optional settings file, read once per Engine.

Every knob has a default that serves users. The settings file is TOML, at `$I2V_CONFIG` or else
`~/.config/i2v/config.toml`; an environment variable wins over the file:

    [models]
    standard = "wan2.2-ti2v-5b"
    pro = "ltx-2-distilled=/models/ltx-2-distilled"   # a registered backend, its weights in a local folder
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import I2VError

DEFAULT_MODELS = {"standard": "wan2.2-ti2v-5b", "pro": "ltx-2"}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def config_path() -> Path:
    return Path(_env("I2V_CONFIG", "~/.config/i2v/config.toml")).expanduser()


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The settings file as a dict; {} when there is none. A broken file is an error, never ignored."""
    path = path or config_path()
    if not path.is_file():
        if "I2V_CONFIG" in os.environ and os.environ["I2V_CONFIG"].strip():
            raise I2VError(f"settings file {path} (I2V_CONFIG) does not exist")
        return {}
    try:
        with path.open("rb") as file:
            config = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise I2VError(f"settings file {path}: {exc}") from exc
    models = config.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise I2VError(f"settings file {path}: [models] maps a mode to a model reference string")
    unknown = set(models) - set(DEFAULT_MODELS)
    if unknown:
        raise I2VError(f"settings file {path}: [models] has unknown mode(s) {', '.join(sorted(unknown))}")
    return config


def _models() -> dict[str, str]:
    configured = read_config().get("models", {})
    return {
        mode: _env(f"I2V_MODEL_{mode.upper()}", configured.get(mode, "").strip() or default)
        for mode, default in DEFAULT_MODELS.items()
    }


@dataclass(frozen=True)
class Settings:
    """Where things live and which model serves each mode.

    `models` maps a mode to a model reference: a registered backend name, optionally followed by
    `=SOURCE`, where SOURCE is a hub id or a local folder of weights (e.g. `wan2.2-ti2v-5b=/models/ti2v`).
    Per mode: I2V_MODEL_STANDARD / I2V_MODEL_PRO, else the settings file's [models], else the default.
    """

    cache_dir: Path = field(default_factory=lambda: Path(_env("I2V_CACHE_DIR", "~/.cache/i2v")).expanduser())
    models: dict[str, str] = field(default_factory=_models)
    device: str | None = field(default_factory=lambda: os.environ.get("I2V_DEVICE") or None)
    x264_preset: str = field(default_factory=lambda: _env("I2V_X264_PRESET", "medium"))
    x264_crf: int = field(default_factory=lambda: int(_env("I2V_X264_CRF", "18")))

    @property
    def tiny_dir(self) -> Path:
        return self.cache_dir / "tiny"
