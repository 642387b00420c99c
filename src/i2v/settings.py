"""Settings from the environment and an optional settings file, read once per Engine.

Every knob has a default that serves users. The settings file is TOML, at `$I2V_CONFIG` or else
`~/.config/i2v/config.toml`; an environment variable wins over the file:

    [models]
    standard = "wan2.2-ti2v-5b"
    pro = "ltx-2-distilled=/models/ltx-2-distilled"   # a registered backend, its weights in a local folder

    [turbo]                  # the models a request with preset "turbo" runs on
    standard = "fastwan2.2-ti2v-5b"

    [speed]                  # see i2v.speed
    preset = "default"       # default | fast | turbo | low-vram   (env I2V_PRESET)
    attention = "auto"       # or a diffusers attention backend  (env I2V_ATTENTION)
    compile = true           # regional torch.compile; default: on with CUDA (env I2V_COMPILE)
    batched_cfg = true       # CFG passes in one forward; default: on with CUDA (env I2V_BATCHED_CFG)
    warmup = true            # render a short clip at start; default: on with CUDA (env I2V_WARMUP)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import I2VError
from .speed import PRESETS, Speed

DEFAULT_MODELS = {"standard": "wan2.2-ti2v-5b", "pro": "ltx-2"}
DEFAULT_TURBO_MODELS = {"standard": "fastwan2.2-ti2v-5b", "pro": "ltx-2-distilled"}
SPEED_FLAGS = ("compile", "batched_cfg", "warmup")


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
    for table in ("models", "turbo"):
        models = config.get(table, {})
        if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
            raise I2VError(f"settings file {path}: [{table}] maps a mode to a model reference string")
        unknown = set(models) - set(DEFAULT_MODELS)
        if unknown:
            raise I2VError(
                f"settings file {path}: [{table}] has unknown mode(s) {', '.join(sorted(unknown))}"
            )
    _check_speed(config.get("speed", {}), f"settings file {path}: [speed]")
    return config


def _check_speed(speed: Any, where: str) -> None:
    if not isinstance(speed, dict):
        raise I2VError(f"{where} is a table")
    unknown = set(speed) - {"preset", "attention", *SPEED_FLAGS}
    if unknown:
        raise I2VError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
    if "preset" in speed and speed["preset"] not in PRESETS:
        raise I2VError(f"{where} preset must be one of {', '.join(PRESETS)}, not {speed['preset']!r}")
    if not isinstance(speed.get("attention", ""), str):
        raise I2VError(f"{where} attention is a backend name")
    for flag in SPEED_FLAGS:
        if not isinstance(speed.get(flag, True), bool):
            raise I2VError(f"{where} {flag} is true or false")


def _models(table: str = "models", defaults: dict[str, str] = DEFAULT_MODELS) -> dict[str, str]:
    configured = read_config().get(table, {})
    prefix = "I2V_MODEL_" if table == "models" else "I2V_TURBO_MODEL_"
    return {
        mode: _env(prefix + mode.upper(), configured.get(mode, "").strip() or default)
        for mode, default in defaults.items()
    }


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise I2VError(f"expected true or false, not {value!r}")


def _speed() -> Speed:
    """[speed] from the settings file, each key overridden by its environment variable."""
    speed = dict(read_config().get("speed", {}))
    for key in ("preset", "attention", *SPEED_FLAGS):
        value = os.environ.get(f"I2V_{key.upper()}", "").strip()
        if value:
            try:
                speed[key] = _flag(value) if key in SPEED_FLAGS else value
            except I2VError as exc:
                raise I2VError(f"I2V_{key.upper()}: {exc}") from exc
    _check_speed(speed, "speed settings")
    return Speed(**speed)


@dataclass(frozen=True)
class Settings:
    """Where things live and which model serves each mode.

    `models` maps a mode to a model reference: a registered backend name, optionally followed by
    `=SOURCE`, where SOURCE is a hub id or a local folder of weights (e.g. `wan2.2-ti2v-5b=/models/ti2v`).
    Per mode: I2V_MODEL_STANDARD / I2V_MODEL_PRO, else the settings file's [models], else the default.
    `turbo_models` are the same for requests with preset "turbo" (I2V_TURBO_MODEL_*, [turbo]).
    """

    cache_dir: Path = field(default_factory=lambda: Path(_env("I2V_CACHE_DIR", "~/.cache/i2v")).expanduser())
    models: dict[str, str] = field(default_factory=_models)
    turbo_models: dict[str, str] = field(default_factory=lambda: _models("turbo", DEFAULT_TURBO_MODELS))
    speed: Speed = field(default_factory=_speed)
    device: str | None = field(default_factory=lambda: os.environ.get("I2V_DEVICE") or None)
    x264_preset: str = field(default_factory=lambda: _env("I2V_X264_PRESET", "medium"))
    x264_crf: int = field(default_factory=lambda: int(_env("I2V_X264_CRF", "18")))

    @property
    def tiny_dir(self) -> Path:
        return self.cache_dir / "tiny"
