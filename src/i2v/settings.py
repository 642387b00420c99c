"""Settings: the environment (`I2V_*`), the settings file, defaults; read once, checked once.

This module is the only place i2v reads the environment. Each settings class names its variables in one
table (`ENVIRONMENT`: variable -> field), and a bad value is an error naming the variable
(`I2V_BATCHED_CFG: expected true or false, not 'maybe'`). The server's settings (`i2v.server.config`) are
built the same way. No torch here: the HTTP side reads settings too.

The engine's settings file is TOML, at `$I2V_CONFIG` or else `~/.config/i2v/config.toml`, read once per
`Settings()`; an environment variable wins over the file, a keyword argument over both:

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
    cfg_parallel = true      # a group's CFG passes on different GPUs; default: where it can (env I2V_CFG_PARALLEL)
    warmup = true            # render a short clip at start; default: on with CUDA (env I2V_WARMUP)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .devices import device_group
from .errors import I2VError
from .parsing import Bytes, CommaList, OptionalBytes
from .request import MODES, Mode
from .speed import PRESETS, SPEED_FLAGS, RequestPreset, Speed

LongClips = Literal["one-sequence", "extend"]

TINY_PREFIX = "tiny-"  # `tiny-<backend>`: the backend's tiny random-weight twin (i2v.backends.resolve)
DEFAULT_MODELS: dict[Mode, str] = {"standard": "wan2.2-ti2v-5b", "pro": "ltx-2"}
DEFAULT_TURBO_MODELS: dict[Mode, str] = {"standard": "fastwan2.2-ti2v-5b", "pro": "ltx-2-distilled"}

FieldPath = tuple[str, ...]


def xdg_data_home() -> Path:
    """`$XDG_DATA_HOME`, else ~/.local/share: the XDG base-directory contract, hence read from the env."""
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    return Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"


class Environment(PydanticBaseSettingsSource):
    """The variables a settings class lists in its `ENVIRONMENT` table; an empty one counts as unset."""

    def __init__(self, settings_cls: type[EnvSettings]) -> None:
        super().__init__(settings_cls)
        self.table = settings_cls.ENVIRONMENT

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, path in self.table.items():
            text = os.environ.get(name, "").strip()
            if text:
                _put(values, path, text)
        return values


def _put(values: dict[str, Any], path: FieldPath, value: Any) -> None:
    for key in path[:-1]:
        values = values.setdefault(key, {})
    values[path[-1]] = value


class EnvSettings(BaseSettings):
    """Settings from keyword arguments, then `ENVIRONMENT`, then `file_source()`, then defaults.

    A validation error becomes one `error` whose lines each name the variable (or the file) at fault.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid")
    ENVIRONMENT: ClassVar[Mapping[str, FieldPath]] = {}
    error: ClassVar[type[Exception]] = I2VError

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise self.error(self._describe(exc, values)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, Environment(cls), *cls.file_sources())

    @classmethod
    def file_sources(cls) -> tuple[PydanticBaseSettingsSource, ...]:
        return ()

    @classmethod
    def _describe(cls, exc: ValidationError, given: Mapping[str, Any]) -> str:
        variables = {path: name for name, path in cls.ENVIRONMENT.items()}
        lines = []
        for item in exc.errors(include_url=False):
            loc = tuple(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            where = ".".join(loc)
            for end in range(len(loc), 0, -1):
                name = variables.get(loc[:end])
                if name and os.environ.get(name, "").strip() and loc and loc[0] not in given:
                    where = name
                    break
            lines.append(f"{where}: {message}" if where else message)
        return "; ".join(lines)


# The engine's settings file.


def config_path() -> Path:
    return Path(os.environ.get("I2V_CONFIG", "").strip() or "~/.config/i2v/config.toml").expanduser()


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The settings file as a dict; {} when there is none. A broken file is an error, never ignored."""
    path = path or config_path()
    if not path.is_file():
        if os.environ.get("I2V_CONFIG", "").strip():
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
        unknown = set(models) - set(MODES)
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


class SettingsFile(PydanticBaseSettingsSource):
    """The TOML settings file, read and checked once: [models], [turbo] and [speed]."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        config = read_config()
        values: dict[str, Any] = {}
        for table, name in (("models", "models"), ("turbo", "turbo_models")):
            chosen = {mode: ref.strip() for mode, ref in config.get(table, {}).items() if ref.strip()}
            if chosen:
                values[name] = chosen
        if config.get("speed"):
            values["speed"] = dict(config["speed"])
        return values


def _with_defaults(defaults: dict[Mode, str]) -> Any:
    return BeforeValidator(lambda value: {**defaults, **value} if isinstance(value, dict) else value)


class Settings(EnvSettings):
    """Where things live, which model serves each mode, and how models load and encode.

    `models` maps a mode to a model reference: a registered backend name, optionally followed by
    `=SOURCE`, where SOURCE is a hub id or a local folder of weights (e.g. `wan2.2-ti2v-5b=/models/ti2v`).
    Per mode: I2V_MODEL_STANDARD / I2V_MODEL_PRO, else the settings file's [models], else the default.
    `turbo_models` are the same for requests with preset "turbo" (I2V_TURBO_MODEL_*, [turbo]).
    """

    ENVIRONMENT: ClassVar[Mapping[str, FieldPath]] = {
        "I2V_CACHE_DIR": ("cache_dir",),
        "I2V_MODEL_STANDARD": ("models", "standard"),
        "I2V_MODEL_PRO": ("models", "pro"),
        "I2V_TURBO_MODEL_STANDARD": ("turbo_models", "standard"),
        "I2V_TURBO_MODEL_PRO": ("turbo_models", "pro"),
        "I2V_PRESET": ("speed", "preset"),
        "I2V_ATTENTION": ("speed", "attention"),
        "I2V_COMPILE": ("speed", "compile"),
        "I2V_BATCHED_CFG": ("speed", "batched_cfg"),
        "I2V_CFG_PARALLEL": ("speed", "cfg_parallel"),
        "I2V_WARMUP": ("speed", "warmup"),
        "I2V_DEVICE": ("device",),
        "I2V_X264_PRESET": ("x264_preset",),
        "I2V_X264_CRF": ("x264_crf",),
        "I2V_FETCH_ALLOW": ("fetch_allow",),
        "I2V_EXTRA_BACKENDS": ("extra_backends",),
        "I2V_MODEL": ("served_model",),
        "I2V_MIN_FREE_DISK": ("min_free_disk",),
        "I2V_GPU_MEMORY": ("gpu_memory",),
        "I2V_OFFLOAD_MEMORY": ("offload_memory",),
        "I2V_LONG_CLIPS": ("long_clips",),
    }

    cache_dir: Path = Path("~/.cache/i2v")
    models: Annotated[dict[Mode, str], _with_defaults(DEFAULT_MODELS)] = Field(
        default_factory=lambda: dict(DEFAULT_MODELS)
    )
    turbo_models: Annotated[dict[Mode, str], _with_defaults(DEFAULT_TURBO_MODELS)] = Field(
        default_factory=lambda: dict(DEFAULT_TURBO_MODELS)
    )
    speed: Speed = Field(default_factory=Speed)
    # A torch device or a device group ("cuda:0+cuda:1"); None: the first GPU, else the CPU.
    device: str | None = None
    x264_preset: str = "medium"
    x264_crf: int = 18
    # Hosts or networks image URLs may reach although private (`files.lan,10.0.0.0/8`).
    fetch_allow: CommaList = ()
    # Backend plugins, `module:Class` (i2v.backends.registered).
    extra_backends: CommaList = ()
    # The model `i2v serve` and the Cog predictor run unless told otherwise (`--model`).
    served_model: str | None = None
    # Free space a download of weights leaves on the HF cache's disk, at least (`20GB`, `500MB`, `0`).
    min_free_disk: Bytes = 10**9
    # The device memory models and activations may use (`40GB`, to share a GPU); None: the device's free
    # memory when the engine starts (no limit on a CPU). See i2v.residency and docs/memory.md.
    gpu_memory: OptionalBytes = None
    # Host memory idle models may be moved to (pinned on CUDA) instead of being dropped; 0: always drop;
    # None: what the host has available at the time, less a margin.
    offload_memory: OptionalBytes = None
    # 10 s clips in one sequence, or as 5 s clips each from the last frame of the one before (i2v.long_clips).
    long_clips: LongClips = "one-sequence"

    @classmethod
    def file_sources(cls) -> tuple[PydanticBaseSettingsSource, ...]:
        return (SettingsFile(cls),)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        try:
            device_group(value)
        except I2VError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("gpu_memory")
    @classmethod
    def _budget(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("expected a size above zero like 40GB (or auto: the device's free memory)")
        return value

    @property
    def tiny_dir(self) -> Path:
        return self.cache_dir / "tiny"

    def model_ref(self, mode: Mode, preset: RequestPreset = "default", model: str | None = None) -> str:
        """The model reference for a mode and preset; `model` is an engine's choice: None or "default" (the
        configured one), "tiny" (its tiny twin), or a reference that serves every mode and preset."""
        configured = (self.turbo_models if preset == "turbo" else self.models)[mode]
        if model in (None, "default"):
            return configured
        if model == "tiny":
            return TINY_PREFIX + configured.partition("=")[0]
        return model

    def models_in_use(self, model: str | None = None) -> list[str]:
        """The references the modes run on with the configured preset (`I2V_PRESET`), each once."""
        preset = self.speed.request_preset(None)
        return list(dict.fromkeys(self.model_ref(mode, preset, model) for mode in MODES))
